"""Asynchronous buffered aggregation's event order (FedBuff) on the simulated clock, planned on the host.

FedBuff (Nguyen et al. 2022, AISTATS, "Federated Learning with Buffered Asynchronous Aggregation") keeps
``concurrency`` clients training at once; each trains from the server model version it downloaded when it started;
the server applies an update whenever ``K`` (``buffer_size``) client updates have arrived; a new client starts
whenever one finishes. Which client arrives when depends only on the clients' task durations (the simulated clock of
:mod:`fedjax_lite.systems.clock`), never on the model's values, so the whole event order is decided here, on the
host, before the device computes anything: the device then runs one compiled step per server update
(:func:`fedjax_lite.algorithms.fed_buff`).

The rules (deterministic given the seed):

* At time 0, ``concurrency`` clients start, downloading version 0. A task of client ``c`` started at ``t`` arrives at
  ``t + task_seconds[c]`` (from :func:`fedjax_lite.systems.client_timings`: download, full local work, upload).
  The availability model decides whether it gets there: the clients of the ``b``-th start draw
  ``availability.offline_at(clients, t, task_seconds, seed=seed, round_num=b)`` -- ``RandomDropout(p)``'s random
  drop-outs, or the end of an ``AvailabilityWindows`` window that closes before the task is done (a task ending
  exactly when its window closes is done) -- and a client that goes offline mid-task **drops out** at that time
  (aborted: counted in ``num_dropped_offline``, never trained, no arrival) and frees its place, as a dropped-out
  client of a synchronous round (:func:`fedjax_lite.systems.plan_round`) contributes nothing.
* Events are processed one simulated instant at a time. At instant ``t``, first every task arriving at ``t``, in
  the order they started (drop-outs of the instant counted in the same pass): its **staleness** is
  ``tau = version - downloaded version`` (server updates since it downloaded); if ``tau > max_staleness`` it is
  **dropped** (counted, never trained: its result would be discarded), else it enters the buffer, and whenever the
  buffer holds ``K`` arrivals the server applies them (``version += 1``). Then one new client starts per arrival or
  drop-out of the instant (stale ones included), plus one per idle place (below), all downloading the version
  current after the instant's updates.
* The clients that start together are drawn uniformly without replacement from the clients neither in flight nor
  waiting in the buffer (so a client contributes at most once to a server step, which user-level DP accounting
  needs; this needs ``concurrency + K - 1 <= num_clients``) and **online at ``t``** (with ``AvailabilityWindows``:
  inside one of their windows, whose end ``t + online_for`` is a later float than ``t``; every client otherwise): ``round_generator(seed, b, SAMPLING_STREAM).choice(available,
  n)`` for the ``b``-th start instant (0 at time 0; ``b`` counts the instants at which at least one client starts).
  With nothing in flight and every client online this is exactly :func:`fedjax_lite.core.sample_clients` for round
  ``b``, so when every task lasts the same and ``concurrency == K`` the server steps are synchronous rounds with
  FedAvg's cohorts, in selection order.
* When fewer such clients are online than places to fill, the others stay **idle** (``idle_places``) until the
  next instant -- an arrival, a drop-out, or the first time a free offline client's next window opens
  (``AvailabilityWindows.next_online``), a wake-up instant with no arrival -- where they are filled by the same rule.
  When nothing is in flight and no free client is ever online again (non-periodic windows that have ended), the
  schedule cannot go on: a ``RuntimeError`` says so; as it does when no server update comes for
  ``STALLED_INSTANTS + 10 (num_clients + concurrency)`` instants (every task aborted by its window or dropped as
  stale, e.g. windows shorter than every task), instead of simulating forever.

:class:`BufferedSchedule` produces the server steps one at a time (:class:`BufferedStep`: the ``K`` arrivals'
clients, downloaded versions and staleness, and the simulated time of the update). Memory is ``O(concurrency)``
(plus a bit per client); with windows, filling idle places costs ``O(num_clients)`` per instant.
"""

from __future__ import annotations

import dataclasses
import heapq
import math

import numpy as np

from fedjax_lite.core import validation
from fedjax_lite.core.federated_data import FederatedData
from fedjax_lite.core.packing import ClientSpec
from fedjax_lite.core.sampling import SAMPLING_STREAM, round_generator
from fedjax_lite.systems.availability import AlwaysOn, Availability, AvailabilityWindows, RandomDropout
from fedjax_lite.systems.clock import client_timings
from fedjax_lite.systems.population import ClientSystems

METRICS_PREFIX = "fedbuff/"
STALLED_INSTANTS = 100_000  # instants without a server update (plus 10 per client and place) before giving up


