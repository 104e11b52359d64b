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
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from fedjax_lite.core import validation
from fedjax_lite.core.federated_data import FederatedData
from fedjax_lite.core.packing import ClientSpec, bucket_num_steps
from fedjax_lite.core.process import Process
from fedjax_lite.core.sampling import UniformSampler
from fedjax_lite.privacy.accounting import PrivacyLedger

PyTree = Any
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


@dataclasses.dataclass(frozen=True)
class TrainingResult:
  """What :func:`run_training` returns.

  Attributes:
    state: the final server state.
    history: one flat metrics dict per round (as written to the metrics file).
    seconds: wall time of the whole loop.
    first_round_seconds: wall time of round 0 (includes compilation).
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
    privacy: PrivacyLedger | None = None,
    trackers: Sequence[Any] = (),
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
    progress: show a tqdm progress bar with loss and accuracy.
    on_round_end: optional ``callback(round_num, flat_metrics)``; returning a string stops training with that
      reason.
    sample_with_replacement: sample cohorts with replacement (with ``clients_per_round``).
    sampler: ``round_num -> client indices`` with a ``cohort_capacity`` (``core.sampling.UniformSampler``,
      ``PoissonSampler``, ``ShuffledCyclicSampler``). Rounds are padded to ``cohort_capacity`` client slots, so
      varying cohort sizes share one compiled round; a larger cohort is padded to the next power of two.
    privacy: optional :class:`~fedjax_lite.privacy.PrivacyLedger`: each round records ``privacy/epsilon`` (spent
      so far, at ``privacy/delta``), and with an ``epsilon_budget`` training stops before the round that would
      exceed it, giving the reason in ``stopped_early``.
    trackers: objects with ``write(flat_metrics)`` and ``close()`` receiving every round's record (CSV,
      TensorBoard, ...: :mod:`fedjax_lite.experiments.tracking`); closed when the loop ends.
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
  if privacy is not None and not isinstance(privacy, PrivacyLedger):
    raise TypeError(f"privacy must be a PrivacyLedger, got {type(privacy).__name__}.")
  trackers = tuple(trackers)
  for tracker in trackers:
    if not (callable(getattr(tracker, "write", None)) and callable(getattr(tracker, "close", None))):
      raise TypeError(f"trackers must have write(record) and close() methods, got {type(tracker).__name__}.")
  validation.check_int("num_rounds", num_rounds, minimum=1)
  validation.check_int("seed", seed, minimum=0)
  validation.check_int("evaluate_every", evaluate_every, minimum=1)

  num_steps = client_spec.max_num_steps(train_data)
  next_fn = jax.jit(process.next, donate_argnums=(0,))
  base_key = jax.random.key(seed)

  capacity = int(sampler.cohort_capacity)

  def prepare(round_num: int):
    cohort = sampler(round_num)
    slots = capacity if len(cohort) <= capacity else bucket_num_steps(len(cohort))
    packed = client_spec.pack(train_data, cohort, seed=seed, round_num=round_num, num_steps=num_steps,
                              cohort_size=slots)
    return jax.device_put(packed)

  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=num_rounds, desc="rounds", unit="round", dynamic_ncols=True)

  sink = open(metrics_path, "w") if metrics_path is not None else None
  history: list[dict] = []
  cumulative = {"broadcasted_bits": 0, "aggregated_bits": 0}
  stopped = None
  start = time.perf_counter()
  first_round_seconds = math.nan
  try:
    # A private copy: the jitted round donates its input state, which must not invalidate the caller's arrays.
    state = jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, process.init(initial_params))
    pending = prepare(0)  # (a ledger whose budget does not allow one round was refused when it was built)
    for round_num in range(num_rounds):
      round_start = time.perf_counter()
      state, metrics = next_fn(state, pending, jax.random.fold_in(base_key, round_num))
      if round_num + 1 < num_rounds and (privacy is None or privacy.allows(round_num + 2)):
        pending = prepare(round_num + 1)  # host work overlaps the device's round
      flat = {"round": round_num, **flatten_metrics(jax.device_get(metrics))}
      for key in ("broadcasted_bits", "aggregated_bits"):
        if key in flat:
          cumulative[key] += int(flat[key])
          flat[f"cumulative_{key}"] = cumulative[key]
      flat["round_time_in_seconds"] = time.perf_counter() - round_start
      if privacy is not None:
        flat["privacy/epsilon"] = privacy.epsilon_after(round_num + 1)
        flat["privacy/delta"] = privacy.delta
      if round_num == 0:
        first_round_seconds = flat["round_time_in_seconds"]
      budget_reached = privacy is not None and not privacy.allows(round_num + 2)
      last_round = round_num + 1 == num_rounds or budget_reached
      if evaluate is not None and ((round_num + 1) % evaluate_every == 0 or last_round):
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
        if any(cumulative.values()):  # communication so far, both directions, in megabits
          postfix["Mbit"] = (cumulative["broadcasted_bits"] + cumulative["aggregated_bits"]) / 1e6
        bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items() if v is not None}, refresh=False)
        bar.update(1)
      if on_round_end is not None:
        reason = on_round_end(round_num, flat)
        if reason:
          stopped = str(reason)
          break
      if budget_reached and round_num + 1 < num_rounds:
        stopped = (f"privacy budget: another round would bring epsilon to "
                   f"{privacy.epsilon_after(round_num + 2):.4g} > {privacy.epsilon_budget:g} at delta "
                   f"{privacy.delta:g}; stopped after {round_num + 1} rounds at epsilon "
                   f"{privacy.epsilon_after(round_num + 1):.4g}")
        break
  finally:
    if bar is not None:
      bar.close()
    if sink is not None:
      sink.close()
    for tracker in trackers:
      tracker.close()
  return TrainingResult(state=state, history=history, seconds=time.perf_counter() - start,
                        first_round_seconds=first_round_seconds, stopped_early=stopped)
