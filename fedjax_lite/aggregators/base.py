"""The aggregator contract: ``Aggregator(init, next)``, and its client/server split for sum-based aggregators.

An aggregator turns the clients' values (a pytree with a leading client axis) and weights into one server value:

* ``init(value_template) -> state``
* ``next(state, values, weights, rng, client_mask=None) -> MeasuredOutput(state, result, measurements)``

Most aggregators of the reference (TFF ``tff.aggregators``) only ever *sum* what the clients send. Those expose
``parts = SumParts(broadcast, client, server)``:

* ``broadcast(state) -> client_params``: what the server sends to every client (e.g. the current clipping norm);
* ``client(client_params, value, weight, rng) -> contribution``: what ONE client uploads (a pytree);
* ``server(state, total, rng) -> MeasuredOutput``: the server's step, given the SUM of all real clients'
  contributions.

Because only the running sum is needed, a round can stream over chunks of clients with memory bounded by the
chunk (``fedjax_lite.core.runner``); :func:`sum_based` derives ``next`` from the parts so both paths agree.
Wrappers compose like the reference's factories: a wrapper's ``client`` transforms the value and then calls the
inner ``client`` (outer effect first on clients); its ``server`` calls the inner ``server`` first and applies its
own effect last.

Randomness: ``next``'s ``rng`` is split once into a key for the clients and a key for the server
(:func:`split_rng`); client slot ``i`` uses ``fold_in(clients_key, i)``. The streaming runner derives the same
keys, so streaming and ``next`` give identical results.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from fedjax_lite.core.process import MeasuredOutput
from fedjax_lite.core.tree import tree_size_bits

PyTree = Any


class InitFn(Protocol):

  def __call__(self, value_template: PyTree) -> PyTree:
    ...


class NextFn(Protocol):

  def __call__(
      self,
      state: PyTree,
      values: PyTree,
      weights: jax.Array,
      rng: jax.Array,
      client_mask: jax.Array | None = None,
  ) -> MeasuredOutput:
    ...


class SumParts(NamedTuple):
  """The client and server halves of a sum-based (streamable) aggregator."""

  broadcast: Callable[[PyTree], PyTree]
  client: Callable[[PyTree, PyTree, jax.Array, jax.Array], PyTree]
  server: Callable[[PyTree, PyTree, jax.Array], MeasuredOutput]


class Aggregator(NamedTuple):
  """An aggregation process: ``init(value_template)`` and ``next(state, values, weights, rng, client_mask)``.

  Attributes:
    init: builds the state from a template of ONE client's value (arrays or ``jax.ShapeDtypeStruct``s).
    next: aggregates values with a leading client axis; ``client_mask`` (bool ``[clients]``) marks real clients,
      padding slots contribute nothing.
    parts: the client/server split when the aggregator is sum-based (streamable); None otherwise.
    upload_bits: ``upload_bits(value_template) -> int``, the exact bits ONE client uploads (a static count); see
      :func:`client_upload_bits` for the default.
    dp_event: for differentially private aggregators, ``dp_event() -> dp_accounting.DpEvent`` of one round.
  """

  init: InitFn
  next: NextFn
  parts: SumParts | None = None
  upload_bits: Callable[[PyTree], int] | None = None
  dp_event: Callable[[], Any] | None = None


def split_rng(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(clients_key, server_key)`` of an aggregation step; client slot ``i`` uses ``fold_in(clients_key, i)``."""
  clients_key, server_key = jax.random.split(rng)
  return clients_key, server_key


def num_clients_of(values: PyTree) -> int:
  leaves = jax.tree.leaves(values)
  if not leaves:
    raise ValueError("values must have at least one array leaf with a leading client axis.")
  return leaves[0].shape[0]


def sum_contributions(client_fn, client_params, values, weights, clients_key, client_mask) -> PyTree:
  """Sum over real clients of ``client_fn(client_params, value_i, weight_i, fold_in(clients_key, i))``."""
  num = num_clients_of(values)
  weights = jnp.broadcast_to(jnp.asarray(weights, jnp.float32), (num,))
  mask = jnp.ones((num,), bool) if client_mask is None else jnp.asarray(client_mask, bool)
  keys = jax.vmap(lambda i: jax.random.fold_in(clients_key, i))(jnp.arange(num, dtype=jnp.int32))
  contributions = jax.vmap(client_fn, in_axes=(None, 0, 0, 0))(client_params, values, weights, keys)
  return jax.tree.map(
      lambda c: jnp.sum(jnp.where(mask.reshape((num,) + (1,) * (c.ndim - 1)), c, jnp.zeros((), c.dtype)), axis=0),
      contributions,
  )


def sum_based(
    init: InitFn,
    broadcast: Callable[[PyTree], PyTree],
    client: Callable[[PyTree, PyTree, jax.Array, jax.Array], PyTree],
    server: Callable[[PyTree, PyTree, jax.Array], MeasuredOutput],
    *,
    upload_bits: Callable[[PyTree], int] | None = None,
    dp_event: Callable[[], Any] | None = None,
) -> Aggregator:
  """Builds an :class:`Aggregator` from its client/server split; ``next`` sums the clients' contributions.

  ``upload_bits`` defaults to the size of what ``client`` returns (every leaf at its dtype's width), which is the
  payload unless the contribution is a decoded stand-in for an encoded upload (quantization overrides it).
  """
  parts = SumParts(broadcast=broadcast, client=client, server=server)

  def next_fn(state, values, weights, rng, client_mask=None):
    clients_key, server_key = split_rng(rng)
    total = sum_contributions(client, broadcast(state), values, weights, clients_key, client_mask)
    return server(state, total, server_key)

  def contribution_bits(value_template):
    state = jax.eval_shape(init, as_template(value_template))
    shapes = jax.eval_shape(
        lambda s: client(broadcast(s), _zeros(as_template(value_template)), jnp.ones((), jnp.float32),
                         jax.random.key(0)), state)
    return tree_size_bits(shapes)

  return Aggregator(init=init, next=next_fn, parts=parts, upload_bits=upload_bits or contribution_bits,
                    dp_event=dp_event)


def _zeros(template: PyTree) -> PyTree:
  return jax.tree.map(lambda t: jnp.zeros(t.shape, t.dtype), template)


def client_upload_bits(aggregator: Aggregator, value_template: PyTree) -> int:
  """Bits ONE client uploads to ``aggregator`` for a value shaped like ``value_template``.

  The aggregator's own count when it has one; otherwise (a non-streamable aggregator that sees raw values) the
  value at its dtype's width plus a float32 weight.
  """
  if aggregator.upload_bits is not None:
    return int(aggregator.upload_bits(value_template))
  return tree_size_bits(as_template(value_template)) + 32


def broadcast_bits(aggregator: Aggregator, value_template: PyTree) -> int:
  """Bits the server sends each client for ``aggregator`` (e.g. its current clipping norm); 0 if none."""
  if aggregator.parts is None:
    return 0
  state = jax.eval_shape(aggregator.init, as_template(value_template))
  return tree_size_bits(jax.eval_shape(aggregator.parts.broadcast, state))


def as_template(value_template: PyTree) -> PyTree:
  """``jax.ShapeDtypeStruct``s describing ONE client's value (accepts arrays or shape structs)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), value_template)
