"""Per-client state for the whole population, kept on the host: gathered for a round, scattered back after it.

Stateful algorithms (SCAFFOLD's control variates, personal layers, per-client accounting) keep one state per
client of the POPULATION. Most clients are not in a given round, so the state lives on the host as one NumPy array
per leaf with a leading population axis (optionally a memory-mapped file, for populations that do not fit in
memory), and a round only moves its cohort's rows:

1. ``store.gather(cohort, num_slots)`` -- one vectorized ``np.take`` per leaf -- gives the cohort's states
   ``[slots, ...]``, passed to the round as its own argument: ``process.next(state, round_data, rng,
   client_states)``;
2. the compiled round reads a client's row as its ``client_state`` and returns the new states stacked in
   ``RoundOutput.client_states``;
3. ``store.scatter(cohort, output.client_states, num_examples)`` writes the real clients' rows back. Padding slots (a
   Poisson round padded to its capacity, ``num_examples == 0``) never write, and clients never sampled keep their
   initial state.

Device memory grows with the cohort, host memory with the population (``store.nbytes``). No Python runs per client,
and a round's traffic is one pass over the cohort's rows each way, with no new memory in steady state (a 10-client
cohort of the EMNIST CNN's control variates, 68 MB, went from ~0.3 s to a few tens of ms per round):

* ``gather`` writes each leaf with ONE ``np.take(..., out=)`` into a buffer the store keeps and reuses. Fresh
  68 MB buffers every round cost more in the kernel (page faults and unmapping: 0.1-0.25 s of system time per
  round on a VM) than the copy itself. A buffer is reused only when nothing else references it any more
  (``sys.getrefcount`` of its memory; the gathered arrays, their views and the JAX arrays made from them all hold
  a reference), so a gather never changes arrays that are still in use: a caller who keeps a gathered state
  simply gets a fresh buffer next time.
* The buffer's leaves start on 64-byte boundaries, so ``jax.device_put`` on XLA:CPU aliases them instead of copying
  (no second 68 MB pass); the JAX array keeps the memory referenced until it is freed. The store keeps at most two
  such buffers (host memory: twice the cohort's states, besides ``nbytes``).
* ``scatter`` assigns the kept slots with one fancy assignment per leaf, taking a view (not a copy) of the new
  states when the kept slots are a prefix (padding slots are the last ones).

A client holds ONE state per round, so a cohort must not repeat a client (sampling with replacement would train both
slots from the same state and the algorithm's server-side bookkeeping, e.g. SCAFFOLD's
``c <- c + (1/N) sum_S Delta c_i``, would count it twice while only one state is kept): ``gather`` and ``scatter``
refuse repeated ids unless ``allow_repeats=True`` (then the later slot's state is kept).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import jax
import numpy as np

from fedjax_lite.core import validation
from fedjax_lite.core.tree import PyTree

# XLA:CPU's ``device_put`` aliases host arrays whose data starts on a 64-byte boundary instead of copying them.
_ALIGNMENT = 64
# Gather buffers kept for reuse: one for the round being run and one for a round whose arrays are still alive.
_MAX_BUFFERS = 2


def _references(buffers: list, index: int) -> int:
  """The reference count of ``buffers[index]``, always taken by this same expression so that the interpreter's
  own temporary references (which differ between Python versions) are the same as in ``_UNVIEWED``."""
  return sys.getrefcount(buffers[index])


_UNVIEWED = _references([np.empty((0,), np.uint8)], 0)  # the count of a buffer held only by the store's list


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
    self._buffers: list[np.ndarray] = []  # raw byte buffers for gather, reused when nothing references them

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
    return ids.astype(np.intp, copy=False)

  def _gather_buffer(self, num_slots: int) -> list[np.ndarray]:
    """Empty ``[num_slots, ...]`` arrays for each leaf, views of one byte buffer with every leaf 64-byte aligned:
    a kept buffer of this size that nothing else references any more (see the module docstring), else a new one."""
    offsets, total = [], 0
    for leaf in self._leaves:
      offsets.append(total)
      total += -(-num_slots * leaf[:1].nbytes // _ALIGNMENT) * _ALIGNMENT
    raw = None
    for index in range(len(self._buffers)):
      # Any view of the buffer (a gathered leaf, a slice of it, or the JAX array device_put made from it) holds a
      # reference to it; with none, the count is what the same expression gives for an unviewed buffer.
      if self._buffers[index].size == total + _ALIGNMENT and _references(self._buffers, index) <= _UNVIEWED:
        raw = self._buffers[index]
        break
    if raw is None:
      raw = np.empty((total + _ALIGNMENT,), np.uint8)
      if len(self._buffers) < _MAX_BUFFERS:
        self._buffers.append(raw)
      else:  # the kept buffers are in use or of another size: replace the oldest (it lives on while referenced)
        self._buffers = self._buffers[1:] + [raw]
    start = -raw.ctypes.data % _ALIGNMENT
    views = []
    for leaf, offset in zip(self._leaves, offsets):
      size = num_slots * leaf[:1].nbytes
      views.append(raw[start + offset:start + offset + size].view(leaf.dtype).reshape((num_slots,) + leaf.shape[1:]))
    return views

  def gather(self, client_ids: Any, num_slots: int | None = None, *, allow_repeats: bool = False) -> PyTree:
    """The states of ``client_ids`` stacked ``[num_slots, ...]``; slots past ``len(client_ids)`` (padding) get
    the state of client 0 (never written back). Repeated ids are refused unless ``allow_repeats``.

    The result is a copy (writing to it does not change the store) in 64-byte aligned memory that the store
    reuses for a later gather once nothing references it (see the module docstring)."""
    ids = self._indices(client_ids, num_slots, allow_repeats)
    num_slots = ids.size if num_slots is None else int(num_slots)
    padded = np.zeros((num_slots,), np.intp)
    padded[:ids.size] = ids
    out = self._gather_buffer(num_slots)
    for leaf, view in zip(self._leaves, out):
      # mode='clip' (ids were checked above) lets take write straight into ``out`` instead of through a buffer.
      np.take(leaf, padded, axis=0, out=view, mode="clip")
    return jax.tree.unflatten(self._treedef, out)

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
    rows: slice | np.ndarray = slice(0, ids.size)
    if num_examples is not None:
      kept = np.flatnonzero(np.asarray(num_examples)[:ids.size] > 0)
      if kept.size < ids.size:  # a view when the kept slots are a prefix (padding is last), else the kept rows
        rows = slice(0, kept.size) if np.array_equal(kept, np.arange(kept.size)) else kept
        ids = ids[kept]
    for own, new in zip(self._leaves, leaves):
      new = np.asarray(new)
      if new.shape[1:] != own.shape[1:]:
        raise ValueError(f"new_states leaves must be [slots] + {own.shape[1:]}, got {new.shape}.")
      own[ids] = new[rows]  # one fancy assignment; numpy casts to the store's dtype as it copies
