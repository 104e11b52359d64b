"""The scanned-rounds driver: whole training on the device, up to ``rounds_per_dispatch`` rounds per dispatch.

For a population that fits on the device, its examples are copied there once
(:class:`~fedjax_lite.core.device_rounds.DevicePopulation`) and each dispatch runs up to ``R`` rounds in one compiled
``lax.scan`` (:func:`~fedjax_lite.core.device_rounds.build_scanned_rounds`): cohorts, packing and shuffles are drawn on
the device from the same ``(seed, round)`` keys, so the results do not depend on ``R`` (``R = 1`` is the per-round
loop of the same device sampler, bit for bit). The cohorts are drawn by ``jax.random``, not numpy: the same
distribution as the host sampler, not the same clients.

Metrics come back stacked per round and go to the :class:`~fedjax_lite.training.recorder.Recorder` exactly as the
per-round driver's do; a dispatch ends at every evaluation and checkpoint round and before the round the privacy
budget forbids (:meth:`~fedjax_lite.training.schedule.RoundSchedule.dispatch_length`), so evaluations and
checkpoints see the same states as with the per-round driver. Signals and a stop asked by ``on_round_end`` take
effect at the end of the running dispatch. ``round_time_in_seconds`` is the dispatch's wall time divided by its
rounds.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import numpy as np

from fedjax_lite.core.device_rounds import device_sampler
from fedjax_lite.core.federated_data import FederatedData
from fedjax_lite.core.packing import ClientSpec
from fedjax_lite.core.process import Process
from fedjax_lite.core.tree import PyTree
from fedjax_lite.training.recorder import Recorder, flatten_metrics



def check_device_training(process: Process, sampler: Any, round_packer: Any, train_data: FederatedData,
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


def drive_scanned_rounds(scanned_rounds: Callable[..., Any], state: PyTree, recorder: Recorder, *,
                         rounds_per_dispatch: int, capacity: int) -> PyTree:
  """Runs rounds ``recorder.start_round ..`` in dispatches of scanned rounds until the end or a stop.

  Args:
    scanned_rounds: ``build_scanned_rounds(process, population, sampler, seed=seed)``.
    state: the server state before ``recorder.start_round`` (donated to the first dispatch).
    recorder: records every round, checkpoints at the end of each dispatch and says when to stop.
    rounds_per_dispatch: at most this many rounds per dispatch.
    capacity: client slots of a round (the device sampler's ``cohort_capacity``).

  Returns:
    The server state after the last round run.
  """
  schedule = recorder.schedule
  # Every dispatch is a scan of this length; shorter ones (cut at evaluations, checkpoints, the budget, the end)
  # skip their last rounds (one more compilation in all, whatever their lengths).
  scan_length = schedule.scan_length(rounds_per_dispatch)
  first_round = recorder.start_round
  while recorder.progress.stopped is None and first_round < schedule.num_rounds:
    length = schedule.dispatch_length(first_round, rounds_per_dispatch)
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
      recorder.record(first_round + offset, flat, num_real_clients=int(outputs.num_real_clients[offset]),
                      seconds=dispatch_seconds / length, state=state if offset + 1 == length else None)
    done = recorder.end_dispatch(state)
    if first_round == recorder.start_round:
      recorder.first_round_seconds = dispatch_seconds
    first_round += length
    if done:
      break
  return state
