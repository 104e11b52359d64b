"""Federated data on the host: client id -> dict of numpy arrays.

A :class:`FederatedData` stores every client's examples concatenated client-major in one numpy array per feature,
plus ``offsets`` marking where each client starts (a CSR layout). That makes a round's packing fully vectorized
(:mod:`fedjax_lite.core.packing`) for thousands of clients, while ``data[client_id]`` still returns one client's
examples as a dict. It is immutable; ``preprocess``, ``subset`` and the constructors return new objects.
"""

from __future__ import annotations

import dataclasses
import mmap
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

ClientExamples = dict[str, np.ndarray]


def _immutable_copy(value: Any) -> np.ndarray:
  """A private copy of ``value``, except a read-only memory map of a file (e.g. a dataset cache opened with
  ``np.load(mmap_mode='r')``, or a view of one), which nothing can write through: it is kept as is, so that
  loading a large cached dataset neither copies it nor reads it from disk."""
  node = value
  while isinstance(node, np.ndarray) and not node.flags.writeable:
    node = node.base
  if isinstance(value, np.memmap) and isinstance(node, mmap.mmap):
    return value
  return np.array(value, copy=True)


def _as_example_dict(examples: Mapping[str, Any], where: str) -> ClientExamples:
  if not isinstance(examples, Mapping) or not examples:
    raise TypeError(f"{where} must be a non-empty dict of feature name -> array, got {type(examples).__name__}.")
  arrays = {str(key): _immutable_copy(value) for key, value in examples.items()}
  for key, value in arrays.items():
    if value.ndim < 1:
      raise ValueError(f"{where}[{key!r}] must have a leading example axis, got a scalar.")
  lengths = {key: value.shape[0] for key, value in arrays.items()}
  if len(set(lengths.values())) != 1:
    raise ValueError(f"{where}: every feature must have the same number of examples, got {lengths}.")
  return arrays


