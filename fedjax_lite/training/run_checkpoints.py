"""The checkpoints of one :func:`~fedjax_lite.training.run_training` call: what it restores when it resumes, and
what it saves after a round.

A :class:`RunCheckpoints` opens the run's checkpoint folder (taking its lock, see
:class:`~fedjax_lite.training.checkpoint.RunCheckpointer`), refuses a folder that holds another run, restores the
newest readable checkpoint of this one (server state, ``extra_state`` in place, and the loop's :class:`Progress`),
and saves a checkpoint from the server state, the ``extra_state`` and the recorder's :class:`Progress`. The
storage itself (orbax, integrity, faults) is :mod:`fedjax_lite.training.checkpoint`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from fedjax_lite.core.tree import PyTree
from fedjax_lite.training import checkpoint as checkpointing



def _no_bits() -> dict[str, int]:
  return {"broadcasted_bits": 0, "aggregated_bits": 0}


@dataclasses.dataclass
class Progress:
  """What the loop carries from round to round on the host, and a checkpoint saves.

  Attributes:
    rounds_completed: rounds run so far (the next round's number).
    history: one flat metrics record per round run.
    cumulative: communication so far: ``{'broadcasted_bits': ..., 'aggregated_bits': ...}``.
    rejected_streak: consecutive rounds so far whose every client was rejected as non-finite.
    stopped: why the run stopped before its last round, or None.
  """

  rounds_completed: int = 0
  history: list[dict] = dataclasses.field(default_factory=list)
  cumulative: dict[str, int] = dataclasses.field(default_factory=_no_bits)
  rejected_streak: int = 0
  stopped: str | None = None


class RunCheckpoints:
  """The checkpoint folder of one run.

  Args:
    directory: the checkpoint folder (its lock is held until :meth:`close`).
    keep: complete checkpoints kept.
    run: what the loop knows of the run (:func:`~fedjax_lite.training.checkpoint.describe_run`), compared on resume.
    config: the caller's JSON-able configuration, compared on resume (first, by key).
    privacy: the run's privacy ledger, or None; its spent epsilon is saved and compared.
    extra_state: name -> host state saved with the server state and restored in place.
  """

  def __init__(self, directory: str | os.PathLike, *, keep: int, run: Mapping[str, Any],
               config: Mapping[str, Any] | None, privacy: Any, extra_state: Mapping[str, Any]):
    self._checkpointer = checkpointing.RunCheckpointer(directory, max_to_keep=keep)
    self.directory = self._checkpointer.directory
    self._run = run
    self._config = checkpointing.jsonable(dict(config or {}))
    self._privacy = privacy
    self._extra_state = extra_state

  def restore(self, state: PyTree, *, resume: bool) -> tuple[PyTree, Progress | None]:
    """The newest readable checkpoint's server state and progress (``extra_state`` restored in place), or
    ``(state, None)`` when the folder holds no checkpoint.

    Raises:
      ValueError: the folder holds checkpoints and ``resume`` is False.
      ConfigMismatchError: the checkpoint's run differs from this one.
      CheckpointError: it holds another kind of run.
    """
    saved_steps = self._checkpointer.steps()
    if saved_steps and not resume:
      raise ValueError(f"checkpoint_dir {self.directory} already holds checkpoints (the last after "
                       f"{saved_steps[-1]} rounds): pass resume=True to continue that run, or use an empty "
                       "directory.")
    if not saved_steps:
      return state, None
    templates = {checkpointing.SERVER_STATE: state}
    templates.update({name: checkpointing.extra_state_arrays(value) for name, value in self._extra_state.items()})
    restored = self._checkpointer.restore_latest(templates, check=self._check_resumable)
    if restored is None:
      return state, None
    for name, value in self._extra_state.items():
      checkpointing.load_extra_state(value, restored.trees[name], name)
    meta = restored.meta
    progress = Progress(rounds_completed=restored.rounds_completed, history=list(meta["history"]),
                        cumulative=dict(meta["cumulative"]), rejected_streak=int(meta["rejected_streak"]))
    return restored.trees[checkpointing.SERVER_STATE], progress

  def _check_resumable(self, meta: Mapping[str, Any], rounds_completed: int) -> None:
    checkpointing.check_resumable(meta, rounds_completed, run=self._run, config=self._config,
                                  privacy=self._privacy, directory=self.directory)

  def save(self, state: PyTree, progress: Progress) -> None:
    """Saves the checkpoint after ``progress.rounds_completed`` rounds (written in the background)."""
    rounds = progress.rounds_completed
    trees = {checkpointing.SERVER_STATE: state}
    trees.update({name: checkpointing.extra_state_arrays(value) for name, value in self._extra_state.items()})
    ledger = self._privacy
    meta = {"run": self._run, "config": self._config, "versions": checkpointing.library_versions(),
            "history": progress.history, "cumulative": progress.cumulative,
            "rejected_streak": progress.rejected_streak, "next_round": rounds, "stopped_early": progress.stopped,
            "privacy": None if ledger is None else {
                "epsilon": ledger.epsilon_after(rounds), "delta": ledger.delta, "rounds": rounds,
                "accountant": checkpointing.privacy_accountant_name(ledger)}}
    self._checkpointer.save(rounds, trees, meta)

  def wait(self) -> None:
    """Blocks until the last save is written (raises ``CheckpointSaveError`` if it could not be)."""
    self._checkpointer.wait()

  def close(self) -> None:
    """Waits for the last save and releases the folder (raises ``CheckpointSaveError`` if it failed)."""
    self._checkpointer.close()


def open_checkpoints(directory: str | os.PathLike, state: PyTree, *, keep: int, run: Mapping[str, Any],
                     config: Mapping[str, Any] | None, privacy: Any, extra_state: Mapping[str, Any],
                     resume: bool) -> tuple[RunCheckpoints, PyTree, Progress | None]:
  """Opens a run's checkpoint folder (:class:`RunCheckpoints`) and restores from it: ``(checkpoints, state,
  resumed progress or None)``; the folder is released again if the restore fails. ``state`` is the fresh state
  (the restore's template, returned when there is nothing to resume)."""
  checkpoints = RunCheckpoints(directory, keep=keep, run=run, config=config, privacy=privacy,
                               extra_state=extra_state)
  try:
    state, resumed = checkpoints.restore(state, resume=resume)
  except BaseException:
    checkpoints.close()
    raise
  return checkpoints, state, resumed