@dataclasses.dataclass(frozen=True, eq=False)
class BufferedStep:
  """One server update of FedBuff: the ``K`` arrivals it aggregates, in arrival order.

  Attributes:
    step: the server step (from 0): it turns version ``step`` into ``step + 1``.
    clients: int64 ``[K]`` storage indices of the arriving clients.
    versions: int64 ``[K]`` the server version each downloaded.
    staleness: int64 ``[K]``: ``step - versions`` (in ``[0, max_staleness]``).
    start_seconds: float64 ``[K]``: when each started; arrival_seconds: float64 ``[K]`` when it arrived.
    time_seconds: the simulated time of the update (the ``K``-th arrival).
    num_arrivals: arrivals since the previous update, dropped ones included.
    num_dropped_stale: arrivals since the previous update dropped as staler than ``max_staleness``.
    num_dropped_offline: tasks since the previous update that went offline before arriving.
    idle_places: places of the ``concurrency`` without a client at the update (no free client was online).
  """

  step: int
  clients: np.ndarray
  versions: np.ndarray
  staleness: np.ndarray
  start_seconds: np.ndarray
  arrival_seconds: np.ndarray
  time_seconds: float
  num_arrivals: int
  num_dropped_stale: int
  num_dropped_offline: int = 0
  idle_places: int = 0


