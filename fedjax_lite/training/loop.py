"""The training loop: sample, pack, run a jitted round, evaluate, record, repeat.

:func:`run_training` drives any algorithm ``Process`` over a :class:`FederatedData` population. Each round:

1. the cohort is sampled from ``(seed, round)`` alone (:func:`fedjax_lite.core.sampling.sample_clients`);
2. its clients are packed on the host into one fixed shape (the step axis sized for the largest client of the
   whole population, so the round compiles once);
3. the jitted ``process.next`` runs with the key ``fold_in(key(seed), round)``;
4. metrics are fetched and written, with the communication totals so far (``cumulative_broadcasted_bits``,
   ``cumulative_aggregated_bits``) when the algorithm reports its bits.

The host work of round ``r + 1`` (sampling and packing) overlaps the device work of round ``r``: the next round is
dispatched before the previous round's metrics are read. Rounds, cohorts, shuffles and keys depend only on the
seed and the round number, so a run is reproducible.

With ``checkpoint_dir`` the loop saves a checkpoint (:mod:`fedjax_lite.training.checkpoint`) every
``checkpoint_every`` rounds, after the last round, and when SIGINT/SIGTERM arrives (at the end of the running round,
then :class:`~fedjax_lite.training.checkpoint.TrainingInterrupted` is raised); ``resume=True`` continues from the
last complete checkpoint and ends bit-identical to an uninterrupted run (parameters, every metric except the
``*_time_in_seconds`` wall times, epsilon), or refuses a configuration that differs.

A round in which every real client's update was rejected as non-finite (or the server update was) trains nothing:
the loop warns, and after ``max_rejected_rounds`` such rounds in a row raises :class:`TrainingStalledError`.

Whole training on the device (``rounds_per_dispatch=R``): for a population that fits on the device, its examples
are copied there once (:class:`~fedjax_lite.core.device_rounds.DevicePopulation`) and each dispatch runs up to ``R``
rounds in one compiled ``lax.scan`` (:func:`~fedjax_lite.core.device_rounds.build_scanned_rounds`): cohorts, packing
and shuffles are drawn on the device from the same ``(seed, round)`` keys, so the results do not depend on ``R``
(``R = 1`` is the per-round loop of the same device sampler, bit for bit). The cohorts are drawn by ``jax.random``,
not numpy: the same distribution as the host sampler, not the same clients. Metrics come back stacked per round and
are written exactly as the per-round loop writes them; a dispatch ends at every evaluation and checkpoint round and
before the round the privacy budget forbids, so evaluations and checkpoints see the same states as the per-round
loop. Signals and a stop asked by ``on_round_end`` take effect at the end of the running dispatch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from fedjax_lite.core import validation
from fedjax_lite.core.client_state import ClientStateStore
from fedjax_lite.core.device_rounds import DevicePopulation, build_scanned_rounds, device_sampler
from fedjax_lite.core.federated_data import FederatedData
from fedjax_lite.core.packing import ClientSpec, bucket_num_steps
from fedjax_lite.core.process import Process
from fedjax_lite.core.round_data import RoundDataChecker, check_labels
from fedjax_lite.core.sampling import UniformSampler
from fedjax_lite.core.tree import PyTree
from fedjax_lite.systems.rounds import SystemsRounds
from fedjax_lite.training import checkpoint as checkpointing
from fedjax_lite.training import units
from fedjax_lite.training.simulated_time import SimulatedTimeDriver
from fedjax_lite.privacy.accounting import PrivacyLedger

EvaluateFn = Callable[[PyTree], Mapping[str, Any]]
RoundCallback = Callable[[int, dict], bool | None]
Sampler = Callable[[int], np.ndarray]


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


def _check_device_training(process: Process, sampler: Any, round_packer: Any, train_data: FederatedData,
                           client_spec: ClientSpec) -> None:
  """Refuses, with one clear error, what whole training on the device (``rounds_per_dispatch``) cannot run."""
  if process.client_state is not None:
    raise ValueError("rounds_per_dispatch: this algorithm keeps per-client state on the host "
                     "(process.client_state); run it without rounds_per_dispatch.")
  if round_packer is not None:
    raise ValueError("rounds_per_dispatch cannot be combined with round_packer (multi-process packing on the host).")
  try:
    device_sampler(sampler)
  except TypeError as error:
    raise ValueError(f"rounds_per_dispatch: {error}") from None
  stats = jax.devices()[0].memory_stats() or {}
  limit = stats.get("bytes_limit")
  if limit:
    capacity = int(sampler.cohort_capacity)
    slots = capacity * client_spec.max_num_steps(train_data) * client_spec.batch_size
    per_example = sum(value.nbytes // max(value.shape[0], 1) for value in train_data.examples.values())
    needed = sum(value.nbytes for value in train_data.examples.values()) + slots * (per_example + 1)
    if needed > limit // 2:
      raise ValueError(f"rounds_per_dispatch: the population and one round's data need {needed / 2**30:.2f} GiB, "
                       f"more than half of the device's {limit / 2**30:.2f} GiB; run without rounds_per_dispatch "
                       "(rounds packed on the host).")


class TrainingStalledError(RuntimeError):
  """Raised after ``max_rejected_rounds`` consecutive rounds in which every client's update was rejected."""


