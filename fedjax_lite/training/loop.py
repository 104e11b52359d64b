"""The training loop: sample, pack, run a jitted round, evaluate, record, repeat.

:func:`run_training` drives any algorithm ``Process`` over a :class:`FederatedData` population. It checks its
arguments, then puts three parts together, each in its own module:

* a **driver** runs the rounds: :func:`~fedjax_lite.training.round_driver.drive_rounds` (default) samples and packs
  each round on the host and runs the jitted ``process.next``, the host work of round ``r + 1`` overlapping the
  device work of round ``r``; :func:`~fedjax_lite.training.scanned_driver.drive_scanned_rounds`
  (``rounds_per_dispatch=R``) copies the population to the device once and runs up to ``R`` rounds per dispatch in
  one ``lax.scan``, cohorts and shuffles drawn there;
* the **recorder** (:class:`~fedjax_lite.training.recorder.Recorder`) takes each round's metrics: communication
  totals (``cumulative_broadcasted_bits``, ``cumulative_aggregated_bits``), evaluation, the metrics file, trackers,
  the progress bar, stall detection, ``on_round_end``, checkpoints and signals;
* the **schedule** (:class:`~fedjax_lite.training.schedule.RoundSchedule`) says when to evaluate, checkpoint and
  stop, the same for both drivers.

Rounds, cohorts, shuffles and keys depend only on the seed and the round number, so a run is reproducible: round
``r``'s cohort is sampled from ``(seed, r)`` alone and ``process.next`` gets the key ``fold_in(key(seed), r)``.

With ``checkpoint_dir`` the loop saves a checkpoint (:mod:`fedjax_lite.training.checkpoint`, through
:class:`~fedjax_lite.training.run_checkpoints.RunCheckpoints`) every ``checkpoint_every`` rounds, after the last
round, and when SIGINT/SIGTERM arrives (at the end of the running round or dispatch, then
:class:`~fedjax_lite.training.checkpoint.TrainingInterrupted` is raised); ``resume=True`` continues from the newest
readable checkpoint and ends bit-identical to an uninterrupted run (parameters, every metric except the
``*_time_in_seconds`` wall times, epsilon), or refuses a configuration that differs. A checkpoint that cannot be
written stops the run with :class:`~fedjax_lite.training.checkpoint.CheckpointSaveError` (the rounds' records are in
the metrics file; the previous checkpoint is intact).

A round in which every real client's update was rejected as non-finite (or the server update was) trains nothing:
the loop warns, and after ``max_rejected_rounds`` such rounds in a row raises :class:`TrainingStalledError`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from fedjax_lite.core import validation
from fedjax_lite.core.client_state import ClientStateStore
from fedjax_lite.core.device_rounds import DevicePopulation, build_scanned_rounds, device_sampler
from fedjax_lite.core.federated_data import FederatedData
from fedjax_lite.core.packing import ClientSpec
from fedjax_lite.core.process import Process
from fedjax_lite.core.round_data import check_labels
from fedjax_lite.core.sampling import UniformSampler
from fedjax_lite.core.tree import PyTree
from fedjax_lite.privacy.accounting import PrivacyLedger
from fedjax_lite.systems.rounds import SystemsRounds
from fedjax_lite.training import checkpoint as checkpointing
from fedjax_lite.training.recorder import Recorder, TrainingStalledError, flatten_metrics
from fedjax_lite.training.round_driver import HostRoundPacker, drive_rounds, trace_round
from fedjax_lite.training.run_checkpoints import RunCheckpoints
from fedjax_lite.training.scanned_driver import check_device_training, drive_scanned_rounds
from fedjax_lite.training.schedule import RoundSchedule
from fedjax_lite.training.simulated_time import SimulatedTimeDriver

EvaluateFn = Callable[[PyTree], Mapping[str, Any]]
RoundCallback = Callable[[int, dict], bool | None]
Sampler = Callable[[int], np.ndarray]

__all__ = ["TrainingResult", "TrainingStalledError", "flatten_metrics", "run_training"]


@dataclasses.dataclass(frozen=True)
class TrainingResult:
  """What :func:`run_training` returns.

  Attributes:
    state: the final server state.
    history: one flat metrics dict per round (as written to the metrics file).
    seconds: wall time of the whole loop.
    first_round_seconds: wall time of the first round this call ran (includes compilation).
    stopped_early: the reason the loop stopped before ``num_rounds``, or None.
  """

  state: PyTree
  history: list[dict]
  seconds: float
  first_round_seconds: float
  stopped_early: str | None = None


def run_training(
    process: Process,
    train_data: FederatedData,
    initial_params: PyTree,
    *,
    client_spec: ClientSpec,
    clients_per_round: int | None = None,
    num_rounds: int,
    seed: int = 0,
    evaluate: EvaluateFn | None = None,
    evaluate_every: int = 1,
    metrics_path: str | os.PathLike | None = None,
    progress: bool = True,
    on_round_end: RoundCallback | None = None,
    sample_with_replacement: bool = False,
    sampler: Sampler | None = None,
    rounds_per_dispatch: int | None = None,
    privacy: PrivacyLedger | None = None,
    example_privacy: PrivacyLedger | None = None,
    trackers: Sequence[Any] = (),
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
    checkpoint_keep: int = 3,
    resume: bool = False,
    config: Mapping[str, Any] | None = None,
    extra_state: Mapping[str, Any] | None = None,
    max_rejected_rounds: int = 3,
    num_classes: int | None = None,
    label_key: str = "y",
    client_states: ClientStateStore | None = None,
    round_packer: Callable[..., tuple[PyTree, int]] | None = None,
    systems: SystemsRounds | None = None,
) -> TrainingResult:
  """Trains ``process`` for ``num_rounds`` rounds; see the module docstring.

  Args:
    process: an algorithm ``Process`` whose ``next(state, round_data, rng, client_states=None) ->
      RoundOutput(state, metrics, client_states)``.
    train_data: the client population.
    initial_params: passed to ``process.init``.
    client_spec: batch size, epochs and step cap of local training.
    clients_per_round: cohort size of uniform sampling (give this or ``sampler``).
    num_rounds: rounds to run.
    seed: the run's seed: cohorts, shuffles and keys derive from ``(seed, round)``.
    evaluate: optional ``params -> metrics`` (e.g. centralized test accuracy), recorded under ``evaluation/``.
    evaluate_every: evaluate every this many rounds (and always after the last).
    metrics_path: optional JSON-lines file receiving one flat metrics dict per round.
    progress: show a tqdm progress bar: rounds done, loss, accuracies, epsilon and the mebibits sent so far in
      each direction (``down_Mibit``, ``up_Mibit``; :mod:`fedjax_lite.training.units`).
    on_round_end: optional ``callback(round_num, flat_metrics)``; returning a string stops training with that
      reason.
    sample_with_replacement: sample cohorts with replacement (with ``clients_per_round``).
    sampler: ``round_num -> client indices`` with a ``cohort_capacity`` (``core.sampling.UniformSampler``,
      ``PoissonSampler``, ``ShuffledCyclicSampler``). Rounds are padded to ``cohort_capacity`` client slots, so
      varying cohort sizes share one compiled round; a larger cohort is padded to the next power of two.
    rounds_per_dispatch: None (default): the per-round loop above, sampling and packing on the host. An int
      ``R >= 1``: whole training on the device (see the module docstring): the population is copied to the device
      once and up to ``R`` rounds run per dispatch in one ``lax.scan``, cohorts drawn by the device counterpart of
      the sampler (:func:`~fedjax_lite.core.device_rounds.device_sampler`). Refused with one clear error for
      processes with per-client state, host-only samplers (any other callable), ``round_packer``, and data that
      does not fit in the device's memory (when the device reports it). ``round_time_in_seconds`` is then the
      dispatch's wall time divided by its rounds, and ``first_round_seconds`` the first dispatch's wall time
      (compilation included).
    privacy: optional :class:`~fedjax_lite.privacy.PrivacyLedger`: each round records ``privacy/epsilon`` (spent
      so far, at ``privacy/delta``), and with an ``epsilon_budget`` training stops before the round that would
      exceed it, giving the reason in ``stopped_early``.
    example_privacy: optional example-level :class:`~fedjax_lite.privacy.PrivacyLedger` (of
      :func:`~fedjax_lite.privacy.example_level_run_events`, for a process with ``example_dp``): each round records
      ``privacy/example_epsilon`` (at ``privacy/example_delta``) of one example of a client that took part in every
      round so far (an upper bound for every client); it has no budget (build it without ``epsilon_budget``).
    trackers: objects with ``write(flat_metrics)`` and ``close()`` receiving every round's record (CSV,
      TensorBoard, ...: :mod:`fedjax_lite.training.tracking`); closed when the loop ends.
    checkpoint_dir: optional directory of checkpoints (orbax): saved every ``checkpoint_every`` rounds, after the
      last round and on SIGINT/SIGTERM; see :mod:`fedjax_lite.training.checkpoint`. The run holds the directory's
      lock file: a directory another running process writes, or one that cannot be written, is refused
      (``CheckpointInUseError``, ``CheckpointError``) before any training.
    checkpoint_every: rounds between checkpoints (>= 1).
    checkpoint_keep: complete checkpoints kept (>= 1).
    resume: continue from the newest readable checkpoint in ``checkpoint_dir`` (start afresh if there is none;
      unreadable steps are set aside as ``<step>.unreadable`` with a warning). Without it a ``checkpoint_dir``
      that already holds checkpoints is refused. The metrics file is rewritten with the checkpoint's history,
      then continued.
    config: a JSON-able description of everything else that changes the results (model, algorithm,
      hyperparameters; the CLI passes its flags), saved with the checkpoints; resuming with a different one is
      refused (:class:`~fedjax_lite.training.checkpoint.ConfigMismatchError`) naming the differences. The loop
      compares what it knows itself (seed, sampler, client spec, data, initial parameters, privacy ledger) anyway.
    extra_state: name -> state the caller keeps across rounds on the host and wants checkpointed with the server
      state: a store with an ``arrays`` property and ``load(arrays)`` (``core.client_state.ClientStateStore``), or
      a pytree of writeable numpy arrays. Saved with every checkpoint; on resume restored IN PLACE (``load``, or a
      copy into each array), so the caller's references see the restored values.
    max_rejected_rounds: stop with :class:`TrainingStalledError` after this many consecutive rounds in which every
      real client's update (or the server update) was rejected as non-finite (>= 1); each such round warns.
    num_classes: optional: the model's number of classes; integer labels ``train_data[label_key]`` outside
      ``[0, num_classes)`` are refused before training.
    label_key: the label feature checked with ``num_classes``.
    client_states: for a process with per-client state (``process.client_state`` set, e.g. SCAFFOLD): the
      population's :class:`~fedjax_lite.core.ClientStateStore`; default a new one with every client at
      ``process.client_state(initial_params)``. Each round the cohort's states are gathered and passed as
      ``process.next``'s ``client_states`` just before the round runs (after the previous round's states were
      written back) and the real clients' new states are scattered back; the store is checkpointed as
      ``extra_state['client_states']``.
    round_packer: multi-process runs (:meth:`fedjax_lite.training.distributed.ProcessShard.packer`):
      ``round_packer(cohort, *, seed, round_num, num_steps, cohort_size) -> (round data on the devices, real
      clients in the cohort)`` packs this process's share only; default: the whole cohort packed here.
    systems: optional :class:`fedjax_lite.systems.SystemsRounds`: synchronous rounds with client systems on a
      simulated clock (dropout, over-selection with a deadline, stragglers' partial work;
      :mod:`fedjax_lite.training.simulated_time`). With ``clients_per_round=m`` each round selects
      ``ceil(f * m)`` clients and keeps at most ``m``; every record gets the ``systems/`` metrics
      (``systems/round_seconds``, ``systems/elapsed_hours``, ...). Not with ``rounds_per_dispatch`` or
      ``round_packer``.

  Raises:
    TrainingStalledError: ``max_rejected_rounds`` rounds in a row trained nothing.
    fedjax_lite.training.checkpoint.TrainingInterrupted: SIGINT/SIGTERM arrived (the checkpoint is saved).
    fedjax_lite.training.checkpoint.CheckpointSaveError: a checkpoint could not be written (disk full, directory
      made read-only): the rounds run are in the metrics file, the previous checkpoint is intact.
  """
  sampler = _checked_sampler(train_data, clients_per_round, sampler, sample_with_replacement, seed)
  simulated_time = None
  if systems is not None:
    if rounds_per_dispatch is not None or round_packer is not None:
      raise ValueError("systems (simulated client systems) runs rounds packed on the host: not with "
                       "rounds_per_dispatch or round_packer.")
    simulated_time = SimulatedTimeDriver(systems, train_data=train_data, client_spec=client_spec,
                                         clients_per_round=clients_per_round, sampler=sampler, seed=seed,
                                         sample_with_replacement=sample_with_replacement, privacy=privacy)
    sampler = simulated_time.sampler
  trackers = tuple(trackers)
  _check_arguments(process, client_spec, num_rounds=num_rounds, seed=seed, evaluate_every=evaluate_every,
                   checkpoint_every=checkpoint_every, checkpoint_keep=checkpoint_keep,
                   max_rejected_rounds=max_rejected_rounds, privacy=privacy, trackers=trackers, resume=resume,
                   checkpoint_dir=checkpoint_dir, config=config, example_privacy=example_privacy)
  if rounds_per_dispatch is not None:
    validation.check_int("rounds_per_dispatch", rounds_per_dispatch, minimum=1)
    check_device_training(process, sampler, round_packer, train_data, client_spec)
    sampler = device_sampler(sampler)
  extra_state = dict(extra_state or {})
  client_states = _client_state_store(process, train_data, initial_params, client_states, extra_state,
                                      sample_with_replacement=sample_with_replacement, round_packer=round_packer)
  checkpointing.check_extra_state(extra_state)
  if num_classes is not None:
    check_labels(train_data.examples, num_classes, label_key=label_key, name="train_data",
                 client_ids=train_data.client_ids, client_offsets=train_data.offsets)

  num_steps = client_spec.max_num_steps(train_data)
  schedule = RoundSchedule(num_rounds, evaluate_every if evaluate is not None else None,
                           checkpoint_every if checkpoint_dir is not None else None, privacy)
  if rounds_per_dispatch is None:
    next_fn = jax.jit(process.next, donate_argnums=(0,))
    pack = HostRoundPacker(train_data, client_spec, sampler, seed=seed, num_steps=num_steps, round_packer=round_packer,
                           simulated_time=simulated_time)
  else:  # the population on the device once; rounds drawn there
    scanned_rounds = build_scanned_rounds(
        process, DevicePopulation.from_data(train_data, client_spec, num_steps=num_steps), sampler, seed=seed)
  # A private copy: the jitted round donates its input state, which must not invalidate the caller's arrays.
  state = jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, process.init(initial_params))
  if simulated_time is not None:  # the round's per-client bits; the systems join the run's configuration
    config = simulated_time.start(trace_round(next_fn, state, jax.random.key(seed)), num_steps=num_steps,
                                  client_states=client_states, config=config)
  checkpoints = resumed = None
  if checkpoint_dir is not None:
    run = checkpointing.describe_run(
        seed=seed, sampler=sampler, client_spec=client_spec, num_steps=num_steps, evaluate_every=evaluate_every,
        train_data=train_data, initial_params=initial_params, privacy=privacy, extra_names=list(extra_state))
    checkpoints = RunCheckpoints(checkpoint_dir, keep=checkpoint_keep, run=run, config=config, privacy=privacy,
                                 extra_state=extra_state)
    try:
      state, resumed = checkpoints.restore(state, resume=resume)
    except BaseException:
      checkpoints.close()
      raise
  if simulated_time is not None:  # the clock continues from the (restored) history
    simulated_time.restore(resumed.history if resumed is not None else [])
  recorder = Recorder(schedule, evaluate=evaluate, metrics_path=metrics_path, trackers=trackers, progress_bar=progress,
                      on_round_end=on_round_end, max_rejected_rounds=max_rejected_rounds, checkpoints=checkpoints,
                      resumed=resumed, round_metrics=simulated_time.metrics if simulated_time is not None else None,
                      example_privacy=example_privacy)
  with recorder:
    start = time.perf_counter()
    if rounds_per_dispatch is None:
      state = drive_rounds(next_fn, state, recorder, pack, seed=seed, client_states=client_states)
    else:
      state = drive_scanned_rounds(scanned_rounds, state, recorder, rounds_per_dispatch=rounds_per_dispatch,
                                   capacity=int(sampler.cohort_capacity))
  return TrainingResult(state=state, history=recorder.progress.history, seconds=time.perf_counter() - start,
                        first_round_seconds=recorder.first_round_seconds, stopped_early=recorder.progress.stopped)


def _checked_sampler(train_data: FederatedData, clients_per_round: int | None, sampler: Sampler | None,
                     sample_with_replacement: bool, seed: int) -> Sampler:
  """The run's sampler: ``sampler`` checked, or uniform sampling of ``clients_per_round`` clients."""
  if not isinstance(train_data, FederatedData):
    raise TypeError(f"train_data must be a FederatedData, got {type(train_data).__name__}.")
  if (clients_per_round is None) == (sampler is None):
    raise ValueError("give exactly one of clients_per_round and sampler.")
  if sampler is None:
    validation.check_int("clients_per_round", clients_per_round, minimum=1)
    if not sample_with_replacement and clients_per_round > train_data.num_clients:
      raise ValueError(f"clients_per_round ({clients_per_round}) must be <= the number of clients "
                       f"({train_data.num_clients}).")
    return UniformSampler(train_data.num_clients, clients_per_round, seed, sample_with_replacement)
  if not (callable(sampler) and hasattr(sampler, "cohort_capacity")):
    raise TypeError("sampler must be callable (round_num -> client indices) with a cohort_capacity, e.g. "
                    "fedjax_lite.core.sampling.PoissonSampler.")
  return sampler