class BufferedSchedule:
  """FedBuff's event order (module docstring): a host-side simulation of the in-flight clients and the buffer.

  Args:
    task_seconds: float64 ``[num_clients]``: how long one task of each client lasts (> 0 and finite), e.g.
      ``client_timings(...).total_seconds`` for every client's full local work (:func:`task_seconds_of`).
    concurrency: clients training at once (``concurrency + buffer_size - 1 <= num_clients``).
    buffer_size: ``K``, arrivals per server update (>= 1).
    max_staleness: arrivals staler than this are dropped (>= 0).
    seed: the run's seed (client draws, dropouts).
    availability: optional availability model of the clients: ``AlwaysOn()`` (the default), ``RandomDropout(p)``
      or ``AvailabilityWindows`` (one client's windows per task duration; only online clients start, a window
      closing mid-task aborts it; module docstring).

  Attributes (read-only views of the simulation):
    steps_taken: server updates taken (:meth:`next_step`) so far: the schedule's position;
    version: server updates planned so far (``>= steps_taken``: planning runs ahead, :meth:`planned`);
    time_seconds: the simulated time of the last instant processed;
    num_arrivals, num_dropped_stale, num_dropped_offline, num_started: totals since the start (of the planning).
  """

  def __init__(self, task_seconds, *, concurrency: int, buffer_size: int, max_staleness: int, seed: int = 0,
               availability: Availability | None = None):
    task_seconds = np.array(task_seconds, dtype=np.float64).reshape(-1)
    if task_seconds.size == 0 or not np.all(np.isfinite(task_seconds)) or np.any(task_seconds <= 0):
      raise ValueError("task_seconds must be a non-empty array of positive, finite durations, one per client.")
    num_clients = task_seconds.shape[0]
    validation.check_int("concurrency", concurrency, minimum=1)
    validation.check_int("buffer_size", buffer_size, minimum=1)
    if concurrency + buffer_size - 1 > num_clients:
      raise ValueError(f"concurrency + buffer_size - 1 ({concurrency} + {buffer_size} - 1) must be <= the number of "
                       f"clients ({num_clients}): a client trains one task at a time and contributes at most once to "
                       "a server step, so up to concurrency clients in flight and K - 1 waiting in the buffer cannot "
                       "start.")
    validation.check_int("max_staleness", max_staleness, minimum=0)
    validation.check_int("seed", seed, minimum=0)
    availability = AlwaysOn() if availability is None else availability
    if not isinstance(availability, (AlwaysOn, RandomDropout, AvailabilityWindows)):
      raise ValueError(f"FedBuff's event order supports AlwaysOn(), RandomDropout(p) and AvailabilityWindows "
                       f"availability, got {type(availability).__name__}.")
    if isinstance(availability, AvailabilityWindows) and availability.num_clients != num_clients:
      raise ValueError(f"availability has windows for {availability.num_clients} clients, task_seconds "
                       f"{num_clients}: one per client.")
    self.availability = availability
    task_seconds.setflags(write=False)
    self.task_seconds = task_seconds
    self.concurrency, self.buffer_size, self.max_staleness, self.seed = concurrency, buffer_size, max_staleness, seed
    self.version = 0
    self.time_seconds = 0.0
    self.num_arrivals = 0
    self.num_dropped_stale = 0
    self.num_dropped_offline = 0
    self.num_started = 0
    self.steps_taken = 0
    self._num_starts = 0  # start instants so far (the sampling stream's round)
    # (arrival or drop-out time, start order, client, version, start time, arrives: False for a drop-out)
    self._in_flight: list[tuple[float, int, int, int, float, bool]] = []
    self._busy = np.zeros(num_clients, bool)
    self._buffer: list[tuple[int, int, float, float]] = []  # (client, version, start, arrival)
    self._ready: list[BufferedStep] = []
    self._since = [0, 0, 0]  # arrivals, dropped stale, dropped offline since the last update
    self._idle = 0  # places without a client (no free client online when they were to be filled)
    self._wake_seconds = math.inf  # when a free client next comes online, while places are idle
    self._start(concurrency, 0.0)

  @property
  def num_clients(self) -> int:
    return self.task_seconds.shape[0]

  @property
  def in_flight(self) -> dict[str, np.ndarray]:
    """The clients training now: ``{'clients', 'versions', 'start_seconds', 'arrival_seconds'}`` in start order."""
    rows = sorted(self._in_flight, key=lambda row: row[1])
    return {"clients": np.array([r[2] for r in rows], np.int64), "versions": np.array([r[3] for r in rows], np.int64),
            "start_seconds": np.array([r[4] for r in rows]), "arrival_seconds": np.array([r[0] for r in rows])}

  @property
  def idle_places(self) -> int:
    """Places of the ``concurrency`` with no client training, because no free client was online to fill them
    (availability windows); they are filled at the next instant a free client is online."""
    return self._idle

  def _online(self, clients: np.ndarray, now: float) -> np.ndarray:
    """Online at ``now``: inside a window whose end is a later simulated time than ``now`` (``now + remaining >
    now``: a window ending less than a rounding unit after ``now`` has ended, else a task started then would be
    aborted at ``now`` itself and the clock would not move)."""
    if isinstance(self.availability, AvailabilityWindows):
      return now + self.availability.online_for(clients, now) > now
    return np.ones(clients.shape, bool)

  def _start(self, count: int, now: float) -> None:
    """Starts up to ``count`` clients at ``now``, drawn from the free clients online at ``now``; the places left
    idle wait for the next instant a free client is online."""
    free = np.flatnonzero(~self._busy)
    available = free[self._online(free, now)]
    num_new = min(count, available.shape[0])
    self._idle = count - num_new
    self._wake_seconds = math.inf
    if self._idle:
      offline = free[~self._online(free, now)]
      wait = self.availability.next_online(offline, now) if offline.size else np.array([np.inf])
      wake = now + float(np.min(wait))
      # A wake-up rounded onto (or before) ``now`` would repeat this instant: the next representable time instead.
      self._wake_seconds = wake if wake > now else float(np.nextafter(now, math.inf))
    if num_new == 0:
      return
    chosen = round_generator(self.seed, self._num_starts, SAMPLING_STREAM).choice(available, size=num_new,
                                                                                  replace=False).astype(np.int64)
    durations = self.task_seconds[chosen]
    offline = np.asarray(self.availability.offline_at(chosen, now, durations, seed=self.seed,
                                                      round_num=self._num_starts), np.float64)
    self._num_starts += 1
    for client, duration, gone in zip(chosen.tolist(), durations.tolist(), offline.tolist()):
      arrives = not math.isfinite(gone)
      heapq.heappush(self._in_flight, (now + (duration if arrives else gone), self.num_started, client,
                                       self.version, now, arrives))
      self._busy[client] = True
      self.num_started += 1

  def _instant(self) -> None:
    """Processes the next simulated instant: its arrivals and drop-outs, the updates they complete, then the new
    starts (one per arrival or drop-out, plus the idle places)."""
    now = min(self._in_flight[0][0] if self._in_flight else math.inf, self._wake_seconds)
    if not math.isfinite(now):
      raise RuntimeError(f"FedBuff's event order cannot go on after simulated time {self.time_seconds:g} s (server "
                         f"step {self.version}): no client is training and no free client is ever online again "
                         "(their availability windows have ended); give windows that repeat (period_seconds) or "
                         "last longer.")
    arrived = []
    while self._in_flight and self._in_flight[0][0] == now:
      arrived.append(heapq.heappop(self._in_flight))  # ties pop in start order (the heap's second key)
    for _, _, client, version, start, arrives in arrived:
      if not arrives or self.version - version > self.max_staleness:
        self._busy[client] = False  # free again; a buffered client is freed when its update is applied
      if not arrives:
        self.num_dropped_offline += 1
        self._since[2] += 1
        continue
      self.num_arrivals += 1
      self._since[0] += 1
      if self.version - version > self.max_staleness:
        self.num_dropped_stale += 1
        self._since[1] += 1
        continue
      self._buffer.append((client, version, start, now))
      if len(self._buffer) == self.buffer_size:
        self._update(now)
    self.time_seconds = now
    self._start(len(arrived) + self._idle, now)

  def _update(self, now: float) -> None:
    clients, versions, starts, arrivals = (np.array(column) for column in zip(*self._buffer))
    versions = versions.astype(np.int64)
    self._ready.append(BufferedStep(
        step=self.version, clients=clients.astype(np.int64), versions=versions, staleness=self.version - versions,
        start_seconds=starts.astype(np.float64), arrival_seconds=arrivals.astype(np.float64), time_seconds=now,
        num_arrivals=self._since[0], num_dropped_stale=self._since[1], num_dropped_offline=self._since[2],
        idle_places=self._idle))
    self._busy[clients.astype(np.int64)] = False
    self._buffer = []
    self._since = [0, 0, 0]
    self.version += 1

  def next_step(self) -> BufferedStep:
    """Takes the next server update (simulating instants until the buffer fills): step ``steps_taken``."""
    step = self.planned(self.steps_taken)
    self._ready.pop(0)
    self.steps_taken += 1
    return step

  def planned(self, step: int) -> BufferedStep:
    """Server update ``step`` (``>= steps_taken``) WITHOUT taking it: simulates up to it, and keeps it and the
    updates before it for :meth:`next_step` (a driver packs step ``s + 1`` while step ``s`` runs)."""
    validation.check_int("step", step, minimum=self.steps_taken)
    stalled_at, limit = self.time_seconds, STALLED_INSTANTS + 10 * (self.num_clients + self.concurrency)
    while len(self._ready) <= step - self.steps_taken:
      version = self.version
      for _ in range(limit):
        self._instant()
        if self.version != version:
          break
      else:
        raise RuntimeError(
            f"FedBuff's event order made no server update in {limit} simulated instants (from {stalled_at:g} s to "
            f"{self.time_seconds:g} s, at server step {self.version}): every task is aborted by its client going "
            f"offline ({self.num_dropped_offline} so far) or dropped as stale ({self.num_dropped_stale}); give the "
            "clients availability windows longer than their tasks, or a larger max_staleness.")
    return self._ready[step - self.steps_taken]

  def peek_time(self) -> float:
    """The simulated time of the next server update (simulates up to it without taking it)."""
    return self.planned(self.steps_taken).time_seconds


