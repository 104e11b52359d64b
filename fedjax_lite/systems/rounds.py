"""Synchronous rounds under realistic conditions: dropout, over-selection with a deadline, stragglers' partial work.

Host side, between sampling and packing a round (the device never sees any of it, so a round with systems costs
what the same round without them costs). :func:`plan_round` decides, from the selected clients' systems and the
round's exact per-client bits (the simulated clock, :mod:`fedjax_lite.systems.clock`), who is counted in the
round, with how many local steps, and how long the round lasts; :class:`SystemsRounds` drives it round after round
with the clock and packs the counted clients (:func:`fedjax_lite.core.pack_clients` with ``step_budget``).

The rules, for the ``S`` selected clients of a round starting at simulated time ``t0``, a deadline ``D`` (or none)
and a target of ``m`` reports (or none):

1. **Work and report time.** Client ``k`` needs ``T_k(K_k)`` seconds for its full ``K_k`` local steps. Without a
   deadline, or within it, it reports at ``r_k = T_k(K_k)``. Past the deadline, with ``partial_work`` (FedProx's
   "variable amounts of work", Li et al. 2020), it does the most steps that fit, ``s_k = max {s : T_k(s) <= D}``,
   and reports them at ``r_k = T_k(s_k)``; it is **timed out** when ``s_k < min_steps`` (or past the deadline
   without ``partial_work``).
2. **Dropout.** The availability model gives the time ``g_k`` the client goes offline before its task ends (the
   task ends at ``r_k``, or at ``D`` for a timed-out client); a client with ``g_k`` finite **drops out**: it
   contributes nothing.
3. **Over-selection** (Bonawitz et al. 2019, "Towards Federated Learning at Scale", Sec. 2.2): the remaining
   clients are ordered by ``r_k`` (ties by selection order); the first ``m`` are **counted**, the rest
   **discarded** (they reported after the server had its ``m``). Sample ``ceil(f * m)`` clients to over-select by
   ``f`` (:meth:`RoundPolicy.num_selected`).
4. **Duration.** With ``m`` counted, the round ends at the ``m``-th report. Otherwise the server waits for every
   selected client to report (``r_k``), drop out (``g_k``) or time out (``D``), and at most until ``D``. Add
   ``overhead_seconds`` (server work, selection) to every round. An empty cohort takes ``overhead_seconds``.

Counted clients are packed in selection order with ``step_budget = s_k`` (``K_k`` when they finish), so their
weights (``num_examples``) and the local loop count only the steps done; dropped, timed-out and discarded clients
are not packed at all: they cost no device time, and the round's slots are the target ``m``, not ``ceil(f * m)``.

Metrics (``systems/``): ``round_seconds``, ``elapsed_seconds``, ``elapsed_hours`` (cumulative, after the round),
``num_selected``, ``num_counted``, ``num_dropped_out``, ``num_timed_out``, ``num_discarded``, ``num_partial``
(counted with fewer steps than their full work), ``steps_done`` and ``steps_full`` (summed over counted clients),
``broadcasted_bits`` (download bits times the selected clients online at the start: they all received the model,
unlike the template's ``broadcasted_bits``, which counts the clients in the aggregation), and optionally
``client_steps`` (the counted clients' steps, in slot order).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any, Mapping

import jax
import numpy as np

from fedjax_lite.core import validation
from fedjax_lite.core.federated_data import FederatedData
from fedjax_lite.core.packing import ClientSpec
from fedjax_lite.systems.clock import (SimulatedClock, check_bits, check_clients, check_counts, examples_done,
                                      search_steps, task_seconds)
from fedjax_lite.systems.availability import AvailabilityWindows
from fedjax_lite.systems.population import ClientSystems

COUNTED, DISCARDED, TIMED_OUT, DROPPED_OUT = 0, 1, 2, 3
"""Status codes of a selected client in a :class:`RoundPlan`."""

METRICS_PREFIX = "systems/"


@dataclasses.dataclass(frozen=True)
class RoundPolicy:
  """How the server runs a synchronous round under realistic conditions (see the module docstring).

  Attributes:
    deadline_seconds: the round's deadline from its start (> 0), or None for none.
    over_selection: ``f >= 1``: select ``ceil(f * m)`` clients for a target of ``m`` reports.
    partial_work: clients that cannot finish by the deadline send the steps they managed (needs a deadline).
    min_steps: the fewest local steps a partial client must do to report (>= 1).
    overhead_seconds: server time added to every round (>= 0).
  """

  deadline_seconds: float | None = None
  over_selection: float = 1.0
  partial_work: bool = False
  min_steps: int = 1
  overhead_seconds: float = 0.0

  def __post_init__(self):
    validation.check_positive("deadline_seconds", self.deadline_seconds, allow_none=True)
    validation.check_float("over_selection", self.over_selection, low=1.0)
    if not isinstance(self.partial_work, bool):
      raise TypeError(f"partial_work must be a bool, got {type(self.partial_work).__name__}.")
    if self.partial_work and self.deadline_seconds is None:
      raise ValueError("partial_work needs a deadline_seconds: a client does partial work only when its full work "
                       "would end after the deadline.")
    validation.check_int("min_steps", self.min_steps, minimum=1)
    validation.check_float("overhead_seconds", self.overhead_seconds, low=0.0)

  def num_selected(self, target_clients: int) -> int:
    """``ceil(f * m)``: how many clients to select for a target of ``m`` reports."""
    validation.check_int("target_clients", target_clients, minimum=1)
    # Rounded to 9 decimals first, so 1.1 * 10 selects 11 clients, not ceil(11.000000000000002) = 12.
    return int(math.ceil(round(self.over_selection * target_clients, 9)))

  def describe(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, eq=False)
class RoundPlan:
  """The outcome of one synchronous round with systems (per selected client, in selection order).

  Attributes:
    round_num: the round.
    start_seconds: the simulated time at which the round starts.
    duration_seconds: how long it lasts (``overhead_seconds`` included).
    clients: int64 ``[S]`` storage indices of the selected clients.
    status: int8 ``[S]``: ``COUNTED``, ``DISCARDED``, ``TIMED_OUT`` or ``DROPPED_OUT``.
    full_steps: int64 ``[S]``: each client's full local steps.
    steps: int64 ``[S]``: the steps it does this round (``full_steps``, fewer for a partial client; 0 unless
      counted or discarded).
    num_examples: int64 ``[S]``: the examples those steps cover.
    report_seconds: float64 ``[S]``: when it reports, from the round's start (``inf`` if it never does).
    offline_seconds: float64 ``[S]``: when it went offline mid-task (``inf`` if it did not).
    download_bits: bits sent to ONE client; upload_bits: bits ONE client uploads.
  """

  round_num: int
  start_seconds: float
  duration_seconds: float
  clients: np.ndarray
  status: np.ndarray
  full_steps: np.ndarray
  steps: np.ndarray
  num_examples: np.ndarray
  report_seconds: np.ndarray
  offline_seconds: np.ndarray
  download_bits: int
  upload_bits: int

  @property
  def counted(self) -> np.ndarray:
    """Bool ``[S]``: the clients counted in the round."""
    return self.status == COUNTED

  @property
  def counted_clients(self) -> np.ndarray:
    """The counted clients' storage indices, in selection order (the round's client slots)."""
    return self.clients[self.counted]

  @property
  def counted_steps(self) -> np.ndarray:
    """The counted clients' local steps (their ``step_budget``), in slot order."""
    return self.steps[self.counted]

  @property
  def end_seconds(self) -> float:
    return self.start_seconds + self.duration_seconds

  def metrics(self, elapsed_seconds: float | None = None, *, client_steps: bool = False) -> dict[str, Any]:
    """The round's ``systems/`` metrics (module docstring); ``elapsed_seconds`` defaults to the round's end."""
    counted = self.counted
    elapsed = self.end_seconds if elapsed_seconds is None else float(elapsed_seconds)
    started = int(np.count_nonzero(self.offline_seconds > 0))
    metrics = {
        "round_seconds": float(self.duration_seconds),
        "elapsed_seconds": elapsed,
        "elapsed_hours": elapsed / 3600.0,
        "num_selected": int(self.clients.shape[0]),
        "num_counted": int(np.count_nonzero(counted)),
        "num_dropped_out": int(np.count_nonzero(self.status == DROPPED_OUT)),
        "num_timed_out": int(np.count_nonzero(self.status == TIMED_OUT)),
        "num_discarded": int(np.count_nonzero(self.status == DISCARDED)),
        "num_partial": int(np.count_nonzero(counted & (self.steps < self.full_steps))),
        "steps_done": int(self.steps[counted].sum()),
        "steps_full": int(self.full_steps[counted].sum()),
        "broadcasted_bits": started * int(self.download_bits),
    }
    if client_steps:
      metrics["client_steps"] = self.counted_steps.tolist()
    return {METRICS_PREFIX + key: value for key, value in metrics.items()}


