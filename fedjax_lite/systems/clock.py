"""The simulated clock: how long each client's part of a round takes, and the run's elapsed simulated time.

A client of a round downloads what the server broadcasts, trains its local steps, and uploads its update
(Bonawitz et al. 2019; FedScale's simulator, Lai et al. 2022, adds the same three terms). With the round's exact
per-client bit counts ``D`` (download) and ``U`` (upload) -- the round template's ``broadcasted_bits`` and
``aggregated_bits`` per client, static for a model and an aggregator -- and the client's systems
(:class:`~fedjax_lite.systems.ClientSystems`), client ``k`` taking ``s`` local steps over ``e(s)`` examples needs

  ``T_k(s) = D / download_bps_k + (s * seconds_per_step_k + e(s) * seconds_per_example_k) + U / upload_bps_k``

seconds, evaluated in float64 in exactly this order. ``e(s) = min(s * B, n_k)`` for batch size ``B`` and the
``n_k`` examples its full local work covers (only a client's last batch is partial: :mod:`fedjax_lite.core.packing`).
``T_k`` never decreases with ``s``; :func:`steps_within` finds the most steps that fit a time limit (a deadline).

:class:`SimulatedClock` accumulates the rounds' durations (host side: the duration of a round is known when it is
planned, before the device runs it, so the clock never waits for the device).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fedjax_lite.core import validation
from fedjax_lite.systems.population import ClientSystems


@dataclasses.dataclass(frozen=True, eq=False)
class ClientTimings:
  """Seconds of each part of a task, per client (float64 arrays of one shape)."""

  download_seconds: np.ndarray
  compute_seconds: np.ndarray
  upload_seconds: np.ndarray

  @property
  def total_seconds(self) -> np.ndarray:
    """``download + compute + upload``, in that order of summation."""
    return self.download_seconds + self.compute_seconds + self.upload_seconds


def check_clients(systems: ClientSystems, clients) -> np.ndarray:
  if not isinstance(systems, ClientSystems):
    raise TypeError(f"systems must be a ClientSystems, got {type(systems).__name__}.")
  clients = np.asarray(clients).reshape(-1)
  if clients.size and not np.issubdtype(clients.dtype, np.integer):
    raise TypeError(f"clients must be integer storage indices, got dtype {clients.dtype}.")
  clients = clients.astype(np.int64)
  if np.any((clients < 0) | (clients >= systems.num_clients)):
    raise ValueError(f"clients must lie in [0, {systems.num_clients}) (the systems' population).")
  return clients


def check_counts(name: str, values, shape) -> np.ndarray:
  values = np.asarray(values)
  if values.shape != shape or (values.size and not np.issubdtype(values.dtype, np.integer)):
    raise ValueError(f"{name} must be integers, one per client ({shape[0]}), got shape {values.shape} and dtype "
                     f"{values.dtype}.")
  if np.any(values < 0):
    raise ValueError(f"{name} must be >= 0.")
  return values.astype(np.int64)


def check_bits(download_bits: int, upload_bits: int) -> tuple[int, int]:
  return (validation.check_int("download_bits", download_bits, minimum=0),
          validation.check_int("upload_bits", upload_bits, minimum=0))


def examples_done(steps: np.ndarray, num_examples: np.ndarray, batch_size: int) -> np.ndarray:
  """``e(s) = min(s * B, n)``: the examples of a client's first ``s`` batches (only its last batch is partial)."""
  return np.minimum(np.asarray(steps, np.int64) * int(batch_size), np.asarray(num_examples, np.int64))


def client_timings(systems: ClientSystems, clients, *, steps, num_examples, download_bits: int,
                   upload_bits: int) -> ClientTimings:
  """Download, compute and upload seconds of ``clients`` taking ``steps`` local steps over ``num_examples``
  examples (see the module docstring).

  Args:
    systems: the population's systems.
    clients: storage indices (int ``[n]``).
    steps: local steps per client (int ``[n]``, >= 0).
    num_examples: examples those steps cover per client (int ``[n]``, >= 0).
    download_bits: bits the server sends ONE client (a Python int: the round template's per-client
      ``broadcasted_bits``).
    upload_bits: bits ONE client uploads (the per-client ``aggregated_bits``).
  """
  clients = check_clients(systems, clients)
  steps = check_counts("steps", steps, clients.shape)
  num_examples = check_counts("num_examples", num_examples, clients.shape)
  download_bits, upload_bits = check_bits(download_bits, upload_bits)
  compute = steps * systems.seconds_per_step[clients] + num_examples * systems.seconds_per_example[clients]
  return ClientTimings(download_seconds=download_bits / systems.download_bits_per_second[clients],
                       compute_seconds=compute,
                       upload_seconds=upload_bits / systems.upload_bits_per_second[clients])


