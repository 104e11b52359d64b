"""The recorder: everything a training run does with a round once its metrics are back on the host.

Both drivers (:mod:`~fedjax_lite.training.round_driver`, :mod:`~fedjax_lite.training.scanned_driver`) hand each
round's flat metrics to :meth:`Recorder.record`, which adds the communication totals so far
(``cumulative_broadcasted_bits``, ``cumulative_aggregated_bits``), the round's wall time and the privacy ledger's
epsilon (and the example-level ledger's), evaluates when the schedule says so, writes the record (metrics file, trackers, progress bar), counts
rounds that trained nothing (every real client rejected as non-finite: a warning each, and
:class:`TrainingStalledError` after ``max_rejected_rounds`` in a row), and asks ``on_round_end`` whether to stop. At
the end of a dispatch (every round for the per-round driver) :meth:`Recorder.end_dispatch` saves the checkpoint when
one is due and turns a caught SIGINT/SIGTERM into :class:`~fedjax_lite.training.checkpoint.TrainingInterrupted`.

Used as a context manager: entering opens the files (a resumed run's metrics file is rewritten with the
checkpoint's records, later lines of a killed run are dropped) and catches signals; leaving closes everything and
waits for the last checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from fedjax_lite.core.tree import PyTree
from fedjax_lite.privacy.accounting import PrivacyLedger
from fedjax_lite.training import units
from fedjax_lite.training.checkpoint import CheckpointSaveError, SignalCatcher, TrainingInterrupted
from fedjax_lite.training.run_checkpoints import Progress, RunCheckpoints
from fedjax_lite.training.schedule import RoundSchedule

EvaluateFn = Callable[[PyTree], Mapping[str, Any]]
RoundCallback = Callable[[int, dict], "bool | str | None"]


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float | int]:
  """Nested metrics -> ``{'client_work/train/loss': 2.3, ...}`` of Python scalars (empty groups dropped)."""
  flat: dict[str, float | int] = {}
  for key, value in metrics.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(flatten_metrics(value, name + "/"))
    elif isinstance(value, (tuple, list)) and not value:
      continue
    else:
      array = np.asarray(value)
      if array.ndim == 0:
        flat[name] = array.item()
      else:
        flat[name] = array.tolist()
  return flat


class TrainingStalledError(RuntimeError):
  """Raised after ``max_rejected_rounds`` consecutive rounds in which every client's update was rejected."""


def all_clients_rejected(flat: Mapping[str, Any], num_real_clients: int) -> bool:
  """Every real client of the round was rejected as non-finite, or the server rejected the aggregate."""
  if num_real_clients == 0:
    return False
  if flat.get("finalizer/update_non_finite", 0) == 1:
    return True
  return flat.get("client_work/num_non_finite_clients", 0) >= num_real_clients