def plan_round(
    systems: ClientSystems,
    clients,
    *,
    full_steps,
    num_examples,
    batch_size: int,
    download_bits: int,
    upload_bits: int,
    policy: RoundPolicy = RoundPolicy(),
    target_clients: int | None = None,
    start_seconds: float = 0.0,
    seed: int = 0,
    round_num: int = 0,
) -> RoundPlan:
  """Plans one synchronous round (the rules of the module docstring); pure and vectorized over the clients.

  Args:
    systems: the population's systems.
    clients: the selected clients' storage indices (int ``[S]``, selection order).
    full_steps: each one's full local steps (int ``[S]``; ``ClientSpec.num_steps``).
    num_examples: the examples of its full local work (int ``[S]``; ``ClientSpec.num_examples``).
    batch_size: the local batch size.
    download_bits: bits the server sends ONE client (the template's per-client ``broadcasted_bits``).
    upload_bits: bits ONE client uploads (the per-client ``aggregated_bits``).
    policy: deadline, over-selection, partial work.
    target_clients: ``m``, the reports the server waits for (None: every client that reports).
    start_seconds: the simulated time at which the round starts (availability windows read it).
    seed: the run's seed; ``round_num``: the round (dropout draws come from both).
  """
  if not isinstance(policy, RoundPolicy):
    raise TypeError(f"policy must be a RoundPolicy, got {type(policy).__name__}.")
  validation.check_int("target_clients", target_clients, minimum=1, allow_none=True)
  validation.check_int("seed", seed, minimum=0)
  validation.check_int("round_num", round_num, minimum=0)
  start_seconds = validation.check_float("start_seconds", start_seconds, low=0.0)
  clients = check_clients(systems, clients)
  full_steps = check_counts("full_steps", full_steps, clients.shape)
  num_examples = check_counts("num_examples", num_examples, clients.shape)
  validation.check_int("batch_size", batch_size, minimum=1)
  download_bits, upload_bits = check_bits(download_bits, upload_bits)
  if np.any(num_examples > full_steps * batch_size) or np.any(num_examples <= (full_steps - 1) * batch_size):
    raise ValueError("num_examples must fit full_steps batches with only the last one partial: "
                     "(full_steps - 1) * batch_size < num_examples <= full_steps * batch_size for every client.")
  deadline = policy.deadline_seconds
  limit = math.inf if deadline is None else deadline
  if deadline is None:
    fitting = full_steps
    steps = full_steps
  else:
    fitting = search_steps(systems, clients, deadline, full_steps, num_examples, batch_size, download_bits,
                           upload_bits)
    steps = np.maximum(fitting, 0) if policy.partial_work else full_steps
  report = task_seconds(systems, clients, steps, num_examples, batch_size, download_bits, upload_bits)
  if deadline is None:
    timed_out = np.zeros(clients.shape, bool)
  elif policy.partial_work:
    timed_out = fitting < policy.min_steps
  else:
    timed_out = fitting < full_steps
  task_end = np.where(timed_out, limit, report)
  offline = np.asarray(systems.availability.offline_at(clients, start_seconds, task_end, seed=seed,
                                                       round_num=round_num), dtype=np.float64)
  dropped = np.isfinite(offline)
  status = np.full(clients.shape, COUNTED, np.int8)
  status[timed_out] = TIMED_OUT
  status[dropped] = DROPPED_OUT
  reporting = np.flatnonzero(status == COUNTED)
  order = reporting[np.argsort(report[reporting], kind="stable")]
  if target_clients is not None and order.shape[0] > target_clients:
    status[order[target_clients:]] = DISCARDED
    order = order[:target_clients]
  if target_clients is not None and order.shape[0] == target_clients:
    end = float(report[order[-1]])
  else:
    events = np.where(dropped, offline, task_end)
    end = min(float(events.max()) if events.size else 0.0, limit)
  counted_or_discarded = (status == COUNTED) | (status == DISCARDED)
  steps = np.where(counted_or_discarded, steps, 0)
  arrays = dict(clients=clients, status=status, full_steps=full_steps, steps=steps,
                num_examples=np.where(counted_or_discarded, examples_done(steps, num_examples, batch_size), 0),
                report_seconds=np.where(counted_or_discarded, report, np.inf), offline_seconds=offline)
  for array in arrays.values():
    array.setflags(write=False)
  return RoundPlan(round_num=int(round_num), start_seconds=start_seconds,
                   duration_seconds=end + policy.overhead_seconds, download_bits=int(download_bits),
                   upload_bits=int(upload_bits), **arrays)


