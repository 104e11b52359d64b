"""FedBuff's driver: the event order planned on the host, one jitted server step per ``K`` arrivals on the device.

:func:`run_fed_buff` runs :func:`fedjax_lite.algorithms.fed_buff` for a number of server steps or a simulated-time
budget. Each server step ``s``:

1. the host simulates the in-flight clients on the simulated clock until ``K`` updates have arrived
   (:class:`fedjax_lite.systems.BufferedSchedule`; task durations from the clients' systems and the exact
   per-client bits, :func:`fedjax_lite.systems.task_seconds_of`);
2. it packs those ``K`` clients' data in arrival order (``ClientSpec.pack(..., round_num=s)``, the step axis sized
   for the whole population: one shape, one compilation) and dispatches the jitted ``next`` with the key
   ``fold_in(key(seed), s)`` and the versions they downloaded; the device works while the host plans and packs
   step ``s + 1`` (the step's metrics stay on the device until the end of the run);
3. the step's metrics are its ``next`` metrics (flattened) plus the event order's ``fedbuff/`` metrics (server
   steps, arrivals, dropped stale, dropped offline, mean staleness, simulated time).

The run is deterministic given the seed: the event order depends only on the task durations and the seed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lite.algorithms.fed_buff import FedBuff, FedBuffState
from fedjax_lite.core import validation
from fedjax_lite.core.device_rounds import round_key
from fedjax_lite.core.federated_data import FederatedData
from fedjax_lite.core.packing import ClientSpec
from fedjax_lite.core.tree import PyTree
from fedjax_lite.systems.buffered import BufferedSchedule, step_metrics, task_seconds_of
from fedjax_lite.systems.population import ClientSystems
from fedjax_lite.training.recorder import flatten_metrics


@dataclasses.dataclass
class FedBuffRun:
  """What :func:`run_fed_buff` returns.

  Attributes:
    state: the final :class:`~fedjax_lite.algorithms.FedBuffState` (params, optimizer state, version, ring).
    schedule: the :class:`~fedjax_lite.systems.BufferedSchedule` after the run: its in-flight clients, version,
      simulated time and totals (continue the run by passing it back with the state).
    history: one flat metrics dict per server step (``step`` from 0), Python scalars.
  """

  state: FedBuffState
  schedule: BufferedSchedule
  history: list[dict[str, Any]]


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
    on_step: Callable[[int, FedBuffState], dict | None] | None = None,
) -> FedBuffRun:
  """Runs FedBuff (module docstring) until ``num_server_steps`` steps or the first step past ``simulated_seconds``.

  Args:
    process: :func:`fedjax_lite.algorithms.fed_buff`.
    data: the training population.
    params: the initial params (ignored when ``state`` is given).
    client_spec: batch size, epochs, step cap of every client task.
    seed: the run's seed (event order, client draws, packing, keys).
    num_server_steps: stop after this many server steps (from the start of this call).
    simulated_seconds: stop before the first server step later than this simulated time (from the run's start).
      At least one of the two limits.
    systems: the clients' systems (durations from the exact per-client bits; availability ``AlwaysOn()`` or
      ``RandomDropout(p)``: :class:`~fedjax_lite.systems.BufferedSchedule`); or ``task_seconds``: float64
      ``[num_clients]`` durations of always-on clients. Exactly one.
    num_steps: the packed step axis (default ``client_spec.max_num_steps(data)``: one shape for every step).
    state, schedule: continue a previous run (:class:`FedBuffRun`'s fields), both or neither. The state is
      copied once and the copy's buffers are donated step after step, so ``state`` stays valid; the schedule is
      advanced in place.
    on_step: optional ``(step, state) -> dict | None`` called after each step is dispatched (e.g. an evaluation
      every few steps); its dict is added to the step's metrics. It may sync with the device.
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
  if on_step is not None and not callable(on_step):
    raise TypeError(f"on_step must be a function (step, state) -> dict | None, got {type(on_step).__name__}.")
  if schedule is None:
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
    schedule = BufferedSchedule(task_seconds, concurrency=process.concurrency, buffer_size=process.buffer_size,
                                max_staleness=process.max_staleness, seed=seed,
                                availability=None if systems is None else systems.availability)
    state = process.init(params, jax.random.fold_in(jax.random.key(seed), 0x1B1F))
  elif not isinstance(schedule, BufferedSchedule) or schedule.num_clients != data.num_clients:
    raise ValueError("schedule must be the BufferedSchedule of a previous run on the same population.")
  num_steps = client_spec.max_num_steps(data) if num_steps is None else num_steps
  step_fn = _jitted(process)
  state = jax.tree.map(jnp.copy, state)  # the loop donates the state's buffers (the ring is updated in place)
  base_key = jax.random.key(seed)
  pending: list[tuple[dict, Any]] = []
  done = 0
  limit = math.inf if num_server_steps is None else num_server_steps
  while done < limit:
    if simulated_seconds is not None and schedule.peek_time() > simulated_seconds:
      break
    step = schedule.next_step()
    round_data = client_spec.pack(data, step.clients, seed=seed, round_num=step.step, num_steps=num_steps,
                                  cohort_size=process.buffer_size)
    state, metrics, _ = step_fn(state, round_data, round_key(base_key, step.step), step.versions.astype(np.int32))
    extra = {"step": step.step, **step_metrics(step)}
    if on_step is not None:
      extra.update(on_step(step.step, state) or {})
    pending.append((extra, metrics))
    done += 1
  history = [{**flatten_metrics(jax.device_get(metrics)), **extra} for extra, metrics in pending]
  return FedBuffRun(state=state, schedule=schedule, history=history)


_JITTED: dict[int, tuple[FedBuff, Callable]] = {}


def _jitted(process: FedBuff) -> Callable:
  """``jax.jit(process.next)`` with the state donated (the ring's row is written in place, not copied), once per
  process (a second run of the same process does not recompile)."""
  key = id(process)
  if key not in _JITTED or _JITTED[key][0] is not process:
    _JITTED[key] = (process, jax.jit(process.next, donate_argnums=0))
  return _JITTED[key][1]