def _check_arguments(process: Process, client_spec: ClientSpec, *, num_rounds: int, seed: int, evaluate_every: int,
                     checkpoint_every: int, checkpoint_keep: int,
                     max_rejected_rounds: int, privacy: PrivacyLedger | None, trackers: tuple, resume: bool,
                     checkpoint_dir: str | os.PathLike | None, config: Mapping[str, Any] | None,
                     example_privacy: PrivacyLedger | None = None) -> None:
  """The arguments of ``run_training`` that need no building: one clear error for the first wrong one."""
  if not isinstance(process, Process):
    raise TypeError(f"process must be a fedjax_lite Process, got {type(process).__name__}.")
  if not isinstance(client_spec, ClientSpec):
    raise TypeError(f"client_spec must be a ClientSpec, got {type(client_spec).__name__}.")
  if privacy is not None and not isinstance(privacy, PrivacyLedger):
    raise TypeError(f"privacy must be a PrivacyLedger, got {type(privacy).__name__}.")
  if example_privacy is not None and not isinstance(example_privacy, PrivacyLedger):
    raise TypeError(f"example_privacy must be a PrivacyLedger, got {type(example_privacy).__name__}.")
  if example_privacy is not None and example_privacy.epsilon_budget is not None:
    raise ValueError("example_privacy is reported, not enforced: build its ledger without an epsilon_budget.")
  for tracker in trackers:
    if not (callable(getattr(tracker, "write", None)) and callable(getattr(tracker, "close", None))):
      raise TypeError(f"trackers must have write(record) and close() methods, got {type(tracker).__name__}.")
  validation.check_int("num_rounds", num_rounds, minimum=1)
  validation.check_int("seed", seed, minimum=0)
  validation.check_int("evaluate_every", evaluate_every, minimum=1)
  validation.check_int("checkpoint_every", checkpoint_every, minimum=1)
  validation.check_int("checkpoint_keep", checkpoint_keep, minimum=1)
  validation.check_int("max_rejected_rounds", max_rejected_rounds, minimum=1)
  if not isinstance(resume, bool):
    raise TypeError(f"resume must be a bool, got {type(resume).__name__}.")
  if resume and checkpoint_dir is None:
    raise ValueError("resume=True needs a checkpoint_dir.")
  if config is not None and not isinstance(config, Mapping):
    raise TypeError(f"config must be a mapping (JSON-able), got {type(config).__name__}.")


