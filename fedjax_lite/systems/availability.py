"""When clients are online: always, random dropout per round, or on/off windows over simulated time.

Host side, before a round is packed (:mod:`fedjax_lite.systems.rounds`): every availability model answers one
question for the selected clients of a round (or of one asynchronous task),

  ``offline_at(clients, start_seconds, task_seconds, seed=, round_num=) -> seconds``:

the time after ``start_seconds`` at which each client goes offline before its task of ``task_seconds`` is done
(``0`` when it is offline at the start), or ``+inf`` when it stays online until the task is done. A client that goes
offline mid-task contributes nothing (it never reports). Randomness comes from a numpy generator seeded with
``(seed, round_num, stream)`` (:func:`fedjax_lite.core.sampling.round_generator`), so a round's outcome is a
function of the run's seed and the round number alone (a resumed run draws the same dropouts).

* :class:`AlwaysOn` -- no client ever goes offline (the ideal rounds of the rest of the library).
* :class:`RandomDropout` -- each selected client independently drops out of a round with probability ``p``, at a
  time uniform over its task (the "dropout" of Bonawitz et al. 2019, "Towards Federated Learning at Scale", and of
  FedProx's experiments, Li et al. 2020).
* :class:`AvailabilityWindows` -- per-client on-intervals in simulated seconds, optionally periodic (a day, or a
  trace's length as in FedScale's ``client_behave_trace``, Lai et al. 2022); :func:`diurnal_availability` draws one
  daily window per client (a day-night pattern).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from fedjax_lite.core import sampling, validation

DROPOUT_STREAM = 0xD209
DIURNAL_STREAM = 0xD1A7
SECONDS_PER_DAY = 86400.0


@runtime_checkable
class Availability(Protocol):
  """An availability model (see the module docstring)."""

  def offline_at(self, clients: np.ndarray, start_seconds: float, task_seconds: np.ndarray, *, seed: int,
                 round_num: int) -> np.ndarray:
    ...

  def describe(self) -> dict:
    ...


def _check_task(clients, start_seconds, task_seconds) -> tuple[np.ndarray, float, np.ndarray]:
  clients = np.asarray(clients, dtype=np.int64).reshape(-1)
  task_seconds = np.asarray(task_seconds, dtype=np.float64).reshape(-1)
  if task_seconds.shape != clients.shape:
    raise ValueError(f"task_seconds must have one entry per client ({clients.shape[0]}), got {task_seconds.shape}.")
  if np.any(np.isnan(task_seconds)) or np.any(task_seconds < 0):
    raise ValueError("task_seconds must be >= 0 (inf allowed), without NaN.")
  start_seconds = validation.check_float("start_seconds", start_seconds, low=0.0)
  return clients, start_seconds, task_seconds


@dataclasses.dataclass(frozen=True)
class AlwaysOn:
  """Every client is online all the time: ``offline_at`` is ``+inf`` for every client."""

  def offline_at(self, clients, start_seconds, task_seconds, *, seed: int, round_num: int) -> np.ndarray:
    clients, _, _ = _check_task(clients, start_seconds, task_seconds)
    return np.full(clients.shape, np.inf)

  def describe(self) -> dict:
    return {"kind": "always_on"}


@dataclasses.dataclass(frozen=True)
class RandomDropout:
  """Each selected client drops out of a round independently with probability ``probability``.

  A dropped client goes offline at ``U * task_seconds`` after the start (``U`` uniform in ``[0, 1)``): mid-task,
  so it never reports. The draws for round ``r`` come from ``round_generator(seed, r, DROPOUT_STREAM)``, two per
  client in the order given: ``u = generator.random((2, n))``, dropped where ``u[0] < probability``, at
  ``u[1] * task_seconds``.

  Attributes:
    probability: the per-round dropout probability ``p`` in ``[0, 1]``.
  """

  probability: float

  def __post_init__(self):
    validation.check_float("probability", self.probability, low=0.0, high=1.0)

  def offline_at(self, clients, start_seconds, task_seconds, *, seed: int, round_num: int) -> np.ndarray:
    clients, _, task_seconds = _check_task(clients, start_seconds, task_seconds)
    validation.check_int("seed", seed, minimum=0)
    validation.check_int("round_num", round_num, minimum=0)
    draws = sampling.round_generator(seed, round_num, DROPOUT_STREAM).random((2, clients.shape[0]))
    dropped = draws[0] < self.probability
    return np.where(dropped, draws[1] * np.where(np.isfinite(task_seconds), task_seconds, 0.0), np.inf)

  def describe(self) -> dict:
    return {"kind": "random_dropout", "probability": float(self.probability)}


@dataclasses.dataclass(frozen=True, eq=False)
class AvailabilityWindows:
  """Per-client on-windows ``[start, end)`` in simulated seconds, repeating every ``period_seconds`` when given.

  Stored in a CSR layout (client ``k`` owns windows ``offsets[k]:offsets[k+1]``); build it with
  :meth:`from_windows`. Windows are merged when they overlap or touch, so a client online from 22:00 to 24:00 and
  from 0:00 to 6:00 of a periodic day is online from 22:00 to 6:00 without a break. A client without windows is
  never online; with ``period_seconds=None`` a client is offline after its last window.

  ``offline_at`` for a task starting at ``t``: 0 when the client is offline at ``t`` (``t`` modulo the period), else
  the end of its current window minus ``t`` when that comes before the task ends (``+inf`` otherwise). A task
  ending exactly when the window closes is done.

  Attributes:
    offsets: int64 ``[num_clients + 1]``.
    starts: float64 ``[num_windows]`` window starts (seconds, within ``[0, period)`` when periodic).
    ends: float64 ``[num_windows]`` window ends (``> start``, ``<= period`` when periodic; ``inf`` allowed
      otherwise: online from ``start`` on).
    period_seconds: the length of the repeating pattern (e.g. 86400 for a day), or None.
  """

  offsets: np.ndarray
  starts: np.ndarray
  ends: np.ndarray
  period_seconds: float | None = None

  def __post_init__(self):
    offsets = np.asarray(self.offsets)
    starts = np.asarray(self.starts, dtype=np.float64).reshape(-1)
    ends = np.asarray(self.ends, dtype=np.float64).reshape(-1)
    if offsets.ndim != 1 or offsets.shape[0] < 2 or not np.issubdtype(offsets.dtype, np.integer):
      raise ValueError(f"offsets must be integers [num_clients + 1] with num_clients >= 1, got shape "
                       f"{offsets.shape} and dtype {offsets.dtype}.")
    offsets = offsets.astype(np.int64)
    if offsets[0] != 0 or np.any(np.diff(offsets) < 0) or offsets[-1] != starts.shape[0]:
      raise ValueError("offsets must start at 0, never decrease and end at the number of windows "
                       f"({starts.shape[0]}).")
    if ends.shape != starts.shape:
      raise ValueError(f"starts and ends must have the same length, got {starts.shape} and {ends.shape}.")
    if not np.all(np.isfinite(starts)) or np.any(np.isnan(ends)):
      raise ValueError("window starts must be finite and ends not NaN.")
    if self.period_seconds is not None and not np.all(np.isfinite(ends)):
      raise ValueError("window ends must be finite when the windows repeat (period_seconds).")
    if np.any(ends <= starts) or np.any(starts < 0):
      bad = int(np.flatnonzero((ends <= starts) | (starts < 0))[0])
      client = int(np.searchsorted(offsets, bad, side="right") - 1)
      raise ValueError(f"client {client}: window [{starts[bad]}, {ends[bad]}) must have 0 <= start < end.")
    period = validation.check_positive("period_seconds", self.period_seconds, allow_none=True)
    if period is not None and np.any(ends > period):
      bad = int(np.flatnonzero(ends > period)[0])
      client = int(np.searchsorted(offsets, bad, side="right") - 1)
      raise ValueError(f"client {client}: window [{starts[bad]}, {ends[bad]}) must lie within the period "
                       f"[0, {period}].")
    owner = np.repeat(np.arange(offsets.shape[0] - 1), np.diff(offsets))
    order = np.lexsort((starts, owner))
    if np.any(order != np.arange(order.shape[0])):
      raise ValueError("windows must be sorted by start within each client (use AvailabilityWindows.from_windows).")
    if starts.shape[0] > 1:
      same = owner[1:] == owner[:-1]
      if np.any(same & (starts[1:] <= ends[:-1])):
        raise ValueError("a client's windows must not overlap or touch (use AvailabilityWindows.from_windows, "
                         "which merges them).")
    for array in (offsets, starts, ends):
      array.setflags(write=False)
    object.__setattr__(self, "offsets", offsets)
    object.__setattr__(self, "starts", starts)
    object.__setattr__(self, "ends", ends)
    object.__setattr__(self, "period_seconds", period)

  @classmethod
  def from_windows(cls, windows: Sequence[Sequence[tuple[float, float]]], period_seconds: float | None = None
                   ) -> "AvailabilityWindows":
    """From one list of ``(start, end)`` pairs per client (any order; overlapping or touching ones merged)."""
    if isinstance(windows, (str, bytes)) or not isinstance(windows, Sequence) or not windows:
      raise TypeError("windows must be a non-empty list (one entry per client) of lists of (start, end) pairs.")
    offsets, starts, ends = [0], [], []
    for client, client_windows in enumerate(windows):
      pairs = []
      for pair in client_windows:
        if len(pair) != 2:
          raise ValueError(f"client {client}: each window must be a (start, end) pair, got {pair!r}.")
        start, end = float(pair[0]), float(pair[1])
        if not math.isfinite(start) or math.isnan(end) or not 0 <= start < end:
          raise ValueError(f"client {client}: window ({pair[0]!r}, {pair[1]!r}) must have 0 <= start < end.")
        pairs.append((start, end))
      merged: list[list[float]] = []
      for start, end in sorted(pairs):
        if merged and start <= merged[-1][1]:
          merged[-1][1] = max(merged[-1][1], end)
        else:
          merged.append([start, end])
      starts += [start for start, _ in merged]
      ends += [end for _, end in merged]
      offsets.append(len(starts))
    return cls(np.asarray(offsets, np.int64), np.asarray(starts, np.float64), np.asarray(ends, np.float64),
               period_seconds)

  @property
  def num_clients(self) -> int:
    return int(self.offsets.shape[0] - 1)

  def _windows_of(self, clients, time_seconds: float) -> tuple[np.ndarray, ...]:
    """The clients (checked), the phase of ``time_seconds`` within the period, each client's first window and
    window count, and their windows flattened: ``(clients, phase, first, counts, owner, window)``, window ``j``
    of the flat list being ``window[j]``, owned by ``clients[owner[j]]``."""
    clients = np.asarray(clients, dtype=np.int64).reshape(-1)
    if np.any((clients < 0) | (clients >= self.num_clients)):
      raise ValueError(f"clients must lie in [0, {self.num_clients}).")
    time_seconds = validation.check_float("time_seconds", time_seconds, low=0.0)
    phase = time_seconds if self.period_seconds is None else math.fmod(time_seconds, self.period_seconds)
    first, counts = self.offsets[clients], self.offsets[clients + 1] - self.offsets[clients]
    total = int(counts.sum())
    owner = np.repeat(np.arange(clients.shape[0]), counts)
    window = np.repeat(first, counts) + (np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts))
    return clients, phase, first, counts, owner, window

  def online_for(self, clients, time_seconds: float) -> np.ndarray:
    """Seconds each client stays online from ``time_seconds`` on (0 when offline then; ``+inf`` when always on)."""
    clients, phase, first, counts, owner, window = self._windows_of(clients, time_seconds)
    period, total = self.period_seconds, window.shape[0]
    inside = (self.starts[window] <= phase) & (phase < self.ends[window])
    remaining = np.zeros(clients.shape[0])
    remaining[owner[inside]] = self.ends[window[inside]] - phase
    if period is not None and total:
      # A window ending at the period continues into a window starting at 0 of the next period.
      ends_at_period = np.zeros(clients.shape[0], bool)
      ends_at_period[owner[inside]] = self.ends[window[inside]] == period
      has_windows = counts > 0
      first_start = np.where(has_windows, self.starts[np.minimum(first, self.starts.shape[0] - 1)], np.inf)
      first_end = np.where(has_windows, self.ends[np.minimum(first, self.ends.shape[0] - 1)], 0.0)
      always = has_windows & (first_start == 0) & (first_end == period)
      wraps = ends_at_period & (first_start == 0)
      remaining = np.where(wraps, remaining + first_end, remaining)
      remaining = np.where(always, np.inf, remaining)
    return remaining

  def next_online(self, clients, time_seconds: float) -> np.ndarray:
    """Seconds from ``time_seconds`` until each client is next online: 0 when online then, the wait until the start
    of its next window otherwise (the next period's first window when periodic), ``+inf`` when it never is again.

    (Asynchronous FedBuff waits for this when no free client is online: :class:`fedjax_lite.systems.BufferedSchedule`.)
    """
    online = self.online_for(clients, time_seconds) > 0
    clients, phase, first, counts, owner, window = self._windows_of(clients, time_seconds)
    period, total = self.period_seconds, window.shape[0]
    later = self.starts[window] > phase
    wait = np.full(clients.shape[0], np.inf)
    np.minimum.at(wait, owner[later], self.starts[window[later]] - phase)
    if period is not None and total:  # the first window of the next period
      has_windows = counts > 0
      first_start = self.starts[np.minimum(first, self.starts.shape[0] - 1)]
      wait = np.where(has_windows, np.minimum(wait, period - phase + first_start), wait)
    return np.where(online, 0.0, wait)

  def offline_at(self, clients, start_seconds, task_seconds, *, seed: int, round_num: int) -> np.ndarray:
    del seed, round_num  # deterministic
    clients, start_seconds, task_seconds = _check_task(clients, start_seconds, task_seconds)
    remaining = self.online_for(clients, start_seconds)
    return np.where(task_seconds <= remaining, np.inf, remaining)

  def describe(self) -> dict:
    return {"kind": "windows", "num_clients": self.num_clients, "num_windows": int(self.starts.shape[0]),
            "period_seconds": self.period_seconds,
            "online_seconds": float(np.sum(self.ends - self.starts))}


def diurnal_availability(
    num_clients: int,
    *,
    seed: int = 0,
    online_hours: tuple[float, float] = (4.0, 10.0),
    start_hour: float | None = 22.0,
    start_spread_hours: float = 3.0,
) -> AvailabilityWindows:
  """One daily on-window per client, repeating every 24 hours: a day-night pattern.

  Client ``k`` is online from ``h_k`` to ``h_k + L_k`` hours every day, with ``L_k ~ Uniform(online_hours)`` and
  ``h_k ~ Normal(start_hour, start_spread_hours)`` wrapped into ``[0, 24)`` -- or ``Uniform[0, 24)`` with
  ``start_hour=None`` (a population spread over every time zone, so a constant fraction is online). A window that
  crosses midnight is split in two. Drawn from ``round_generator(seed, 0, DIURNAL_STREAM)``.

  The defaults (evening starts around 22:00, 4 to 10 hours online) are modelling assumptions, not measurements:
  they encode what Bonawitz et al. 2019 ("Towards Federated Learning at Scale", Sec. 2 and Fig. 5) describe --
  devices take part only when idle, charging and on an unmetered network, mostly at night local time, so the
  number of available devices swings over the day. Replace them with a trace (:func:`load_trace`) for conclusions
  that depend on the exact pattern.
  """
  validation.check_int("num_clients", num_clients, minimum=1)
  validation.check_int("seed", seed, minimum=0)
  if not (isinstance(online_hours, tuple) and len(online_hours) == 2):
    raise TypeError(f"online_hours must be a (low, high) tuple of hours, got {online_hours!r}.")
  low = validation.check_float("online_hours[0]", online_hours[0], low=0.0, high=24.0, low_inclusive=False)
  high = validation.check_float("online_hours[1]", online_hours[1], low=low, high=24.0)
  validation.check_float("start_hour", start_hour, low=0.0, high=24.0, high_inclusive=False, allow_none=True)
  validation.check_float("start_spread_hours", start_spread_hours, low=0.0)
  generator = sampling.round_generator(seed, 0, DIURNAL_STREAM)
  lengths = generator.uniform(low, high, num_clients) * 3600.0
  if start_hour is None:
    starts = generator.uniform(0.0, 24.0, num_clients) * 3600.0
  else:
    starts = np.mod(generator.normal(start_hour, start_spread_hours, num_clients), 24.0) * 3600.0
  full_day = lengths >= SECONDS_PER_DAY  # online all day: one window [0, day)
  ends = starts + lengths
  wraps = (ends > SECONDS_PER_DAY) & ~full_day  # split at midnight: (0, end - day) then (start, day)
  counts = np.where(wraps, 2, 1)
  offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
  window_starts = np.empty(int(offsets[-1]))
  window_ends = np.empty(int(offsets[-1]))
  last = offsets[1:] - 1
  window_starts[last] = np.where(full_day, 0.0, starts)
  window_ends[last] = np.where(wraps | full_day, SECONDS_PER_DAY, ends)
  first = offsets[:-1][wraps]
  window_starts[first] = 0.0
  # (end - day) < start for lengths under a day; min() keeps a rounding error from making the pieces touch.
  window_ends[first] = np.minimum(ends[wraps] - SECONDS_PER_DAY, np.nextafter(starts[wraps], 0.0))
  return AvailabilityWindows(offsets, window_starts, window_ends, SECONDS_PER_DAY)
