"""FedBuff's driver: the event order planned on the host, one jitted server step per ``K`` arrivals on the device.

:func:`run_fed_buff` runs :func:`fedjax_lite.algorithms.fed_buff` for a number of server steps or a simulated-time
budget, with the same parts as :func:`~fedjax_lite.training.run_training` -- a server step in place of a round:

1. the host simulates the in-flight clients on the simulated clock until ``K`` updates have arrived
   (:class:`fedjax_lite.systems.BufferedSchedule`; task durations from the clients' systems and the exact
   per-client bits, :func:`fedjax_lite.systems.task_seconds_of`) and packs those ``K`` clients' data in arrival
   order (:class:`BufferedPacker`: ``ClientSpec.pack(..., round_num=s)``, the step axis sized for the whole
   population: one shape, one compilation);
2. the round driver (:func:`~fedjax_lite.training.round_driver.drive_rounds`) dispatches the jitted ``next`` with
   the key ``fold_in(key(seed), s)`` and the versions the arrivals downloaded, and plans and packs step ``s + 1``
   while the device works;
3. the :class:`~fedjax_lite.training.recorder.Recorder` takes the step's metrics -- its ``next`` metrics
   (flattened) plus the event order's ``fedbuff/`` metrics (server steps, arrivals, dropped stale, dropped offline,
   mean staleness, simulated time; the schedule's step is TAKEN here, so the schedule's position is always the
   steps recorded) -- and does what it does for ``run_training``: communication totals, evaluation, the metrics
   file, csv/TensorBoard trackers, the progress bar, stall detection, ``privacy/epsilon`` from a ledger (and the
   budget's stop), checkpoints and SIGINT/SIGTERM.

**Privacy.** Each server step is one aggregation of ``K`` client updates, and a client is in at most one step's
buffer at a time, but who arrives is set by the clients' speeds, not by sampling: the valid accounting is one
UNAMPLIFIED event per server step (the aggregator's ``dp_event()`` composed over the steps,
``sampled_run_events(event, sampling='all')``), which :func:`fed_buff_privacy` builds; ``run_fed_buff`` refuses a
ledger with other events (a sampled one would report an epsilon the run does not have).

**Checkpoints.** A checkpoint holds the :class:`~fedjax_lite.algorithms.FedBuffState` (params, optimizer and
aggregator states, the ring of versions) and the records so far. The event order is NOT stored: it is a
deterministic function of the seed, the task durations and the availability model (its client draws and dropouts
come from ``(seed, start instant)``), so resuming replays the schedule to the checkpoint's step on the host --
cheap next to one server step -- and checks every replayed step's ``fedbuff/`` metrics against the checkpoint's
records (any difference is refused). The device keys come from ``(seed, step)``, so a resumed run ends
bit-identical to an uninterrupted one (params, schedule position, every metric except wall times).

The run is deterministic given the seed: the event order depends only on the task durations, the availability
and the seed.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from fedjax_lite.algorithms.fed_buff import FedBuff, FedBuffState
from fedjax_lite.core import validation
from fedjax_lite.core.federated_data import FederatedData
from fedjax_lite.core.packing import ClientSpec
from fedjax_lite.core.round_data import RoundDataChecker
from fedjax_lite.core.tree import PyTree
from fedjax_lite.privacy.accounting import AccountantSpec, PrivacyLedger, sampled_run_events
from fedjax_lite.systems.buffered import BufferedSchedule, step_metrics, task_seconds_of
from fedjax_lite.systems.population import ClientSystems
from fedjax_lite.training import checkpoint as checkpointing
from fedjax_lite.training.recorder import Recorder, check_recording_arguments
from fedjax_lite.training.round_driver import PackedRound, drive_rounds
from fedjax_lite.training.run_checkpoints import Progress, open_checkpoints
from fedjax_lite.training.schedule import RoundSchedule

ARRIVALS, VERSIONS = "arrivals", "versions"  # the packed step handed to the jitted step: the K clients, their versions
INIT_STREAM = 0x1B1F  # version 0's broadcast key is fold_in(key(seed), INIT_STREAM)

__all__ = ["BufferedPacker", "FedBuffRun", "fed_buff_privacy", "run_fed_buff"]


@dataclasses.dataclass
class FedBuffRun:
  """What :func:`run_fed_buff` returns.

  Attributes:
    state: the final :class:`~fedjax_lite.algorithms.FedBuffState` (params, optimizer state, version, ring).
    schedule: the :class:`~fedjax_lite.systems.BufferedSchedule` after the run: its position (``steps_taken``:
      the steps recorded), in-flight clients, simulated time and totals (continue the run by passing it back with
      the state).
    history: one flat metrics dict per server step (``step`` and ``round`` from 0), Python scalars; a resumed run's
      includes the checkpoint's steps, a continued run's (``state``/``schedule`` given) only this call's (its
      ``cumulative_*_bits`` count from the call's first step).
    seconds: wall time of the loop.
    stopped_early: why the run stopped before ``num_server_steps`` (privacy budget, ``on_round_end``), or None.
  """

  state: FedBuffState
  schedule: BufferedSchedule
  history: list[dict[str, Any]]
  seconds: float = 0.0
  stopped_early: str | None = None


def fed_buff_privacy(process: FedBuff, *, delta: float, accountant: AccountantSpec = "rdp",
                     epsilon_budget: float | None = None) -> PrivacyLedger:
  """FedBuff's privacy ledger: one unamplified event per server step (module docstring).

  ``epsilon_after(s)`` is the epsilon at ``delta`` of ``SelfComposedDpEvent(process.aggregator.dp_event(), s)``
  (every client may be in every step: no sampling amplification), under add-or-remove-one adjacency. Pass it as
  ``run_fed_buff(privacy=...)``: each step then records ``privacy/epsilon``, and with ``epsilon_budget`` the run
  stops before the step that would exceed it.

  Raises:
    ValueError: ``process``'s aggregator is not differentially private.
  """
  if not isinstance(process, FedBuff):
    raise TypeError(f"process must be a FedBuff (algorithms.fed_buff(...)), got {type(process).__name__}.")
  return PrivacyLedger(sampled_run_events(_step_event(process), sampling="all"), delta, accountant=accountant,
                       epsilon_budget=epsilon_budget)


def _step_event(process: FedBuff):
  if getattr(process.aggregator, "dp_event", None) is None:
    raise ValueError("privacy accounting needs a differentially private aggregator (e.g. "
                     "aggregators.gaussian_fixed(noise_multiplier, K, clip)); this FedBuff's aggregator has no "
                     "dp_event().")
  return process.aggregator.dp_event()


def _check_ledger(process: FedBuff, ledger: PrivacyLedger) -> None:
  """A ledger for FedBuff must account the unamplified per-step event of its aggregator."""
  expected = sampled_run_events(_step_event(process), sampling="all")
  if (ledger.run.neighboring_relation != expected.neighboring_relation
      or ledger.run.event_after(1) != expected.event_after(1)):
    raise ValueError(f"privacy must account one unamplified event per server step of this FedBuff's aggregator "
                     f"(fed_buff_privacy(process, delta=...)): FedBuff's participation follows the clients' speeds, "
                     f"not sampling, so no amplification by sampling applies; got a ledger of "
                     f"{ledger.run.description or 'other events'}.")


@dataclasses.dataclass(frozen=True)
class EventOrder:
  """What the event order depends on besides the seed: compared when a run resumes (its checkpoints'
  ``run['sampler']``)."""

  concurrency: int
  buffer_size: int
  max_staleness: int
  availability: dict
  task_seconds_sha256: str


def describe_event_order(schedule: BufferedSchedule) -> EventOrder:
  return EventOrder(concurrency=schedule.concurrency, buffer_size=schedule.buffer_size,
                    max_staleness=schedule.max_staleness, availability=schedule.availability.describe(),
                    task_seconds_sha256=hashlib.sha256(schedule.task_seconds.tobytes()).hexdigest())


class BufferedPacker:
  """``step -> PackedRound``: server step ``step``'s ``K`` arrivals (planned, not taken, from the schedule) packed
  in arrival order, with the versions they downloaded -- what :func:`~fedjax_lite.training.round_driver.drive_rounds`
  hands the jitted step (``{'arrivals': packed K clients, 'versions': int32 [K]}``).

  The recorder takes the step from the schedule (:meth:`step_metrics`), so a step packed ahead but never run
  leaves the schedule where the recorded steps end.
  """

  def __init__(self, schedule: BufferedSchedule, data: FederatedData, client_spec: ClientSpec, *, seed: int,
               num_steps: int):
    self.schedule = schedule
    self._data = data
    self._client_spec = client_spec
    self._seed = seed
    self._num_steps = num_steps
    self._check_round = RoundDataChecker("round_data")

  def __call__(self, step_num: int) -> PackedRound:
    step = self.schedule.planned(step_num)
    packed = self._client_spec.pack(self._data, step.clients, seed=self._seed, round_num=step_num,
                                    num_steps=self._num_steps, cohort_size=self.schedule.buffer_size)
    self._check_round(packed)  # once per shape
    num_examples = np.asarray(packed["num_examples"])
    placed = jax.device_put({ARRIVALS: packed, VERSIONS: step.versions.astype(np.int32)})
    return PackedRound(placed, int(np.count_nonzero(num_examples)), step.clients, num_examples)

  def step_metrics(self, step_num: int) -> dict[str, Any]:
    """Takes step ``step_num`` from the schedule; its ``step`` number and ``fedbuff/`` metrics (the recorder's
    ``round_metrics``)."""
    step = self.schedule.next_step()
    assert step.step == step_num, (step.step, step_num)
    return {"step": step_num, **step_metrics(step)}


def run_fed_buff(
    process: FedBuff,
    data: FederatedData,
    params: PyTree,
    *,
    client_spec: ClientSpec,
    seed: int = 0,
    num_server_steps: int | None = None,
    simulated_seconds: float | None = None,
    systems: ClientSystems | None = None,
    task_seconds: np.ndarray | None = None,
    num_steps: int | None = None,
    state: FedBuffState | None = None,
    schedule: BufferedSchedule | None = None,
    evaluate: Callable[[PyTree], Mapping[str, Any]] | None = None,
    evaluate_every: int = 1,
    metrics_path: str | os.PathLike | None = None,
    progress: bool = False,
    on_round_end: Callable[[int, dict], Any] | None = None,
    privacy: PrivacyLedger | None = None,
    trackers: Sequence[Any] = (),
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
    checkpoint_keep: int = 3,
    resume: bool = False,
    config: Mapping[str, Any] | None = None,
    max_rejected_rounds: int = 3,
) -> FedBuffRun:
  """Runs FedBuff (module docstring) until ``num_server_steps`` steps or the last step within ``simulated_seconds``.

  Args:
    process: :func:`fedjax_lite.algorithms.fed_buff`.
    data: the training population.
    params: the initial params (ignored when ``state`` is given).
    client_spec: batch size, epochs, step cap of every client task.
    seed: the run's seed (event order, client draws, packing, keys).
    num_server_steps: the run ends after this many server steps in all (counted from the run's step 0: a resumed
      or continued run runs the steps still missing).
    simulated_seconds: the run ends with its last server step at or before this simulated time (from the run's
      start). At least one of the two limits.
    systems: the clients' systems (durations from the exact per-client bits; availability ``AlwaysOn()``,
      ``RandomDropout(p)`` or ``AvailabilityWindows``: :class:`~fedjax_lite.systems.BufferedSchedule`); or
      ``task_seconds``: float64 ``[num_clients]`` durations of always-on clients. Exactly one (not with
      ``schedule``).
    num_steps: the packed step axis (default ``client_spec.max_num_steps(data)``: one shape for every step).
    state, schedule: continue a previous run (:class:`FedBuffRun`'s fields), both or neither; not with
      ``checkpoint_dir``. The state is copied once and the copy's buffers are donated step after step, so
      ``state`` stays valid; the schedule is advanced in place.
    evaluate: optional ``params -> metrics`` recorded under ``evaluation/`` every ``evaluate_every`` steps and
      after the last.
    metrics_path, progress, on_round_end, trackers, max_rejected_rounds: as for
      :func:`~fedjax_lite.training.run_training` (a server step in place of a round; ``on_round_end(step,
      record)``). ``progress`` is off by default.
    privacy: optional ledger from :func:`fed_buff_privacy` (others are refused): each step records
      ``privacy/epsilon`` and ``privacy/delta``; with an ``epsilon_budget`` the run stops before the step that would
      exceed it (``stopped_early``).
    checkpoint_dir, checkpoint_every, checkpoint_keep, resume, config: checkpoints as for
      :func:`~fedjax_lite.training.run_training`, every ``checkpoint_every`` server steps, after the last and on
      SIGINT/SIGTERM; ``resume=True`` continues from the newest readable checkpoint (module docstring: the event
      order is replayed and checked) and ends bit-identical to an uninterrupted run. The checkpoint's run
      description includes the event order's configuration (:class:`EventOrder`); a different one is refused.

  Raises:
    TrainingStalledError, TrainingInterrupted, CheckpointSaveError: as ``run_training``.
    RuntimeError: the event order cannot go on (availability windows under which no client is ever online again,
      or under which every task is aborted: :class:`~fedjax_lite.systems.BufferedSchedule`).
  """
  if not isinstance(process, FedBuff):
    raise TypeError(f"process must be a FedBuff (algorithms.fed_buff(...)), got {type(process).__name__}.")
  if not isinstance(data, FederatedData):
    raise TypeError(f"data must be a FederatedData, got {type(data).__name__}.")
  if not isinstance(client_spec, ClientSpec):
    raise TypeError(f"client_spec must be a ClientSpec, got {type(client_spec).__name__}.")
  validation.check_int("seed", seed, minimum=0)
  validation.check_int("num_server_steps", num_server_steps, minimum=1, allow_none=True)
  validation.check_positive("simulated_seconds", simulated_seconds, allow_none=True)
  if num_server_steps is None and simulated_seconds is None:
    raise ValueError("give num_server_steps or simulated_seconds (or both): FedBuff runs until one is reached.")
  if (state is None) != (schedule is None):
    raise ValueError("give both state and schedule (a previous FedBuffRun's), or neither.")
  if on_round_end is not None and not callable(on_round_end):
    raise TypeError(f"on_round_end must be a function (step, record) -> stop reason or None, got "
                    f"{type(on_round_end).__name__}.")
  if evaluate is not None and not callable(evaluate):
    raise TypeError(f"evaluate must be a function params -> metrics, got {type(evaluate).__name__}.")
  trackers = tuple(trackers)
  check_recording_arguments(evaluate_every=evaluate_every, checkpoint_every=checkpoint_every,
                            checkpoint_keep=checkpoint_keep, max_rejected_rounds=max_rejected_rounds,
                            privacy=privacy, trackers=trackers, resume=resume, checkpoint_dir=checkpoint_dir,
                            config=config)
  if privacy is not None:
    _check_ledger(process, privacy)
  if schedule is not None and checkpoint_dir is not None:
    raise ValueError("continue a run either from its state and schedule or from its checkpoint_dir, not both.")
  continued = schedule is not None
  if schedule is None:
    schedule = _new_schedule(process, data, params, client_spec, seed=seed, systems=systems,
                             task_seconds=task_seconds)
    state = process.init(params, jax.random.fold_in(jax.random.key(seed), INIT_STREAM))
  elif not isinstance(schedule, BufferedSchedule) or schedule.num_clients != data.num_clients:
    raise ValueError("schedule must be the BufferedSchedule of a previous run on the same population.")
  elif not isinstance(state, FedBuffState):
    raise TypeError(f"state must be a FedBuffState (a previous FedBuffRun's), got {type(state).__name__}.")
  elif systems is not None or task_seconds is not None:
    raise ValueError("a continued run (schedule given) keeps its schedule's durations: leave systems and "
                     "task_seconds unset.")
  num_steps = client_spec.max_num_steps(data) if num_steps is None else num_steps
  validation.check_int("num_steps", num_steps, minimum=1)
  state = jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)  # the loop donates its buffers

  checkpoints = resumed = None
  if checkpoint_dir is not None:
    run = checkpointing.describe_run(
        seed=seed, sampler=describe_event_order(schedule), client_spec=client_spec, num_steps=num_steps,
        evaluate_every=evaluate_every, train_data=data, initial_params=params, privacy=privacy, extra_names=[])
    checkpoints, state, resumed = open_checkpoints(checkpoint_dir, state, keep=checkpoint_keep, run=run,
                                                   config=config, privacy=privacy, extra_state={}, resume=resume)
    if resumed is not None:
      try:
        _replay(schedule, resumed.history, checkpoints.directory)
      except BaseException:
        checkpoints.close()
        raise
  elif continued:
    resumed = Progress(rounds_completed=schedule.steps_taken)
  start_step = schedule.steps_taken
  total = _steps_within(schedule, num_server_steps, simulated_seconds)
  round_schedule = RoundSchedule(max(total, start_step), evaluate_every if evaluate is not None else None,
                                 checkpoint_every if checkpoint_dir is not None else None, privacy)
  packer = BufferedPacker(schedule, data, client_spec, seed=seed, num_steps=num_steps)
  recorder = Recorder(round_schedule, evaluate=evaluate, metrics_path=metrics_path, trackers=trackers,
                      progress_bar=progress, on_round_end=on_round_end, max_rejected_rounds=max_rejected_rounds,
                      checkpoints=checkpoints, resumed=resumed, round_metrics=packer.step_metrics)
  started = time.perf_counter()
  with recorder:
    state = drive_rounds(_jitted(process), state, recorder, packer, seed=seed)
  history = recorder.progress.history
  return FedBuffRun(state=state, schedule=schedule, history=history, seconds=time.perf_counter() - started,
                    stopped_early=recorder.progress.stopped)


def _new_schedule(process: FedBuff, data: FederatedData, params: PyTree, client_spec: ClientSpec, *, seed: int,
                  systems: ClientSystems | None, task_seconds: np.ndarray | None) -> BufferedSchedule:
  if (systems is None) == (task_seconds is None):
    raise ValueError("give exactly one of systems (a ClientSystems) or task_seconds (float64 [num_clients]).")
  if systems is not None:
    if not isinstance(systems, ClientSystems):
      raise TypeError(f"systems must be a ClientSystems, got {type(systems).__name__}.")
    download, upload = process.bits_per_client(params)
    task_seconds = task_seconds_of(systems, data, client_spec, download_bits=download, upload_bits=upload)
  elif np.shape(task_seconds) != (data.num_clients,):
    raise ValueError(f"task_seconds must have one duration per client ({data.num_clients}), got shape "
                     f"{np.shape(task_seconds)}.")
  return BufferedSchedule(task_seconds, concurrency=process.concurrency, buffer_size=process.buffer_size,
                          max_staleness=process.max_staleness, seed=seed,
                          availability=None if systems is None else systems.availability)


def _steps_within(schedule: BufferedSchedule, num_server_steps: int | None, simulated_seconds: float | None) -> int:
  """The run's last step count: ``num_server_steps``, or fewer when a step after them lies past
  ``simulated_seconds`` (found on a copy of the schedule, so the schedule itself plans only what runs)."""
  limit = math.inf if num_server_steps is None else num_server_steps
  if simulated_seconds is None:
    return int(limit)
  ahead = copy.deepcopy(schedule)
  steps = ahead.steps_taken
  while steps < limit and ahead.peek_time() <= simulated_seconds:
    ahead.next_step()
    steps += 1
  return steps


def _replay(schedule: BufferedSchedule, history: list[Mapping[str, Any]], directory: Any) -> None:
  """Replays the event order to the checkpoint's step, each step's ``fedbuff/`` metrics checked against its record."""
  for record in history:
    replayed = step_metrics(schedule.next_step())
    saved = {key: record.get(key) for key in replayed}
    if replayed != saved:
      differing = sorted(key for key in replayed if replayed[key] != saved[key])
      raise checkpointing.CheckpointError(
          f"the event order replayed from the seed differs from the one of the checkpoint in {directory} at server "
          f"step {record.get('step')} ({', '.join(f'{k}: {saved[k]} saved, {replayed[k]} replayed' for k in differing[:3])}):"
          " the task durations or the availability differ from the checkpointed run's.")


_JITTED: dict[int, tuple[FedBuff, Callable]] = {}


def _jitted(process: FedBuff) -> Callable:
  """The jitted step as the round driver calls it, ``(state, {'arrivals', 'versions'}, rng, client_states=None)
  -> RoundOutput`` (``process.next`` with the arrivals' versions), the state donated (the ring's row is written in
  place, not copied); once per process (a second run of the same process does not recompile)."""
  key = id(process)
  if key not in _JITTED or _JITTED[key][0] is not process:

    def step(state: FedBuffState, round_data: dict, rng: jax.Array, client_states: None = None):
      del client_states  # FedBuff keeps no per-client state
      return process.next(state, round_data[ARRIVALS], rng, round_data[VERSIONS])

    _JITTED[key] = (process, jax.jit(step, donate_argnums=0))
  return _JITTED[key][1]
