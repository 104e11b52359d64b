"""The client systems of a population: compute speed, bandwidths and availability of every client.

A :class:`ClientSystems` record describes each client of a :class:`~fedjax_lite.core.FederatedData` population
(same storage order) by what a simulated clock needs (:mod:`fedjax_lite.systems.clock`):

* compute: ``seconds_per_example`` (for the model being trained: a forward and backward pass of one example) and
  ``seconds_per_step`` (a fixed cost per local step: optimizer update, batch loading); a client's ``k`` local
  steps over ``n_k`` examples take ``k * seconds_per_step + n_k * seconds_per_example`` seconds;
* communication: ``download_bits_per_second`` and ``upload_bits_per_second``: the round's exact per-client bits
  (``broadcasted_bits``/``aggregated_bits`` of the round template) divided by them give the transfer times;
* ``availability``: when the client is online (:mod:`fedjax_lite.systems.availability`).

It is built by a generator (:func:`~fedjax_lite.systems.lognormal_systems`, :func:`~fedjax_lite.systems.constant_systems`)
or from a user's trace (:func:`~fedjax_lite.systems.load_trace`). The arrays are read-only numpy (host side: the
clock runs on the host while the device trains the previous round).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from fedjax_lite.systems.availability import AlwaysOn, Availability, AvailabilityWindows


def _per_client(name: str, value: Any, num_clients: int | None, *, positive: bool) -> np.ndarray:
  array = np.asarray(value, dtype=np.float64)
  if array.ndim != 1 or array.shape[0] < 1:
    raise ValueError(f"{name} must be a 1-d array with one entry per client, got shape {array.shape}.")
  if num_clients is not None and array.shape[0] != num_clients:
    raise ValueError(f"{name} has {array.shape[0]} clients, seconds_per_example has {num_clients}: every field "
                     "needs one entry per client.")
  bad = ~np.isfinite(array) | ((array <= 0) if positive else (array < 0))
  if np.any(bad):
    first = int(np.flatnonzero(bad)[0])
    raise ValueError(f"{name} must be finite and {'> 0' if positive else '>= 0'} for every client; client {first} "
                     f"has {array[first]!r} ({int(bad.sum())} such clients).")
  array = array.copy()
  array.setflags(write=False)
  return array


@dataclasses.dataclass(frozen=True, eq=False)
class ClientSystems:
  """Per-client compute speed, bandwidths and availability of a population (see the module docstring).

  Attributes:
    seconds_per_example: float64 ``[num_clients]``, >= 0: training time of one example (forward + backward).
    download_bits_per_second: float64 ``[num_clients]``, > 0.
    upload_bits_per_second: float64 ``[num_clients]``, > 0.
    seconds_per_step: float64 ``[num_clients]``, >= 0: a fixed cost per local step (default zeros).
    availability: an :class:`~fedjax_lite.systems.availability.Availability` model (default always on);
      window-based models must describe the same number of clients.
    client_ids: optional ids of the clients, in the population's storage order (a trace's ids).
  """

  seconds_per_example: np.ndarray
  download_bits_per_second: np.ndarray
  upload_bits_per_second: np.ndarray
  seconds_per_step: np.ndarray | None = None
  availability: Availability = AlwaysOn()
  client_ids: tuple[str, ...] | None = None

  def __post_init__(self):
    per_example = _per_client("seconds_per_example", self.seconds_per_example, None, positive=False)
    num_clients = per_example.shape[0]
    object.__setattr__(self, "seconds_per_example", per_example)
    for name in ("download_bits_per_second", "upload_bits_per_second"):
      object.__setattr__(self, name, _per_client(name, getattr(self, name), num_clients, positive=True))
    per_step = np.zeros(num_clients) if self.seconds_per_step is None else self.seconds_per_step
    object.__setattr__(self, "seconds_per_step", _per_client("seconds_per_step", per_step, num_clients,
                                                             positive=False))
    if not isinstance(self.availability, Availability):
      raise TypeError("availability must be an availability model (AlwaysOn(), RandomDropout(p), "
                      f"AvailabilityWindows, ...), got {type(self.availability).__name__}.")
    if isinstance(self.availability, AvailabilityWindows) and self.availability.num_clients != num_clients:
      raise ValueError(f"availability describes {self.availability.num_clients} clients, the systems "
                       f"{num_clients}.")
    if self.client_ids is not None:
      ids = tuple(str(client_id) for client_id in self.client_ids)
      if len(ids) != num_clients or len(set(ids)) != num_clients:
        raise ValueError(f"client_ids must be {num_clients} distinct ids, got {len(ids)} ({len(set(ids))} distinct).")
      object.__setattr__(self, "client_ids", ids)

  @property
  def num_clients(self) -> int:
    return int(self.seconds_per_example.shape[0])

  def replace(self, **changes) -> "ClientSystems":
    """A copy with ``changes`` (e.g. ``availability=RandomDropout(0.1)``), validated again."""
    return dataclasses.replace(self, **changes)

  def check_population(self, num_clients: int, client_ids: tuple[str, ...] | None = None) -> None:
    """Raises ``ValueError`` unless these systems describe a population of ``num_clients`` clients (and, when both
    have ids, the same ids in the same order)."""
    if num_clients != self.num_clients:
      raise ValueError(f"the systems describe {self.num_clients} clients but the population has {num_clients}.")
    if client_ids is not None and self.client_ids is not None and tuple(client_ids) != self.client_ids:
      first = next(k for k, (a, b) in enumerate(zip(client_ids, self.client_ids)) if a != b)
      raise ValueError(f"the systems' client ids differ from the population's at position {first}: "
                       f"{self.client_ids[first]!r} vs {client_ids[first]!r} (load the trace with the population's "
                       "client_ids to order it).")

  def describe(self) -> dict:
    """A JSON-able summary (quantiles of each field and the availability model), e.g. for a run's configuration."""
    def quantiles(values):
      return [float(q) for q in np.quantile(values, [0.0, 0.1, 0.5, 0.9, 1.0])]

    return {"num_clients": self.num_clients, "seconds_per_example": quantiles(self.seconds_per_example),
            "seconds_per_step": quantiles(self.seconds_per_step),
            "download_bits_per_second": quantiles(self.download_bits_per_second),
            "upload_bits_per_second": quantiles(self.upload_bits_per_second),
            "availability": self.availability.describe()}