@dataclasses.dataclass(frozen=True, eq=False)
class FederatedData:
  """Clients' examples, held on the host.

  Attributes:
    client_ids: the clients' ids, in storage order.
    examples: feature name -> array of all clients' examples concatenated (client-major).
    offsets: int64 array of ``num_clients + 1`` boundaries; client ``k`` owns rows ``offsets[k]:offsets[k+1]``.
  """

  client_ids: tuple[str, ...]
  examples: Mapping[str, np.ndarray]
  offsets: np.ndarray

  def __post_init__(self):
    ids = tuple(str(cid) for cid in self.client_ids)
    object.__setattr__(self, "client_ids", ids)
    if not ids:
      raise ValueError("FederatedData needs at least one client.")
    if len(set(ids)) != len(ids):
      raise ValueError("client_ids must be unique.")
    examples = _as_example_dict(self.examples, "examples")
    raw_offsets = np.asarray(self.offsets)
    if raw_offsets.shape != (len(ids) + 1,):
      raise ValueError(f"offsets must have shape ({len(ids) + 1},), got {raw_offsets.shape}.")
    offsets = raw_offsets.astype(np.int64)
    if not np.array_equal(offsets, raw_offsets):
      raise ValueError(f"offsets must be integers, got {raw_offsets.tolist()}.")
    if np.any(np.diff(offsets) < 0):
      raise ValueError(f"offsets must be non-decreasing, got {offsets.tolist()}.")
    total = next(iter(examples.values())).shape[0]
    if offsets[0] != 0 or offsets[-1] != total:
      raise ValueError(f"offsets must start at 0 and end at the number of examples ({total}).")
    sizes = np.diff(offsets)
    if np.any(sizes < 1):
      empty = [ids[k] for k in np.flatnonzero(sizes < 1)[:5]]
      raise ValueError(f"every client needs at least one example; empty clients: {empty}.")
    for value in examples.values():
      value.setflags(write=False)
    offsets.setflags(write=False)
    object.__setattr__(self, "examples", examples)
    object.__setattr__(self, "offsets", offsets)
    object.__setattr__(self, "_index", {cid: k for k, cid in enumerate(ids)})

  # Construction --------------------------------------------------------------------------------------------------

  @classmethod
  def from_clients(cls, clients: Mapping[Any, Mapping[str, Any]]) -> "FederatedData":
    """Builds from ``{client_id: {feature: array}}``; every client must have the same features."""
    if not isinstance(clients, Mapping) or not clients:
      raise TypeError("clients must be a non-empty dict of client id -> dict of arrays.")
    ids = list(clients)
    per_client = [_as_example_dict(clients[cid], f"clients[{cid!r}]") for cid in ids]
    keys = set(per_client[0])
    for cid, examples in zip(ids, per_client):
      if set(examples) != keys:
        raise ValueError(f"client {cid!r} has features {sorted(examples)}, expected {sorted(keys)}.")
    from fedjax_lite.core.round_data import check_client_features  # per-example shapes, names the client

    check_client_features(dict(zip(ids, per_client)))
    examples = {key: np.concatenate([ex[key] for ex in per_client]) for key in sorted(keys)}
    sizes = [next(iter(ex.values())).shape[0] for ex in per_client]
    return cls(tuple(ids), examples, np.concatenate([[0], np.cumsum(sizes)]))

  @classmethod
  def from_arrays(cls, arrays: Mapping[str, Any], client_ids: Sequence[Any]) -> "FederatedData":
    """Builds from centralized arrays plus the client id of every example.

    Clients are ordered by sorted id; within a client, examples keep their original order.
    """
    arrays = _as_example_dict(arrays, "arrays")
    client_ids = np.asarray(client_ids)
    num_examples = next(iter(arrays.values())).shape[0]
    if client_ids.shape != (num_examples,):
      raise ValueError(f"client_ids must have one entry per example ({num_examples}), got shape {client_ids.shape}.")
    unique_ids, inverse = np.unique(client_ids, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(unique_ids))
    if np.all(np.diff(inverse) >= 0):  # already grouped in sorted-id order: no reorder (memory maps stay mapped)
      examples = dict(arrays)
    else:
      order = np.argsort(inverse, kind="stable")
      examples = {key: value[order] for key, value in arrays.items()}
    return cls(tuple(str(cid) for cid in unique_ids), examples, np.concatenate([[0], np.cumsum(counts)]))

  # Access ----------------------------------------------------------------------------------------------------------

  @property
  def num_clients(self) -> int:
    return len(self.client_ids)

  @property
  def client_sizes(self) -> np.ndarray:
    """Number of examples of each client, in storage order."""
    return np.diff(self.offsets)

  @property
  def num_examples(self) -> int:
    return int(self.offsets[-1])

  @property
  def element_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """feature -> (shape of one example, dtype)."""
    return {key: (value.shape[1:], value.dtype) for key, value in self.examples.items()}

  def index_of(self, client_id: Any) -> int:
    try:
      return self._index[str(client_id)]
    except KeyError:
      raise KeyError(f"unknown client id {client_id!r}.") from None

  def client(self, client: int | str) -> ClientExamples:
    """One client's examples, by storage index (int) or id (str)."""
    if isinstance(client, (bool, np.bool_)):
      raise TypeError("client must be a storage index (int) or a client id (str), got a bool.")
    index = client if isinstance(client, (int, np.integer)) else self.index_of(client)
    if not 0 <= index < self.num_clients:
      raise IndexError(f"client index {index} out of range [0, {self.num_clients}).")
    start, stop = self.offsets[index], self.offsets[index + 1]
    return {key: value[start:stop] for key, value in self.examples.items()}

  def __getitem__(self, client_id: str) -> ClientExamples:
    return self.client(self.index_of(client_id))

  def __contains__(self, client_id: Any) -> bool:
    return str(client_id) in self._index

  def __len__(self) -> int:
    return self.num_clients

  def __iter__(self) -> Iterable[str]:
    return iter(self.client_ids)

  def __repr__(self) -> str:
    sizes = self.client_sizes
    return (
        f"FederatedData({self.num_clients} clients, {self.num_examples} examples, "
        f"sizes {sizes.min()}..{sizes.max()}, features {sorted(self.examples)})"
    )

  def all_examples(self) -> ClientExamples:
    """Every client's examples as one centralized dict (e.g. for centralized evaluation)."""
    return dict(self.examples)

  # Transformations ------------------------------------------------------------------------------------------------

  def subset(self, client_ids: Iterable[Any]) -> "FederatedData":
    """The clients named in ``client_ids``, in that order."""
    indices = [self.index_of(cid) for cid in client_ids]
    if len(set(indices)) != len(indices):
      raise ValueError("client_ids passed to subset must be distinct (a FederatedData holds each client once).")
    return FederatedData.from_clients({self.client_ids[k]: self.client(k) for k in indices})

  def preprocess(self, fn: Callable[[ClientExamples], Mapping[str, Any]]) -> "FederatedData":
    """Applies ``fn(client_examples) -> client_examples`` to every client (on the host, once).

    ``fn`` may change features, shapes, dtypes and the number of examples, but must leave each client at least
    one example.
    """
    if not callable(fn):
      raise TypeError("preprocess needs a callable fn(client_examples) -> client_examples.")
    return FederatedData.from_clients({cid: fn(self.client(k)) for k, cid in enumerate(self.client_ids)})

  def num_steps(self, batch_size: int, num_epochs: int = 1, max_steps: int | None = None) -> np.ndarray:
    """Local steps each client takes: ``ceil(num_epochs * size / batch_size)``, capped at ``max_steps``."""
    steps = -(-(self.client_sizes * num_epochs) // batch_size)
    return np.minimum(steps, max_steps) if max_steps is not None else steps
