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
  """

  def __init__(self, train_data: FederatedData, client_spec: ClientSpec, sampler: Callable[[int], np.ndarray], *,
               seed: int, num_steps: int, round_packer: Callable[..., tuple[PyTree, int]] | None = None):
    self._train_data = train_data
    self._client_spec = client_spec
    self._sampler = sampler
    self._capacity = int(sampler.cohort_capacity)
    self._seed = seed
    self._num_steps = num_steps
    self._round_packer = round_packer
    self._check_round = RoundDataChecker("round_data")

  def __call__(self, round_num: int) -> PackedRound:
    cohort = self._sampler(round_num)
    slots = self._capacity if len(cohort) <= self._capacity else bucket_num_steps(len(cohort))
    if self._round_packer is not None:
      placed, num_real = self._round_packer(cohort, seed=self._seed, round_num=round_num, num_steps=self._num_steps,
                                            cohort_size=slots)
      return PackedRound(placed, num_real, cohort, None)
    packed = self._client_spec.pack(self._train_data, cohort, seed=self._seed, round_num=round_num,
                                    num_steps=self._num_steps, cohort_size=slots)
    self._check_round(packed)  # once per shape
    num_examples = np.asarray(packed["num_examples"])
    return PackedRound(jax.device_put(packed), int(np.count_nonzero(num_examples)), cohort, num_examples)


def run_round(next_fn: Callable[..., Any], state: PyTree, packed: PackedRound, rng: jax.Array,
              client_states: ClientStateStore | None, host_work: Callable[[], HostWork]
              ) -> tuple[PyTree, PyTree, HostWork]:
  """ONE round: the only call of ``process.next`` in the per-round driver, with the client-state plumbing.

  For an algorithm with per-client state the cohort's states are gathered from ``client_states`` into
  ``round_data['client_state']`` just before the round (after the previous round's were written back), and the new
  states of the real clients are scattered back after it. ``host_work()`` (packing the next round) runs while the
  device computes this round. Returns ``(state, metrics, host_work())``; the metrics stay on the device.
  """
  if client_states is None:
    state, metrics = next_fn(state, packed.round_data, rng)
    return state, metrics, host_work()
  round_data = dict(packed.round_data, client_state=jax.device_put(
      client_states.gather(packed.cohort, len(packed.num_examples))))
  state, metrics, new_client_states = next_fn(state, round_data, rng)
  done = host_work()
  client_states.scatter(packed.cohort, jax.device_get(new_client_states), packed.num_examples)
  return state, metrics, done


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