def _client_state_store(process: Process, train_data: FederatedData, initial_params: PyTree,
                        client_states: ClientStateStore | None, extra_state: dict, *, sample_with_replacement: bool,
                        round_packer: Any) -> ClientStateStore | None:
  """The population's client-state store for a process with per-client state (None without), checkpointed as
  ``extra_state['client_states']``."""
  if process.client_state is None:
    if client_states is not None:
      raise ValueError("client_states was given but the process keeps no per-client state (process.client_state "
                       "is None).")
    return None
  if sample_with_replacement:
    raise ValueError("this algorithm keeps per-client state, one per client and round: sample clients without "
                     "replacement (sample_with_replacement=False).")
  if client_states is None:
    client_states = ClientStateStore(process.client_state(initial_params), train_data.num_clients)
  elif not isinstance(client_states, ClientStateStore):
    raise TypeError(f"client_states must be a ClientStateStore, got {type(client_states).__name__}.")
  elif client_states.num_clients != train_data.num_clients:
    raise ValueError(f"client_states holds {client_states.num_clients} clients but train_data has "
                     f"{train_data.num_clients}.")
  if "client_states" in extra_state:
    raise ValueError("extra_state must not use the name 'client_states' (the loop checkpoints the client-state "
                     "store under it).")
  extra_state["client_states"] = client_states
  if round_packer is not None:
    raise ValueError("round_packer (multi-process) does not support per-client state (process.client_state).")
  return client_states
