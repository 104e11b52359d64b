"""The client runner: runs a per-client function over all clients of a round, inside one jitted program.

``run_clients(fn, broadcast, round_data, rng)`` evaluates ``fn(broadcast, client_data, client_rng)`` for every
client slot of ``round_data`` (the packed arrays of :mod:`fedjax_lite.core.packing`, leading axis = clients) and
returns the sum over real clients of the first output together with the stacked second output. Streaming the sum
is what keeps memory proportional to the clients processed at once rather than the cohort.

Strategies (``Runner.strategy``):

* ``'sequential'`` -- a ``lax.scan`` over clients carrying the running sum; memory holds one client at a time (per
  device). The CPU default: the scan is fast only because :class:`fedjax_lite.models.Conv` keeps its backward
  convolutions canonical inside loops (``docs/xla_cpu.md``). To keep every core busy, run one stream of clients per
  core: :func:`fedjax_lite.core.configure_cpu` gives this process one CPU device per core, and the default runner
  shards the client axis over them (below; measured on a 2-core CPU, ``benchmarks/README.md``: the standard CNN
  round 0.58x the one-device time).
* ``'vmap'`` -- all clients at once; the accelerator default.
* ``'chunked'`` -- ``chunk_size`` clients at a time with ``vmap``, chunks in a ``lax.scan``.
* ``'auto'`` -- ``'sequential'`` on CPU, ``'vmap'`` elsewhere.

With ``Runner.mesh`` set, the client axis is sharded over the mesh's first axis with ``jax.shard_map``: each
device runs the strategy on its clients and the partial sums are combined with ``psum`` (an XLA all-reduce). With
the sequential strategy in one process, the clients are dealt to the devices largest first in snake order, so
that ragged cohorts keep the devices' streams balanced.

Every client's randomness is ``fold_in(key, client_slot)`` of the round's key(s), so results do not depend on the strategy, the chunk
size or the number of devices (up to floating-point summation order). A client slot with ``num_examples == 0``
is padding: its summand is replaced by zeros.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from fedjax_lite.core import validation
from fedjax_lite.core.tree import PyTree
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

ClientFn = Callable[[PyTree, PyTree, jax.Array], tuple[PyTree, PyTree]]

STRATEGIES = ("auto", "sequential", "vmap", "chunked")


@dataclasses.dataclass(frozen=True)
class Runner:
  """How a round's clients are executed (static configuration).

  Attributes:
    strategy: one of ``'auto'``, ``'sequential'``, ``'vmap'``, ``'chunked'``.
    chunk_size: clients per ``vmap`` chunk for ``'chunked'``.
    mesh: optional device mesh; the client axis is sharded over its first axis.
    unroll: ``unroll`` of the sequential ``lax.scan`` over clients.
    shard_host_devices: with no ``mesh`` and several CPU devices in this (single) process -- what
      :func:`fedjax_lite.core.configure_cpu` sets up, one device per core -- shard the client axis over them
      (:meth:`resolved_mesh`). The fastest measured CPU configuration (``benchmarks/README.md``): each device
      runs its share of the clients as one sequential stream, one core each. False keeps one device.
  """

  strategy: str = "auto"
  chunk_size: int = 8
  mesh: Mesh | None = None
  unroll: int = 1
  shard_host_devices: bool = True

  def __post_init__(self):
    if self.strategy not in STRATEGIES:
      raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}.")
    validation.check_int("chunk_size", self.chunk_size, minimum=1)
    validation.check_int("unroll", self.unroll, minimum=1)
    object.__setattr__(self, "chunk_size", int(self.chunk_size))
    object.__setattr__(self, "unroll", int(self.unroll))
    if self.mesh is not None and not isinstance(self.mesh, Mesh):
      raise TypeError(f"mesh must be a jax.sharding.Mesh or None, got {type(self.mesh).__name__}.")
    if not isinstance(self.shard_host_devices, bool):
      raise TypeError(f"shard_host_devices must be a bool, got {type(self.shard_host_devices).__name__}.")

  def resolved_mesh(self) -> Mesh | None:
    """The mesh the client axis is sharded over: ``mesh`` if set; else, with ``shard_host_devices`` and several
    CPU devices in a single-process run, a 1-D mesh over them (:func:`host_client_mesh`); else None."""
    if self.mesh is not None:
      return self.mesh
    if (self.shard_host_devices and jax.default_backend() == "cpu" and jax.process_count() == 1
        and jax.local_device_count() > 1):
      return host_client_mesh(jax.local_device_count())
    return None

  def resolved_strategy(self) -> str:
    """The concrete strategy: ``'auto'`` becomes ``'sequential'`` on CPU and ``'vmap'`` on GPU/TPU."""
    if self.strategy != "auto":
      return self.strategy
    platform = self.mesh.devices.flat[0].platform if self.mesh is not None else jax.default_backend()
    return "sequential" if platform == "cpu" else "vmap"


def client_mask(round_data: PyTree) -> jax.Array:
  """Boolean ``[clients]``: True for real clients (``num_examples > 0``), False for padding slots."""
  return jnp.asarray(round_data["num_examples"]) > 0


def num_client_slots(round_data: PyTree) -> int:
  """The static length of the client axis of ``round_data``."""
  return int(jnp.shape(round_data["num_examples"])[0])


def _zeros_like_shape(shapes: PyTree) -> PyTree:
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _masked(summand: PyTree, is_real: jax.Array) -> PyTree:
  return jax.tree.map(lambda x: jnp.where(is_real, x, jnp.zeros((), x.dtype)), summand)


def _pad_clients(tree: PyTree, multiple: int) -> tuple[PyTree, int]:
  """Pads the leading axis of every leaf with zeros up to a multiple of ``multiple``."""
  num = jax.tree.leaves(tree)[0].shape[0]
  padded = -(-num // multiple) * multiple
  if padded == num:
    return tree, num
  return jax.tree.map(lambda x: jnp.pad(x, [(0, padded - num)] + [(0, 0)] * (x.ndim - 1)), tree), num


def client_keys(rng: PyTree, index: jax.Array) -> PyTree:
  """The keys of client slot ``index``: ``fold_in(key, index)`` for every key in the pytree ``rng``."""
  return jax.tree.map(lambda key: jax.random.fold_in(key, index), rng)


def _one_client(fn: ClientFn, broadcast, index, client_data, rng):
  summand, collected = fn(broadcast, client_data, client_keys(rng, index))
  return _masked(summand, client_data["num_examples"] > 0), collected


def _snake_grid(num_slots: int, parts: int) -> np.ndarray:
  """``[rows, parts]`` positions in the by-size order: row ``r`` goes left to right when even, right to left when odd.

  Dealing the clients, largest first, in this "snake" order gives every part nearly the same total work.
  """
  grid = np.arange(num_slots).reshape(-1, parts)
  grid[1::2] = grid[1::2, ::-1]
  return grid


def _balanced_order(num_examples: jax.Array, parts: int) -> jax.Array:
  """A permutation of the client slots that splits into ``parts`` contiguous blocks of nearly equal work: the
  slots dealt largest first in snake order (:func:`_snake_grid`), block ``d`` holding column ``d`` of the grid.

  ``len(num_examples)`` must be a multiple of ``parts``.
  """
  by_size = jnp.argsort(-jnp.asarray(num_examples), stable=True)
  return by_size[_snake_grid(num_examples.shape[0], parts)].T.reshape(-1)


def _run_local(fn, broadcast, indices, round_data, rng, strategy, chunk_size, unroll):
  """Runs ``fn`` over the (local) client axis of ``round_data`` with one strategy."""
  if strategy == "vmap":
    summands, collected = jax.vmap(_one_client, in_axes=(None, None, 0, 0, None))(
        fn, broadcast, indices, round_data, rng
    )
    return jax.tree.map(lambda x: jnp.sum(x, axis=0), summands), collected

  if strategy == "sequential":
    first = jax.tree.map(lambda x: x[0], round_data)
    summand_shape, _ = jax.eval_shape(lambda b, d, r: fn(b, d, client_keys(r, 0)), broadcast, first, rng)

    def body(total, xs):
      index, client_data = xs
      summand, collected = _one_client(fn, broadcast, index, client_data, rng)
      return jax.tree.map(jnp.add, total, summand), collected

    return jax.lax.scan(body, _zeros_like_shape(summand_shape), (indices, round_data), unroll=unroll)

  if strategy == "chunked":
    (indices, round_data), num = _pad_clients((indices, round_data), chunk_size)
    chunked = jax.tree.map(lambda x: x.reshape((-1, chunk_size) + x.shape[1:]), (indices, round_data))
    first = jax.tree.map(lambda x: x[0], chunked)
    summand_shape, _ = jax.eval_shape(
        lambda b, xs, r: _run_local(fn, b, xs[0], xs[1], r, "vmap", chunk_size, 1), broadcast, first, rng
    )

    def chunk_body(total, xs):
      summand, collected = _run_local(fn, broadcast, xs[0], xs[1], rng, "vmap", chunk_size, 1)
      return jax.tree.map(jnp.add, total, summand), collected

    total, collected = jax.lax.scan(chunk_body, _zeros_like_shape(summand_shape), chunked)
    collected = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:])[:num], collected)
    return total, collected

  raise ValueError(f"unknown strategy {strategy!r}.")


def run_clients(
    fn: ClientFn,
    broadcast: PyTree,
    round_data: PyTree,
    rng: jax.Array,
    *,
    runner: Runner | None = None,
) -> tuple[PyTree, PyTree]:
  """Runs ``fn`` for every client slot of ``round_data``; returns ``(sum over real clients, stacked)``.

  Args:
    fn: ``fn(broadcast, client_data, client_rng) -> (summand, collected)`` for ONE client. ``summand`` is summed
      over real clients (padding slots contribute zeros); ``collected`` (may be None) is returned stacked along
      a leading client axis, for every slot, padding included.
    broadcast: the server's values sent to every client (replicated, not mapped).
    round_data: the round's packed client data; every leaf has the leading client axis and it must contain
      ``num_examples``.
    rng: a key, or a pytree of keys (one per purpose, e.g. ``{'train': k1, 'aggregator': k2}``); client slot
      ``k`` gets the same structure with every key replaced by ``fold_in(key, k)``.
    runner: execution strategy; default ``Runner()`` (``'auto'``).

  Returns:
    ``(total, collected)``.
  """
  runner = runner or Runner()
  if not isinstance(round_data, dict) or "num_examples" not in round_data:
    raise ValueError("round_data must be a dict of arrays with a 'num_examples' entry (see core.packing).")
  strategy = runner.resolved_strategy()
  num = num_client_slots(round_data)
  indices = jnp.arange(num, dtype=jnp.int32)

  mesh = runner.resolved_mesh()
  if mesh is None:
    return _run_local(fn, broadcast, indices, round_data, rng, strategy, runner.chunk_size, runner.unroll)

  axis = mesh.axis_names[0]
  num_devices = mesh.shape[axis]
  multiple = num_devices * (runner.chunk_size if strategy == "chunked" else 1)
  (indices, round_data), num = _pad_clients((indices, round_data), multiple)
  # A sequential stream per device takes as long as its clients' steps: in one process, deal the clients to the
  # devices by size (snake order) so that ragged cohorts keep the devices balanced. Client slot k keeps its keys
  # (``indices``), so only the summation order changes. Across processes each process packs its own block of
  # slots (training.distributed), which must stay where it is.
  explicit = any(t == AxisType.Explicit for t in mesh.axis_types)
  placed = NamedSharding(mesh, PartitionSpec(axis))
  replicated = NamedSharding(mesh, PartitionSpec())

  def permute(x, permutation, sharding):  # an explicit mesh's gathers need their output sharding spelled out
    x = jnp.asarray(x)
    return x.at[permutation].get(out_sharding=sharding) if explicit else x[permutation]

  order = None
  if strategy == "sequential" and jax.process_count() == 1:
    order = _balanced_order(round_data["num_examples"], num_devices)
    indices, round_data = jax.tree.map(lambda x: permute(x, order, placed), (indices, round_data))

  def local(broadcast, indices, round_data, rng):
    total, collected = _run_local(fn, broadcast, indices, round_data, rng, strategy, runner.chunk_size,
                                  runner.unroll)
    return jax.lax.psum(total, axis), collected

  if explicit:
    # Explicit-sharding meshes need the inputs laid out as shard_map expects them.
    indices, round_data = jax.tree.map(lambda x: jax.reshard(x, placed), (indices, round_data))
    broadcast, rng = jax.tree.map(lambda x: jax.reshard(x, replicated), (broadcast, rng))

  sharded = jax.shard_map(
      local,
      mesh=mesh,
      in_specs=(PartitionSpec(), PartitionSpec(axis), PartitionSpec(axis), PartitionSpec()),
      out_specs=(PartitionSpec(), PartitionSpec(axis)),
      check_vma=False,
  )
  total, collected = sharded(broadcast, indices, round_data, rng)
  if order is None and not explicit:
    return total, jax.tree.map(lambda x: x[:num], collected)
  # Back to slot order, without the padding slots (on an explicit mesh, into a replicated layout: the real
  # clients need not divide over the devices).
  back = (jnp.arange(num) if order is None else jnp.argsort(order)[:num])
  return total, jax.tree.map(lambda x: permute(x, back, replicated), collected)


@functools.cache
def host_client_mesh(num_devices: int) -> Mesh:
  """The 1-D client mesh over this process's first ``num_devices`` devices (one object per count, so that jitted
  rounds see the same mesh every time)."""
  return client_mesh(num_devices)


def client_mesh(num_devices: int | None = None, axis_name: str = "clients") -> Mesh:
  """A 1-D mesh over the first ``num_devices`` devices (default all), for sharding the client axis."""
  devices = jax.devices()
  num_devices = len(devices) if num_devices is None else num_devices
  if not 1 <= num_devices <= len(devices):
    raise ValueError(f"num_devices must be in [1, {len(devices)}], got {num_devices}.")
  return jax.make_mesh((num_devices,), (axis_name,), axis_types=(AxisType.Auto,), devices=devices[:num_devices])