def _all_clients_rejected(flat: Mapping[str, Any], num_real_clients: int) -> bool:
  """Every real client of the round was rejected as non-finite, or the server rejected the aggregate."""
  if num_real_clients == 0:
    return False
  if flat.get("finalizer/update_non_finite", 0) == 1:
    return True
  return flat.get("client_work/num_non_finite_clients", 0) >= num_real_clients


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
    process: an algorithm ``Process`` whose ``next(state, round_data, rng) -> (state, metrics)``.
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
    trackers: objects with ``write(flat_metrics)`` and ``close()`` receiving every round's record (CSV,
      TensorBoard, ...: :mod:`fedjax_lite.training.tracking`); closed when the loop ends.
    checkpoint_dir: optional directory of checkpoints (orbax): saved every ``checkpoint_every`` rounds, after the
      last round and on SIGINT/SIGTERM; see :mod:`fedjax_lite.training.checkpoint`.
    checkpoint_every: rounds between checkpoints (>= 1).
    checkpoint_keep: complete checkpoints kept (>= 1).
    resume: continue from the last complete checkpoint in ``checkpoint_dir`` (start afresh if there is none).
      Without it a ``checkpoint_dir`` that already holds checkpoints is refused. The metrics file is rewritten
      with the checkpoint's history, then continued.
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
      ``process.client_state(initial_params)``. Each round the cohort's states are gathered into
      ``round_data['client_state']`` just before the round runs (after the previous round's states were written
      back) and the real clients' new states are scattered back; the store is checkpointed as
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
  """
  if not isinstance(process, Process):
    raise TypeError(f"process must be a fedjax_lite Process, got {type(process).__name__}.")
  if not isinstance(train_data, FederatedData):
    raise TypeError(f"train_data must be a FederatedData, got {type(train_data).__name__}.")
  if not isinstance(client_spec, ClientSpec):
    raise TypeError(f"client_spec must be a ClientSpec, got {type(client_spec).__name__}.")
  if (clients_per_round is None) == (sampler is None):
    raise ValueError("give exactly one of clients_per_round and sampler.")
  if sampler is None:
    validation.check_int("clients_per_round", clients_per_round, minimum=1)
    if not sample_with_replacement and clients_per_round > train_data.num_clients:
      raise ValueError(f"clients_per_round ({clients_per_round}) must be <= the number of clients "
                       f"({train_data.num_clients}).")
    sampler = UniformSampler(train_data.num_clients, clients_per_round, seed, sample_with_replacement)
  elif not (callable(sampler) and hasattr(sampler, "cohort_capacity")):
    raise TypeError("sampler must be callable (round_num -> client indices) with a cohort_capacity, e.g. "
                    "fedjax_lite.core.sampling.PoissonSampler.")
  simulated_time = None
  if systems is not None:
    if rounds_per_dispatch is not None or round_packer is not None:
      raise ValueError("systems (simulated client systems) runs rounds packed on the host: not with "
                       "rounds_per_dispatch or round_packer.")
    simulated_time = SimulatedTimeDriver(systems, train_data=train_data, client_spec=client_spec,
                                         clients_per_round=clients_per_round, sampler=sampler, seed=seed,
                                         sample_with_replacement=sample_with_replacement, privacy=privacy)
    sampler = simulated_time.sampler
  if rounds_per_dispatch is not None:
    validation.check_int("rounds_per_dispatch", rounds_per_dispatch, minimum=1)
    _check_device_training(process, sampler, round_packer, train_data, client_spec)
    sampler = device_sampler(sampler)
  if privacy is not None and not isinstance(privacy, PrivacyLedger):
    raise TypeError(f"privacy must be a PrivacyLedger, got {type(privacy).__name__}.")
  trackers = tuple(trackers)
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
  extra_state = dict(extra_state or {})
  if process.client_state is not None:
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
  elif client_states is not None:
    raise ValueError("client_states was given but the process keeps no per-client state (process.client_state "
                     "is None).")
  checkpointing.check_extra_state(extra_state)
  if config is not None and not isinstance(config, Mapping):
    raise TypeError(f"config must be a mapping (JSON-able), got {type(config).__name__}.")
  if num_classes is not None:
    check_labels(train_data.examples, num_classes, label_key=label_key, name="train_data",
                 client_ids=train_data.client_ids, client_offsets=train_data.offsets)

  num_steps = client_spec.max_num_steps(train_data)
  next_fn = jax.jit(process.next, donate_argnums=(0,))
  base_key = jax.random.key(seed)

  capacity = int(sampler.cohort_capacity) if simulated_time is None else simulated_time.capacity
  check_round = RoundDataChecker("round_data")
  scanned_rounds = None
  if rounds_per_dispatch is not None:  # the population on the device once; rounds drawn there
    scanned_rounds = build_scanned_rounds(
        process, DevicePopulation.from_data(train_data, client_spec, num_steps=num_steps), sampler, seed=seed)
    # Every dispatch is a scan of this length; shorter ones (cut at evaluations, checkpoints, the budget, the end)
    # skip their last rounds (one more compilation in all, whatever their lengths).
    scan_length = min(rounds_per_dispatch, num_rounds, evaluate_every if evaluate is not None else num_rounds,
                      checkpoint_every if checkpoint_dir is not None else num_rounds)

  def prepare(round_num: int):
    if simulated_time is not None:  # the selection planned on the simulated clock; its counted clients packed
      packed, cohort = simulated_time.prepare(round_num, num_steps=num_steps)
      check_round(packed)
      num_examples = np.asarray(packed["num_examples"])
      return jax.device_put(packed), int(np.count_nonzero(num_examples)), (cohort, num_examples)
    cohort = sampler(round_num)
    slots = capacity if len(cohort) <= capacity else bucket_num_steps(len(cohort))
    if round_packer is not None:
      placed, num_real = round_packer(cohort, seed=seed, round_num=round_num, num_steps=num_steps, cohort_size=slots)
      return placed, num_real, (cohort, None)
    packed = client_spec.pack(train_data, cohort, seed=seed, round_num=round_num, num_steps=num_steps,
                              cohort_size=slots)
    check_round(packed)  # once per shape
    num_examples = np.asarray(packed["num_examples"])
    return jax.device_put(packed), int(np.count_nonzero(num_examples)), (cohort, num_examples)

  # A private copy: the jitted round donates its input state, which must not invalidate the caller's arrays.
  state = jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, process.init(initial_params))
  if simulated_time is not None:  # the round's per-client bits; the systems join the run's configuration

    def trace_round(shapes, client_state_shapes):  # traced as the loop calls it: its first call reuses the trace
      if client_state_shapes is not None:
        shapes = dict(shapes, client_state=client_state_shapes)
      return next_fn.trace(state, shapes, base_key).out_info

    config = simulated_time.start(trace_round, num_steps=num_steps, client_states=client_states, config=config)
  history: list[dict] = []
  cumulative = {"broadcasted_bits": 0, "aggregated_bits": 0}
  start_round = 0
  rejected_streak = 0
  checkpointer = None
  if checkpoint_dir is not None:
    run_description = checkpointing.describe_run(
        seed=seed, sampler=sampler, client_spec=client_spec, num_steps=num_steps, evaluate_every=evaluate_every,
        train_data=train_data, initial_params=initial_params, privacy=privacy, extra_names=list(extra_state))
    checkpointer = checkpointing.RunCheckpointer(checkpoint_dir, max_to_keep=checkpoint_keep)
    saved_steps = checkpointer.steps()
    if saved_steps and not resume:
      raise ValueError(f"checkpoint_dir {checkpointer.directory} already holds checkpoints (the last after "
                       f"{saved_steps[-1]} rounds): pass resume=True to continue that run, or use an empty "
                       "directory.")
    restored = None
    if saved_steps:
      templates = {checkpointing.SERVER_STATE: state}
      templates.update({name: checkpointing.extra_state_arrays(value) for name, value in extra_state.items()})
      restored = checkpointer.restore_latest(templates)
    if restored is not None:
      checkpointing.check_resumable(restored, run=run_description, config=config, privacy=privacy,
                                    directory=checkpointer.directory)
      state = restored.trees[checkpointing.SERVER_STATE]
      for name, value in extra_state.items():
        checkpointing.load_extra_state(value, restored.trees[name], name)
      history = list(restored.meta["history"])
      cumulative = dict(restored.meta["cumulative"])
      rejected_streak = int(restored.meta["rejected_streak"])
      start_round = restored.rounds_completed
  if simulated_time is not None:  # the clock continues from the (restored) history
    simulated_time.restore(history)

  def save_checkpoint(rounds_completed: int) -> None:
    trees = {checkpointing.SERVER_STATE: state}
    trees.update({name: checkpointing.extra_state_arrays(value) for name, value in extra_state.items()})
    meta = {"run": run_description, "config": checkpointing._jsonable(dict(config or {})),
            "versions": checkpointing.library_versions(), "history": history, "cumulative": cumulative,
            "rejected_streak": rejected_streak, "next_round": rounds_completed, "stopped_early": stopped,
            "privacy": None if privacy is None else {
                "epsilon": privacy.epsilon_after(rounds_completed), "delta": privacy.delta,
                "rounds": rounds_completed, "accountant": checkpointing.privacy_accountant_name(privacy)}}
    checkpointer.save(rounds_completed, trees, meta)

  def budget_message(rounds_done: int) -> str:
    return (f"privacy budget: another round would bring epsilon to {privacy.epsilon_after(rounds_done + 1):.4g} > "
            f"{privacy.epsilon_budget:g} at delta {privacy.delta:g}; stopped after {rounds_done} rounds at "
            f"epsilon {privacy.epsilon_after(rounds_done):.4g}")

  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=num_rounds, desc="rounds", unit="round", dynamic_ncols=True)

  sink = open(metrics_path, "w") if metrics_path is not None else None
  if sink is not None:
    for record in history:  # a resumed run: the checkpoint's records (later lines of a killed run are dropped)
      sink.write(json.dumps(record) + "\n")
    sink.flush()
  for record in history:  # trackers open their files afresh: give them the checkpoint's rounds too
    for tracker in trackers:
      tracker.write(record)
  if bar is not None and start_round:
    bar.update(min(start_round, num_rounds))
  stopped = None
  start = time.perf_counter()
  first_round_seconds = math.nan
  catcher = checkpointing.SignalCatcher() if checkpointer is not None else None

  def finish_round(round_num: int, flat: dict, num_real_clients: int, round_seconds: float, *,
                   dispatch_end: bool = True) -> bool:
    """Records round ``round_num`` (``flat``: its flattened metrics): evaluation, files, progress bar, stall
    check, callback; at a dispatch's end also checkpoints and signals. Returns True when the loop stops here."""
    nonlocal rejected_streak, stopped, first_round_seconds
    if simulated_time is not None:
      flat.update(simulated_time.metrics(round_num))
    for key in ("broadcasted_bits", "aggregated_bits"):
      if key in flat:
        cumulative[key] += int(flat[key])
        flat[f"cumulative_{key}"] = cumulative[key]
    flat["round_time_in_seconds"] = round_seconds
    if privacy is not None:
      flat["privacy/epsilon"] = privacy.epsilon_after(round_num + 1)
      flat["privacy/delta"] = privacy.delta
    if round_num == start_round:
      first_round_seconds = flat["round_time_in_seconds"]
    budget_reached = privacy is not None and not privacy.allows(round_num + 2)
    last_round = round_num + 1 == num_rounds or budget_reached
    if evaluate is not None and ((round_num + 1) % evaluate_every == 0 or last_round):
      assert dispatch_end, "evaluation rounds end their dispatch"
      eval_start = time.perf_counter()
      flat.update(flatten_metrics(jax.device_get(evaluate(state.params)), "evaluation/"))
      flat["evaluation_time_in_seconds"] = time.perf_counter() - eval_start
    history.append(flat)
    if sink is not None:
      sink.write(json.dumps(flat) + "\n")
      sink.flush()
    for tracker in trackers:
      tracker.write(flat)
    if bar is not None:
      postfix = {"loss": flat.get("client_work/train/loss")}
      if "client_work/train/accuracy" in flat:
        postfix["acc"] = flat["client_work/train/accuracy"]
      if "evaluation/accuracy" in flat:
        postfix["test_acc"] = flat["evaluation/accuracy"]
      if "privacy/epsilon" in flat:
        postfix["eps"] = flat["privacy/epsilon"]
      postfix = {k: f"{v:.4g}" for k, v in postfix.items() if v is not None}
      if any(cumulative.values()):  # communication so far, per direction, in Mibit (training.units)
        postfix.update(units.communication_postfix(cumulative["broadcasted_bits"], cumulative["aggregated_bits"]))
      bar.set_postfix(postfix, refresh=False)
      bar.update(1)
    if _all_clients_rejected(flat, num_real_clients):
      rejected_streak += 1
      message = (f"round {round_num}: every client's update was rejected as non-finite (NaN/Inf loss or "
                 f"update), so the round trained nothing ({rejected_streak} such round(s) in a row); check the "
                 "data (finite features, labels within the model's classes) and the learning rates")
      if rejected_streak >= max_rejected_rounds:
        raise TrainingStalledError(f"{message}. Stopped after {max_rejected_rounds} such rounds "
                                   "(max_rejected_rounds).")
      warnings.warn(message + ".", RuntimeWarning, stacklevel=3)
    elif num_real_clients:
      rejected_streak = 0
    if on_round_end is not None:
      reason = on_round_end(round_num, flat)
      if reason and stopped is None:
        stopped = str(reason)
    if stopped is None and budget_reached and round_num + 1 < num_rounds:
      stopped = budget_message(round_num + 1)
    if not dispatch_end:
      return False
    interrupted = catcher is not None and catcher.received is not None
    if checkpointer is not None and ((round_num + 1) % checkpoint_every == 0 or round_num + 1 == num_rounds
                                     or stopped is not None or interrupted):
      save_checkpoint(round_num + 1)
    if interrupted:
      checkpointer.wait()
      raise checkpointing.TrainingInterrupted(catcher.received, round_num + 1, checkpointer.directory)
    return stopped is not None

  def dispatch_length(first_round: int) -> int:
    """Rounds of the dispatch starting at ``first_round``: at most ``rounds_per_dispatch``, ending at the next
    evaluation round, checkpoint round, the last round and the last round the privacy budget allows."""
    end = min(first_round + rounds_per_dispatch, num_rounds)
    if evaluate is not None:
      end = min(end, (first_round // evaluate_every + 1) * evaluate_every)
    if checkpointer is not None:
      end = min(end, (first_round // checkpoint_every + 1) * checkpoint_every)
    if privacy is not None:
      for rounds_done in range(first_round + 1, end):
        if not privacy.allows(rounds_done + 1):
          return rounds_done - first_round
    return end - first_round

  try:
    if catcher is not None:
      catcher.__enter__()
    if privacy is not None and start_round and not privacy.allows(start_round + 1) and start_round < num_rounds:
      stopped = budget_message(start_round)  # the checkpoint's run had already spent its budget
    elif start_round < num_rounds and scanned_rounds is None:
      pending = prepare(start_round)  # (a ledger whose budget does not allow one round was refused when built)
    for round_num in range(start_round, num_rounds if stopped is None and scanned_rounds is None else start_round):
      round_start = time.perf_counter()
      round_data, num_real_clients, (cohort, num_examples) = pending
      if client_states is None:
        state, metrics = next_fn(state, round_data, jax.random.fold_in(base_key, round_num))
      else:  # gathered now, after the previous round's states were written back
        round_data = dict(round_data, client_state=jax.device_put(client_states.gather(cohort, len(num_examples))))
        state, metrics, new_client_states = next_fn(state, round_data, jax.random.fold_in(base_key, round_num))
      if round_num + 1 < num_rounds and (privacy is None or privacy.allows(round_num + 2)):
        pending = prepare(round_num + 1)  # host work overlaps the device's round
      if client_states is not None:
        client_states.scatter(cohort, jax.device_get(new_client_states), num_examples)
      flat = {"round": round_num, **flatten_metrics(jax.device_get(metrics))}
      if finish_round(round_num, flat, num_real_clients, time.perf_counter() - round_start):
        break
    first_round = start_round
    while scanned_rounds is not None and stopped is None and first_round < num_rounds:
      length = dispatch_length(first_round)
      dispatch_start = time.perf_counter()
      # A short dispatch skips its last rounds inside a scan of the usual length (no compilation per length); full
      # ones run the scan without that conditional, which costs XLA:CPU ~10-20% per round.
      state, outputs = scanned_rounds(state, first_round, scan_length, length if length < scan_length else None)
      outputs = jax.device_get(outputs)
      dispatch_seconds = time.perf_counter() - dispatch_start
      overflowed = np.flatnonzero(outputs.num_sampled > capacity)
      if overflowed.size:
        raise RuntimeError(f"round {first_round + int(overflowed[0])} drew {int(outputs.num_sampled[overflowed[0]])} "
                           f"clients, more than the {capacity} client slots the device program is padded to (a "
                           "Poisson cohort this large has probability < 1e-9 per round); rerun without "
                           "rounds_per_dispatch, whose host packing pads such a round further.")
      for offset in range(length):
        flat = {"round": first_round + offset,
                **flatten_metrics(jax.tree.map(lambda leaf: leaf[offset], outputs.metrics))}
        done = finish_round(first_round + offset, flat, int(outputs.num_real_clients[offset]),
                            dispatch_seconds / length, dispatch_end=offset + 1 == length)
      if first_round == start_round:
        first_round_seconds = dispatch_seconds
      first_round += length
      if done:
        break
  finally:
    if catcher is not None:
      catcher.__exit__(None, None, None)
    if checkpointer is not None:
      checkpointer.close()  # waits for the last save
    if bar is not None:
      bar.close()
    if sink is not None:
      sink.close()
    for tracker in trackers:
      tracker.close()
  return TrainingResult(state=state, history=history, seconds=time.perf_counter() - start,
                        first_round_seconds=first_round_seconds, stopped_early=stopped)
