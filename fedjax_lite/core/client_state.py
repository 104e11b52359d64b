"""Per-client state for the whole population, kept on the host: gathered for a round, scattered back after it.

Stateful algorithms (SCAFFOLD's control variates, personal layers, per-client accounting) keep one state per
client of the POPULATION. Most clients are not in a given round, so the state lives on the host as one NumPy array
per leaf with a leading population axis (optionally a memory-mapped file, for populations that do not fit in
memory), and a round only moves its cohort's rows:

1. ``store.gather(cohort)`` -- one vectorized fancy-index per leaf -- gives the cohort's states ``[slots, ...]``,
   which ride in the packed round data as ``round_data['client_state']``;
2. the compiled round reads a client's row as its ``client_state`` and returns its new state stacked;
3. ``store.scatter(cohort, new_states, num_examples)`` writes the real clients' rows back. Padding slots (a
   Poisson round padded to its capacity, ``num_examples == 0``) never write, and clients never sampled keep their
   initial state.

Device memory grows with the cohort, host memory with the population (``store.nbytes``). No Python runs per
client. A client holds ONE state per round, so a cohort must not repeat a client (sampling with replacement
would train both slots from the same state and the algorithm's server-side bookkeeping, e.g. SCAFFOLD's
``c <- c + (1/N) sum_S Delta c_i``, would count it twice while only one state is kept): ``gather`` and ``scatter``
refuse repeated ids unless ``allow_repeats=True`` (then the later slot's state is kept).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from fedjax_lite.core import validation

PyTree = Any


class ClientStateStore:
  """The population's client states: a pytree of host arrays ``[num_clients, ...]`` (see the module docstring).

  Args:
    initial_state: ONE client's initial state (a pytree of arrays); every client starts from it.
    num_clients: the population size.
    directory: optional folder for memory-mapped ``.npy`` files (one per leaf), for populations that do not
      fit in memory; default in memory.
  """

  def __init__(self, initial_state: PyTree, num_clients: int, *, directory: str | os.PathLike | None = None):
    validation.check_int("num_clients", num_clients, minimum=1)
    leaves, self._treedef = jax.tree.flatten(initial_state)
    if not leaves:
      raise ValueError("initial_state must be a pytree with at least one array.")
    self.num_clients = int(num_clients)
    arrays = []
    for index, leaf in enumerate(leaves):
      leaf = np.asarray(leaf)
      shape = (self.num_clients,) + leaf.shape
      if directory is None:
        array = np.empty(shape, leaf.dtype)
      else:
        os.makedirs(directory, exist_ok=True)
        array = np.lib.format.open_memmap(os.path.join(directory, f"leaf_{index:04d}.npy"), mode="w+",
                                          dtype=leaf.dtype, shape=shape)
      array[...] = leaf
      arrays.append(array)
    self._leaves = arrays

  @property
  def arrays(self) -> PyTree:
    """The whole store: the state's pytree with every leaf ``[num_clients, ...]`` (host arrays, not copies)."""
    return jax.tree.unflatten(self._treedef, self._leaves)

  @property
  def nbytes(self) -> int:
    """Host bytes held by the store."""
    return int(sum(leaf.nbytes for leaf in self._leaves))

  def load(self, arrays: PyTree) -> None:
    """Replaces every client's state with ``arrays`` (same structure, shapes and dtypes; e.g. from a checkpoint)."""
    leaves, treedef = jax.tree.flatten(arrays)
    if treedef != self._treedef:
      raise ValueError(f"arrays must have the store's structure {self._treedef}, got {treedef}.")
    for own, new in zip(self._leaves, leaves):
      new = np.asarray(new)
      if new.shape != own.shape or new.dtype != own.dtype:
        raise ValueError(f"arrays must match the store's leaves: expected {own.shape} {own.dtype}, got "
                         f"{new.shape} {new.dtype}.")
      own[...] = new

  def _indices(self, client_ids: Any, num_slots: int | None = None, allow_repeats: bool = False) -> np.ndarray:
    ids = np.asarray(client_ids)
    if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
      raise ValueError(f"client_ids must be a 1-D array of integer client indices, got shape {ids.shape} "
                       f"dtype {ids.dtype}.")
    if ids.size and (ids.min() < 0 or ids.max() >= self.num_clients):
      raise ValueError(f"client_ids must lie in [0, {self.num_clients}), got values in [{ids.min()}, "
                       f"{ids.max()}].")
    if num_slots is not None and ids.size > num_slots:
      raise ValueError(f"{ids.size} client_ids do not fit in {num_slots} client slots.")
    if not allow_repeats:
      unique, counts = np.unique(ids, return_counts=True)
      if np.any(counts > 1):
        raise ValueError(f"client_ids repeat clients {unique[counts > 1].tolist()}: a client holds one state per "
                         "round, so stateful algorithms need cohorts without repeats (sample without replacement); "
                         "pass allow_repeats=True to keep the later slot's state.")
    return ids.astype(np.int64)

  def gather(self, client_ids: Any, num_slots: int | None = None, *, allow_repeats: bool = False) -> PyTree:
    """The states of ``client_ids`` stacked ``[num_slots, ...]``; slots past ``len(client_ids)`` (padding) get
    the state of client 0 (never written back). Repeated ids are refused unless ``allow_repeats``."""
    ids = self._indices(client_ids, num_slots, allow_repeats)
    num_slots = ids.size if num_slots is None else int(num_slots)
    padded = np.zeros((num_slots,), np.int64)
    padded[:ids.size] = ids
    return jax.tree.unflatten(self._treedef, [leaf[padded] for leaf in self._leaves])

  def scatter(self, client_ids: Any, new_states: PyTree, num_examples: Any | None = None, *,
              allow_repeats: bool = False) -> None:
    """Writes the first ``len(client_ids)`` rows of ``new_states`` back, skipping slots with
    ``num_examples == 0`` (padding, or a client with no data) when ``num_examples`` is given. Repeated ids are
    refused unless ``allow_repeats`` (then the later slot's state is kept)."""
    leaves, treedef = jax.tree.flatten(new_states)
    if treedef != self._treedef:
      raise ValueError(f"new_states must have the store's structure {self._treedef}, got {treedef}.")
    num_slots = int(np.shape(leaves[0])[0])
    ids = self._indices(client_ids, num_slots, allow_repeats)
    keep = np.ones((ids.size,), bool)
    if num_examples is not None:
      keep = np.asarray(num_examples)[:ids.size] > 0
    for own, new in zip(self._leaves, leaves):
      new = np.asarray(new)
      if new.shape[1:] != own.shape[1:]:
        raise ValueError(f"new_states leaves must be [slots] + {own.shape[1:]}, got {new.shape}.")
      own[ids[keep]] = new[:ids.size][keep].astype(own.dtype, copy=False)