class Recorder:
  """Records the rounds of one run (see the module docstring).

  Args:
    schedule: the run's cadence (evaluation, checkpoints, privacy budget).
    evaluate: optional ``params -> metrics``, recorded under ``evaluation/`` after the rounds the schedule says.
    metrics_path: optional JSON-lines file receiving one flat record per round.
    trackers: objects with ``write(record)`` and ``close()``.
    progress_bar: show a tqdm progress bar.
    on_round_end: optional ``callback(round_num, record)``; a truthy return stops the run with that reason.
    max_rejected_rounds: consecutive rounds that trained nothing before :class:`TrainingStalledError`.
    checkpoints: the run's checkpoint folder, or None (closed when the recorder is).
    resumed: the progress restored from a checkpoint, or None for a fresh run.
    round_metrics: optional ``round_num -> metrics`` merged into each record first (e.g. the simulated clock's
      ``systems/`` metrics, :meth:`~fedjax_lite.training.simulated_time.SimulatedTimeDriver.metrics`).
    example_privacy: optional example-level :class:`~fedjax_lite.privacy.PrivacyLedger`: each record gets
      ``privacy/example_epsilon`` after that many rounds (and ``privacy/example_delta``).

  Attributes:
    progress: the run's :class:`~fedjax_lite.training.run_checkpoints.Progress` (history, totals, stop reason).
    start_round: the first round this call runs.
    first_round_seconds: wall time of the first round (or dispatch) this call ran, compilation included.
  """

  def __init__(self, schedule: RoundSchedule, *, evaluate: EvaluateFn | None = None,
               metrics_path: str | os.PathLike | None = None, trackers: Sequence[Any] = (),
               progress_bar: bool = False, on_round_end: RoundCallback | None = None, max_rejected_rounds: int = 3,
               checkpoints: RunCheckpoints | None = None, resumed: Progress | None = None,
               round_metrics: Callable[[int], Mapping[str, Any]] | None = None,
               example_privacy: PrivacyLedger | None = None):
    self.schedule = schedule
    self._example_privacy = example_privacy
    self._evaluate = evaluate
    self._metrics_path = metrics_path
    self._trackers = tuple(trackers)
    self._progress_bar = progress_bar
    self._on_round_end = on_round_end
    self._max_rejected_rounds = max_rejected_rounds
    self._checkpoints = checkpoints
    self._round_metrics = round_metrics
    self.progress = resumed if resumed is not None else Progress()
    self.start_round = self.progress.rounds_completed
    self.first_round_seconds = math.nan
    if self.start_round and self.start_round < schedule.num_rounds and not schedule.allows(self.start_round + 1):
      self.progress.stopped = schedule.budget_message(self.start_round)  # the checkpoint's run spent its budget
    self._bar = self._sink = self._signals = None

  def __enter__(self) -> "Recorder":
    try:
      if self._progress_bar:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=self.schedule.num_rounds, desc="rounds", unit="round", dynamic_ncols=True)
      if self._metrics_path is not None:
        self._sink = open(self._metrics_path, "w")
        for record in self.progress.history:  # a resumed run: the checkpoint's records
          self._sink.write(json.dumps(record) + "\n")
        self._sink.flush()
      for record in self.progress.history:  # trackers open their files afresh: give them the checkpoint's rounds
        for tracker in self._trackers:
          tracker.write(record)
      if self._bar is not None and self.start_round:
        self._bar.update(min(self.start_round, self.schedule.num_rounds))
      if self._checkpoints is not None:
        self._signals = SignalCatcher().__enter__()
    except BaseException:
      self.close(failing=True)
      raise
    return self

  def __exit__(self, exc_type, exc, traceback) -> bool:
    self.close(failing=exc_type is not None)
    return False

  def record(self, round_num: int, flat: dict, *, num_real_clients: int, seconds: float,
             state: PyTree | None) -> None:
    """Records round ``round_num`` (``flat``: its flattened metrics, with ``'round'``); ``state`` is the server
    state after it (None inside a scanned dispatch, where the schedule never evaluates)."""
    progress = self.progress
    if self._round_metrics is not None:
      flat.update(self._round_metrics(round_num))
    for key in ("broadcasted_bits", "aggregated_bits"):
      if key in flat:
        progress.cumulative[key] += int(flat[key])
        flat[f"cumulative_{key}"] = progress.cumulative[key]
    flat["round_time_in_seconds"] = seconds
    if self.schedule.privacy is not None:
      flat["privacy/epsilon"] = self.schedule.privacy.epsilon_after(round_num + 1)
      flat["privacy/delta"] = self.schedule.privacy.delta
    if self._example_privacy is not None:
      flat["privacy/example_epsilon"] = self._example_privacy.epsilon_after(round_num + 1)
      flat["privacy/example_delta"] = self._example_privacy.delta
    if round_num == self.start_round:
      self.first_round_seconds = seconds
    if self._evaluate is not None and self.schedule.evaluates_after(round_num):
      assert state is not None, "evaluation rounds end their dispatch"
      eval_start = time.perf_counter()
      flat.update(flatten_metrics(jax.device_get(self._evaluate(state.params)), "evaluation/"))
      flat["evaluation_time_in_seconds"] = time.perf_counter() - eval_start
    progress.history.append(flat)
    progress.rounds_completed = round_num + 1
    self._write(flat)
    self._count_rejected(round_num, flat, num_real_clients)
    if self._on_round_end is not None:
      reason = self._on_round_end(round_num, flat)
      if reason and progress.stopped is None:
        progress.stopped = str(reason)
    if progress.stopped is None and round_num + 1 < self.schedule.num_rounds and not self.schedule.allows(
        round_num + 2):
      progress.stopped = self.schedule.budget_message(round_num + 1)

  def _write(self, flat: dict) -> None:
    if self._sink is not None:
      self._sink.write(json.dumps(flat) + "\n")
      self._sink.flush()
    for tracker in self._trackers:
      tracker.write(flat)
    if self._bar is not None:
      cumulative = self.progress.cumulative
      postfix = {"loss": flat.get("client_work/train/loss"), "acc": flat.get("client_work/train/accuracy"),
                 "test_acc": flat.get("evaluation/accuracy"), "eps": flat.get("privacy/epsilon"),
                 "eps_example": flat.get("privacy/example_epsilon")}
      postfix = {k: f"{v:.4g}" for k, v in postfix.items() if v is not None}
      if any(cumulative.values()):  # communication so far, per direction, in Mibit (training.units)
        postfix.update(units.communication_postfix(cumulative["broadcasted_bits"], cumulative["aggregated_bits"]))
      self._bar.set_postfix(postfix, refresh=False)
      self._bar.update(1)

  def _count_rejected(self, round_num: int, flat: dict, num_real_clients: int) -> None:
    """Warns about a round that trained nothing; stops after ``max_rejected_rounds`` of them in a row."""
    if all_clients_rejected(flat, num_real_clients):
      self.progress.rejected_streak += 1
      message = (f"round {round_num}: every client's update was rejected as non-finite (NaN/Inf loss or "
                 f"update), so the round trained nothing ({self.progress.rejected_streak} such round(s) in a row); "
                 "check the data (finite features, labels within the model's classes) and the learning rates")
      if self.progress.rejected_streak >= self._max_rejected_rounds:
        raise TrainingStalledError(f"{message}. Stopped after {self._max_rejected_rounds} such rounds "
                                   "(max_rejected_rounds).")
      warnings.warn(message + ".", RuntimeWarning, stacklevel=5)  # the caller of run_training
    elif num_real_clients:
      self.progress.rejected_streak = 0

  def end_dispatch(self, state: PyTree) -> bool:
    """After the last round of a dispatch: saves a checkpoint when one is due (the schedule's, or a stop, or a
    signal); after a signal waits for it and raises ``TrainingInterrupted``. Returns True when the run stops."""
    progress = self.progress
    interrupted = self._signals is not None and self._signals.received is not None
    if self._checkpoints is not None and (self.schedule.checkpoints_after(progress.rounds_completed)
                                          or progress.stopped is not None or interrupted):
      self._checkpoints.save(state, progress)
    if interrupted:
      self._checkpoints.wait()
      raise TrainingInterrupted(self._signals.received, progress.rounds_completed, self._checkpoints.directory)
    return progress.stopped is not None

  def close(self, *, failing: bool = False) -> None:
    """Stops catching signals, waits for the last checkpoint, closes the files. A checkpoint that could not be
    written raises ``CheckpointSaveError`` here, unless the run is already ``failing`` (then it warns)."""
    if self._signals is not None:
      self._signals.__exit__(None, None, None)
      self._signals = None
    save_error = None
    if self._checkpoints is not None:
      try:
        self._checkpoints.close()  # waits for the last save
      except CheckpointSaveError as error:
        save_error = error
      self._checkpoints = None
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    if self._sink is not None:
      self._sink.close()
      self._sink = None
    for tracker in self._trackers:
      tracker.close()
    self._trackers = ()
    if save_error is not None:
      if not failing:
        raise save_error
      warnings.warn(str(save_error), RuntimeWarning, stacklevel=2)