def bits_per_client(metrics: Mapping[str, Any]) -> tuple[int, int]:
  """``(download, upload)`` bits of ONE client, read from a round's metrics (concrete, or the shapes
  ``jax.eval_shape`` gives): the ``bits_per_client`` of its ``broadcasted_bits`` and ``aggregated_bits``
  (:class:`fedjax_lite.algorithms.template.BitCount`, static)."""
  if not isinstance(metrics, Mapping):
    raise TypeError(f"metrics must be a round's metrics dict, got {type(metrics).__name__}.")
  bits = []
  for key in ("broadcasted_bits", "aggregated_bits"):
    per_client = getattr(metrics.get(key), "bits_per_client", None)
    if per_client is None:
      raise ValueError(f"the round's metrics have no {key!r} with a static bits_per_client (the round template's "
                       "BitCount); give SystemsRounds download_bits and upload_bits instead.")
    bits.append(int(per_client))
  return bits[0], bits[1]


def round_data_shapes(data: FederatedData, client_spec: ClientSpec, *, num_steps: int, cohort_size: int
                      ) -> dict[str, jax.ShapeDtypeStruct]:
  """The shapes and dtypes of a packed round (``jax.ShapeDtypeStruct``): for ``jax.eval_shape`` of a round, e.g.
  to read its per-client bits (:func:`bits_per_client`) before packing any round."""
  validation.check_int("num_steps", num_steps, minimum=1)
  validation.check_int("cohort_size", cohort_size, minimum=1)
  leading = (cohort_size, num_steps, client_spec.batch_size)
  shapes = {key: jax.ShapeDtypeStruct(leading + value.shape[1:], value.dtype) for key, value in data.examples.items()}
  shapes["mask"] = jax.ShapeDtypeStruct(leading, np.bool_)
  shapes["num_examples"] = jax.ShapeDtypeStruct((cohort_size,), np.int32)
  return shapes