def step_metrics(step: BufferedStep) -> dict[str, float | int]:
  """A server update's flat ``fedbuff/`` metrics: ``server_steps`` (after it), ``arrivals``, ``dropped_stale`` and
  ``dropped_offline`` since the previous update, ``mean_staleness`` and ``max_staleness`` of its ``K`` arrivals,
  ``idle_places`` (places without a client at the update: no free client online), and the simulated
  ``elapsed_seconds`` / ``elapsed_hours`` at the update."""
  metrics = {"server_steps": step.step + 1, "arrivals": step.num_arrivals, "dropped_stale": step.num_dropped_stale,
             "dropped_offline": step.num_dropped_offline,
             "mean_staleness": float(np.mean(step.staleness)), "max_staleness": int(np.max(step.staleness)),
             "idle_places": step.idle_places,
             "elapsed_seconds": float(step.time_seconds), "elapsed_hours": float(step.time_seconds) / 3600.0}
  return {METRICS_PREFIX + key: value for key, value in metrics.items()}


def default_max_staleness(concurrency: int, buffer_size: int) -> int:
  """``4 * ceil(concurrency / K)``: the staleness bound the driver and the CLI use when none is given.

  The paper fixes none (its staleness stays bounded by the concurrency); ``ceil(concurrency / K)`` is about the
  server updates one task spans when every task lasts the same, so this keeps tasks up to four times slower than
  the typical one and drops the rare slower ones.
  """
  validation.check_int("concurrency", concurrency, minimum=1)
  validation.check_int("buffer_size", buffer_size, minimum=1)
  return 4 * math.ceil(concurrency / buffer_size)


def task_seconds_of(systems: ClientSystems, data: FederatedData, client_spec: ClientSpec, *, download_bits: int,
                    upload_bits: int) -> np.ndarray:
  """float64 ``[num_clients]``: how long one task of each client lasts -- download, its full local work under
  ``client_spec`` (``ClientSpec.num_steps`` / ``num_examples``) and upload, on the simulated clock
  (:func:`fedjax_lite.systems.client_timings`); the :class:`BufferedSchedule`'s ``task_seconds``."""
  if not isinstance(data, FederatedData):
    raise TypeError(f"data must be a FederatedData, got {type(data).__name__}.")
  if not isinstance(client_spec, ClientSpec):
    raise TypeError(f"client_spec must be a ClientSpec, got {type(client_spec).__name__}.")
  systems.check_population(data.num_clients, data.client_ids)
  clients = np.arange(data.num_clients)
  return client_timings(systems, clients, steps=client_spec.num_steps(data, clients),
                        num_examples=client_spec.num_examples(data, clients), download_bits=download_bits,
                        upload_bits=upload_bits).total_seconds
