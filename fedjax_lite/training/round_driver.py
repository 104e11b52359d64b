"""The per-round driver: rounds sampled and packed on the host, one jitted ``process.next`` each.

Each round ``r``:

1. the cohort is sampled from ``(seed, r)`` alone and its clients are packed on the host into one fixed shape
   (:class:`HostRoundPacker`; the step axis is sized for the whole population's largest client, so the round
   compiles once);
2. :func:`run_round` runs the jitted ``process.next`` with the key ``fold_in(key(seed), r)`` -- gathering the
   cohort's client states from the store before, scattering their new states after, for algorithms with
   per-client state -- while the host packs round ``r + 1`` (the next round is packed before this round's metrics
   are read, so the host's work overlaps the device's);
3. the metrics come back to the host and go to the :class:`~fedjax_lite.training.recorder.Recorder`, which also
   checkpoints and says when to stop.

With client systems (``run_training(systems=...)``) step 1 is the selection planned on the simulated clock
(:mod:`~fedjax_lite.training.simulated_time`). ``process.next``'s signature is known in one place:
:func:`call_round` (its arguments, client states included) and :func:`run_round` (its outputs and the client-state
store's gather and scatter); :func:`trace_round` traces the round through :func:`call_round` too.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, TypeVar

import jax
import numpy as np

from fedjax_lite.core.client_state import ClientStateStore
from fedjax_lite.core.device_rounds import round_key
from fedjax_lite.core.federated_data import FederatedData
from fedjax_lite.core.packing import ClientSpec, bucket_num_steps
from fedjax_lite.core.round_data import RoundDataChecker
from fedjax_lite.core.tree import PyTree
from fedjax_lite.training.recorder import Recorder, flatten_metrics
from fedjax_lite.training.simulated_time import SimulatedTimeDriver

HostWork = TypeVar("HostWork")


@dataclasses.dataclass(frozen=True)
class PackedRound:
  """One round's data, ready for ``process.next``.

  Attributes:
    round_data: the packed cohort, on the device.
    num_real_clients: clients of the cohort with examples (the others are padding slots).
    cohort: the sampled client indices.
    num_examples: examples per client slot (None when a ``round_packer`` packed only this process's share).
  """

  round_data: PyTree
  num_real_clients: int
  cohort: np.ndarray
  num_examples: np.ndarray | None


class HostRoundPacker:
  """``round_num -> PackedRound``: the cohort sampled and packed on the host.

  Rounds are padded to the sampler's ``cohort_capacity`` client slots (a larger cohort to the next power of two),
  so varying cohort sizes share one compiled round. The round data is validated once per shape.

  Args:
    train_data: the population.
    client_spec: batch size, epochs and step cap of local training.
    sampler: ``round_num -> client indices`` with a ``cohort_capacity``.
    seed: the run's seed (the shuffles derive from ``(seed, round)``).
    num_steps: the step axis, for every round.
    round_packer: multi-process runs: packs this process's share of the cohort instead (see ``run_training``).
    simulated_time: rounds with client systems (``run_training(systems=...)``): the selection is planned on the
      simulated clock and its counted clients packed with their step budgets
      (:meth:`~fedjax_lite.training.simulated_time.SimulatedTimeDriver.prepare`), in its ``capacity`` slots.
  """

  def __init__(self, train_data: FederatedData, client_spec: ClientSpec, sampler: Callable[[int], np.ndarray], *,
               seed: int, num_steps: int, round_packer: Callable[..., tuple[PyTree, int]] | None = None,
               simulated_time: SimulatedTimeDriver | None = None):
    self._train_data = train_data
    self._client_spec = client_spec
    self._sampler = sampler
    self._capacity = int(sampler.cohort_capacity) if simulated_time is None else simulated_time.capacity
    self._seed = seed
    self._num_steps = num_steps
    self._round_packer = round_packer
    self._simulated_time = simulated_time
    self._check_round = RoundDataChecker("round_data")

  def __call__(self, round_num: int) -> PackedRound:
    if self._simulated_time is not None:
      packed, cohort = self._simulated_time.prepare(round_num, num_steps=self._num_steps)
      return self._placed(packed, cohort)
    cohort = self._sampler(round_num)
    slots = self._capacity if len(cohort) <= self._capacity else bucket_num_steps(len(cohort))
    if self._round_packer is not None:
      placed, num_real = self._round_packer(cohort, seed=self._seed, round_num=round_num, num_steps=self._num_steps,
                                            cohort_size=slots)
      return PackedRound(placed, num_real, cohort, None)
    packed = self._client_spec.pack(self._train_data, cohort, seed=self._seed, round_num=round_num,
                                    num_steps=self._num_steps, cohort_size=slots)
    return self._placed(packed, cohort)

  def _placed(self, packed: dict[str, np.ndarray], cohort: np.ndarray) -> PackedRound:
    self._check_round(packed)  # once per shape
    num_examples = np.asarray(packed["num_examples"])
    return PackedRound(jax.device_put(packed), int(np.count_nonzero(num_examples)), cohort, num_examples)


# The round's call: the only place that knows ``process.next``'s signature ------------------------------------------


def call_round(round_fn: Callable[..., Any], state: PyTree, round_data: PyTree, rng: jax.Array,
               client_states: PyTree | None = None) -> Any:
  """Calls ``round_fn`` -- the jitted ``process.next``, or its ``.trace`` -- as ``process.next`` takes its
  arguments: ``next(state, round_data, rng, client_states)``, the cohort's client states (algorithms with
  per-client state; None otherwise) its own argument. Returns what ``round_fn`` returns: a
  :class:`~fedjax_lite.core.RoundOutput` ``(state, metrics, client_states)``."""
  return round_fn(state, round_data, rng, client_states)


def run_round(next_fn: Callable[..., Any], state: PyTree, packed: PackedRound, rng: jax.Array,
              client_states: ClientStateStore | None, host_work: Callable[[], HostWork]
              ) -> tuple[PyTree, PyTree, HostWork]:
  """ONE round: the only call of ``process.next`` in the per-round driver, with the client-state plumbing.

  For an algorithm with per-client state the cohort's states are gathered from ``client_states`` just before the
  round (after the previous round's were written back), and the new states of the real clients
  (``RoundOutput.client_states``) are scattered back after it. ``host_work()`` (packing the next round) runs while
  the device computes this round. Returns ``(state, metrics, host_work())``; the metrics stay on the device.
  """
  gathered = (None if client_states is None
              else jax.device_put(client_states.gather(packed.cohort, len(packed.num_examples))))
  output = call_round(next_fn, state, packed.round_data, rng, gathered)
  done = host_work()
  if client_states is not None:
    client_states.scatter(packed.cohort, jax.device_get(output.client_states), packed.num_examples)
  return output.state, output.metrics, done


def trace_round(next_fn: Callable[..., Any], state: PyTree, rng: jax.Array) -> Callable[..., Any]:
  """``(round_data_shapes, client_state_shapes) -> the round's output shapes``, traced as :func:`run_round` calls
  ``next_fn`` (its first call then reuses the trace): what the simulated clock reads the round's bits from
  (:meth:`~fedjax_lite.training.simulated_time.SimulatedTimeDriver.start`)."""

  def traced(round_data_shapes: PyTree, client_state_shapes: PyTree | None) -> Any:
    return call_round(next_fn.trace, state, round_data_shapes, rng, client_state_shapes).out_info

  return traced


# The driver ---------------------------------------------------------------------------------------------------------


def drive_rounds(next_fn: Callable[..., Any], state: PyTree, recorder: Recorder,
                 pack: Callable[[int], PackedRound], *, seed: int,
                 client_states: ClientStateStore | None = None) -> PyTree:
  """Runs rounds ``recorder.start_round ..`` one by one until the schedule's end or a stop; returns the state.

  Args:
    next_fn: the jitted ``process.next`` (its state argument may be donated).
    state: the server state before ``recorder.start_round``.
    recorder: records every round, checkpoints and says when to stop.
    pack: ``round_num -> PackedRound`` (:class:`HostRoundPacker`).
    seed: the run's seed; round ``r`` gets the key ``fold_in(key(seed), r)``.
    client_states: the population's client-state store, for an algorithm with per-client state.
  """
  schedule = recorder.schedule
  if recorder.progress.stopped is not None or recorder.start_round >= schedule.num_rounds:
    return state
  base_key = jax.random.key(seed)
  pending = pack(recorder.start_round)  # (a ledger whose budget does not allow one round was refused when built)
  for round_num in range(recorder.start_round, schedule.num_rounds):
    round_start = time.perf_counter()
    packed = pending
    pack_next = _nothing if schedule.is_last(round_num) else functools.partial(pack, round_num + 1)
    state, metrics, pending = run_round(next_fn, state, packed, round_key(base_key, round_num), client_states,
                                        host_work=pack_next)
    flat = {"round": round_num, **flatten_metrics(jax.device_get(metrics))}
    recorder.record(round_num, flat, num_real_clients=packed.num_real_clients,
                    seconds=time.perf_counter() - round_start, state=state)
    if recorder.end_dispatch(state):
      break
  return state


def _nothing() -> None:
  return None