def task_seconds(systems: ClientSystems, clients: np.ndarray, steps: np.ndarray, num_examples: np.ndarray,
                 batch_size: int, download_bits: int, upload_bits: int) -> np.ndarray:
  """``T_k(s)`` of the module docstring for ``s = steps`` (unchecked arguments: an internal helper)."""
  done = examples_done(steps, num_examples, batch_size)
  compute = steps * systems.seconds_per_step[clients] + done * systems.seconds_per_example[clients]
  return (download_bits / systems.download_bits_per_second[clients] + compute
          + upload_bits / systems.upload_bits_per_second[clients])


def steps_within(systems: ClientSystems, clients, *, seconds: float, full_steps, num_examples, batch_size: int,
                 download_bits: int, upload_bits: int) -> np.ndarray:
  """The most local steps ``s <= full_steps`` each client can take and still report within ``seconds``:
  ``max {s : T_k(s) <= seconds}``, or ``-1`` when even ``T_k(0)`` (download plus upload) exceeds it.

  ``T_k`` is non-decreasing in ``s`` (also in float64: each term is), so a vectorized binary search over
  ``[0, full_steps]`` finds the answer exactly, in ``log2(max steps)`` passes.

  Args:
    systems: the population's systems.
    clients: storage indices (int ``[n]``).
    seconds: the time limit, from the start of the task (>= 0).
    full_steps: each client's full local steps (int ``[n]``).
    num_examples: the examples of its full local work (int ``[n]``): ``e(s) = min(s * B, n)``.
    batch_size: ``B``.
    download_bits: per-client download bits.
    upload_bits: per-client upload bits.
  """
  clients = check_clients(systems, clients)
  full_steps = check_counts("full_steps", full_steps, clients.shape)
  num_examples = check_counts("num_examples", num_examples, clients.shape)
  validation.check_int("batch_size", batch_size, minimum=1)
  seconds = validation.check_float("seconds", seconds, low=0.0)
  download_bits, upload_bits = check_bits(download_bits, upload_bits)

  return search_steps(systems, clients, seconds, full_steps, num_examples, batch_size, download_bits, upload_bits)


def search_steps(systems: ClientSystems, clients: np.ndarray, seconds: float, full_steps: np.ndarray,
                 num_examples: np.ndarray, batch_size: int, download_bits: int, upload_bits: int) -> np.ndarray:
  """:func:`steps_within` on checked arguments (the binary search itself)."""

  def fits(steps):
    return task_seconds(systems, clients, steps, num_examples, batch_size, download_bits, upload_bits) <= seconds

  low = np.where(fits(np.zeros_like(full_steps)), 0, -1)  # invariant: low fits (or -1), high + 1 does not
  high = np.where(low < 0, -1, full_steps)
  while np.any(low < high):
    middle = (low + high + 1) // 2
    ok = fits(np.maximum(middle, 0))
    low = np.where((low < high) & ok, middle, low)
    high = np.where((low < high) & ~ok, middle - 1, high)
  return low


@dataclasses.dataclass
class SimulatedClock:
  """The run's simulated time: seconds elapsed since the first round started (a mutable host-side counter).

  Attributes:
    elapsed_seconds: float, >= 0.
  """

  elapsed_seconds: float = 0.0

  def __post_init__(self):
    self.elapsed_seconds = validation.check_float("elapsed_seconds", self.elapsed_seconds, low=0.0)

  @property
  def elapsed_hours(self) -> float:
    return self.elapsed_seconds / 3600.0

  def advance(self, seconds: float) -> float:
    """Adds ``seconds`` (>= 0) and returns the new elapsed time."""
    self.elapsed_seconds += validation.check_float("seconds", seconds, low=0.0)
    return self.elapsed_seconds