class SystemsRounds:
  """Synchronous rounds with client systems, round after round: plans each round on the simulated clock and packs
  its counted clients.

  Usage (what :func:`fedjax_lite.training.run_training` does with ``systems=``)::

    rounds = SystemsRounds(systems, RoundPolicy(deadline_seconds=600, over_selection=1.3, partial_work=True),
                           download_bits=down, upload_bits=up)   # or rounds.set_bits(*bits_per_client(metrics))
    for round_num in range(num_rounds):
      selected = sample_clients(n, rounds.policy.num_selected(m), seed=seed, round_num=round_num)
      round_data, plan = rounds.prepare(data, spec, selected, seed=seed, round_num=round_num, target_clients=m,
                                        num_steps=num_steps, cohort_size=m)
      state, metrics, _ = round_step(state, round_data, key)
      record = {**flatten(metrics), **rounds.metrics(plan)}

  Rounds must be prepared in order (each starts when the previous one ends on the clock); :meth:`restore` sets the
  clock from a run's metrics history when it resumes.

  Args:
    systems: the population's :class:`~fedjax_lite.systems.ClientSystems`.
    policy: the :class:`RoundPolicy` (default: no deadline, no over-selection).
    download_bits: bits the server sends ONE client; ``upload_bits``: bits ONE client uploads (both or neither;
      :meth:`set_bits` sets them later, e.g. from ``jax.eval_shape`` of the round).
    record_client_steps: also record ``systems/client_steps``, the counted clients' steps, every round.
  """

  def __init__(self, systems: ClientSystems, policy: RoundPolicy = RoundPolicy(), *, download_bits: int | None = None,
               upload_bits: int | None = None, record_client_steps: bool = False):
    if not isinstance(systems, ClientSystems):
      raise TypeError(f"systems must be a ClientSystems, got {type(systems).__name__}.")
    if not isinstance(policy, RoundPolicy):
      raise TypeError(f"policy must be a RoundPolicy, got {type(policy).__name__}.")
    if (download_bits is None) != (upload_bits is None):
      raise ValueError("give both download_bits and upload_bits, or neither (then call set_bits).")
    if not isinstance(record_client_steps, bool):
      raise TypeError(f"record_client_steps must be a bool, got {type(record_client_steps).__name__}.")
    self.systems = systems
    self.policy = policy
    self.record_client_steps = record_client_steps
    self.clock = SimulatedClock()
    self.bits: tuple[int, int] | None = None
    self.last_plan: RoundPlan | None = None
    self._next_round: int | None = None
    self._checked_data: FederatedData | None = None
    if download_bits is not None:
      self.set_bits(download_bits, upload_bits)

  def set_bits(self, download_bits: int, upload_bits: int) -> None:
    """Sets the per-client bits of the rounds (static for a model and an aggregator)."""
    self.bits = (validation.check_int("download_bits", download_bits, minimum=0),
                 validation.check_int("upload_bits", upload_bits, minimum=0))

  def restore(self, history: list[Mapping[str, Any]]) -> None:
    """Resumes the clock after the rounds of ``history`` (a run's flat metrics records): the last record's
    ``systems/elapsed_seconds`` (0 for an empty history); the next round prepared must follow the last record's."""
    if not history:
      self.clock = SimulatedClock()
      self._next_round = None
      return
    last = history[-1]
    key = METRICS_PREFIX + "elapsed_seconds"
    if key not in last:
      raise ValueError(f"the history's last round has no {key!r}: it was not run with systems, so its simulated "
                       "time is unknown.")
    self.clock = SimulatedClock(float(last[key]))
    self._next_round = int(last["round"]) + 1 if "round" in last else None

  def plan(self, data: FederatedData, client_spec: ClientSpec, clients, *, seed: int, round_num: int,
           target_clients: int | None = None) -> RoundPlan:
    """Plans round ``round_num`` of the selected ``clients`` at the clock's time and advances the clock."""
    if self.bits is None:
      raise ValueError("SystemsRounds needs the round's per-client bits first: pass download_bits and upload_bits, "
                       "or call set_bits(*bits_per_client(metrics)) with a round's metrics (or their "
                       "jax.eval_shape).")
    if not isinstance(data, FederatedData):
      raise TypeError(f"data must be a FederatedData, got {type(data).__name__}.")
    if not isinstance(client_spec, ClientSpec):
      raise TypeError(f"client_spec must be a ClientSpec, got {type(client_spec).__name__}.")
    if data is not self._checked_data:  # once per population
      self.systems.check_population(data.num_clients, data.client_ids)
      self._checked_data = data
    validation.check_int("round_num", round_num, minimum=0)
    if self._next_round is not None and round_num != self._next_round:
      raise ValueError(f"rounds must be planned in order on the simulated clock: expected round {self._next_round}, "
                       f"got {round_num} (restore(history) resumes a run).")
    clients = np.asarray(clients).reshape(-1)
    plan = plan_round(self.systems, clients, full_steps=client_spec.num_steps(data, clients),
                      num_examples=client_spec.num_examples(data, clients), batch_size=client_spec.batch_size,
                      download_bits=self.bits[0], upload_bits=self.bits[1], policy=self.policy,
                      target_clients=target_clients, start_seconds=self.clock.elapsed_seconds, seed=seed,
                      round_num=round_num)
    self.clock.advance(plan.duration_seconds)
    self.last_plan = plan
    self._next_round = round_num + 1
    return plan

  def prepare(self, data: FederatedData, client_spec: ClientSpec, clients, *, seed: int, round_num: int,
              target_clients: int | None = None, num_steps: int | None = None, cohort_size: int | None = None
              ) -> tuple[dict[str, np.ndarray], RoundPlan]:
    """:meth:`plan`, then the counted clients packed in selection order with their step budgets; returns
    ``(round_data, plan)``. ``cohort_size`` defaults to the target (or the selected count)."""
    plan = self.plan(data, client_spec, clients, seed=seed, round_num=round_num, target_clients=target_clients)
    slots = cohort_size if cohort_size is not None else (target_clients or max(plan.clients.shape[0], 1))
    packed = client_spec.pack(data, plan.counted_clients, seed=seed, round_num=round_num, num_steps=num_steps,
                              cohort_size=max(slots, plan.counted_clients.shape[0]), step_budget=plan.counted_steps)
    return packed, plan

  def metrics(self, plan: RoundPlan) -> dict[str, Any]:
    """The round's flat ``systems/`` metrics; ``elapsed`` is the clock after ``plan``'s round."""
    return plan.metrics(plan.end_seconds, client_steps=self.record_client_steps)

  def describe(self) -> dict:
    """JSON-able description of everything here that changes a run's results (for its configuration), with a
    SHA-256 of the systems' arrays."""
    digest = hashlib.sha256()
    for array in (self.systems.seconds_per_example, self.systems.seconds_per_step,
                  self.systems.download_bits_per_second, self.systems.upload_bits_per_second):
      digest.update(np.ascontiguousarray(array).tobytes())
    windows = self.systems.availability
    if isinstance(windows, AvailabilityWindows):
      for array in (windows.offsets, windows.starts, windows.ends):
        digest.update(np.ascontiguousarray(array).tobytes())
    return {"systems": self.systems.describe(), "systems_sha256": digest.hexdigest(), "policy": self.policy.describe(),
            "bits": None if self.bits is None else list(self.bits)}
