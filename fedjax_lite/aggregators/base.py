"""The aggregator contract: every aggregator is ONE client part and ONE server part, joined by a static combine.

An aggregator turns the clients' values and weights into one server value. It is written once, as the four pure
functions of :class:`Aggregator`:

* ``init(value_template) -> state``, from ONE client's value (arrays or ``jax.ShapeDtypeStruct``s);
* ``broadcast(state) -> client_params``: what the server sends every client (e.g. the current clipping norm);
* ``client(client_params, value, weight, rng) -> contribution``: what ONE client uploads (a pytree);
* ``server(state, combined, rng, context) -> MeasuredOutput(state, result, measurements)``: the server's step.

``combine`` says how the runner joins the contributions before ``server`` sees them:

* ``'sum'`` -- the sum over real clients. Only the running sum is needed, so a round can stream over the clients
  with memory bounded by the clients in flight (:mod:`fedjax_lite.core.runner`). Most of the reference's
  aggregators (TFF ``tff.aggregators``) are sums: means, clipping, zeroing, DP, compression, secure sums.
* ``'stack'`` -- every slot's contribution stacked along a leading client axis (median, trimmed mean, Krum, and
  colluding attacks need all values at once). Padding slots' contributions are zeros.

Padding is weight 0, everywhere: the runner passes weight 0 for a padding slot (and for a client whose update was
rejected) and drops its contribution from a sum or zeroes it in a stack, so an aggregator cannot count padded
slots by mistake; a stacked aggregator that needs to know who took part reads ``weight > 0`` from its own
contributions. The server part receives the static :class:`AggregationContext` -- the template of ONE client's
value as this aggregator received it, and the number of client slots of the round -- instead of markers threaded
through the sum.

``next(state, values, weights, rng, client_mask=None)`` (the reference's ``AggregationProcess.next``) is derived:
it runs ``client`` on every slot of ``values`` (leading client axis), combines and calls ``server``. Wrappers
compose like the reference's factories: a wrapper's ``client`` transforms the value and then calls the inner
``client`` (outer effect first on clients); its ``server`` calls the inner ``server`` first and applies its own
effect last; its ``combine`` is its inner aggregator's, and the wrapper's own summed quantities (counts, norm
records) are read from a stack with :func:`client_total`.

Randomness: the round's key is split once into a key for the clients and a key for the server
(:func:`split_rng`); client slot ``i`` uses ``fold_in(clients_key, i)``. The streaming runner derives the same
keys, so streaming and ``next`` give identical results.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Protocol

import chex
import jax
import jax.numpy as jnp

from fedjax_lite.core.process import MeasuredOutput
from fedjax_lite.core.tree import PyTree, tree_size_bits

SUM = "sum"
STACK = "stack"
COMBINES = (SUM, STACK)


class AggregationContext(NamedTuple):
  """Static facts the server part of an aggregator may need (known at trace time, never traced).

  Attributes:
    value_template: ``jax.ShapeDtypeStruct``s of ONE client's value as this aggregator received it (a wrapper
      passes its inner aggregator the template of the transformed value).
    num_client_slots: the length of the round's client axis, padding included (e.g. the secure sum sizes its
      group from it).
  """

  value_template: PyTree
  num_client_slots: int


class ServerFn(Protocol):

  def __call__(self, state: PyTree, combined: PyTree, rng: jax.Array,
               context: AggregationContext) -> MeasuredOutput:
    ...


class Aggregator(NamedTuple):
  """An aggregation process written as a client part and a server part; see the module docstring.

  Attributes:
    init: ``init(value_template) -> state``.
    broadcast: ``broadcast(state) -> client_params``.
    client: ``client(client_params, value, weight, rng) -> contribution`` for ONE client.
    server: ``server(state, combined, rng, context) -> MeasuredOutput``.
    combine: ``'sum'`` (streamable) or ``'stack'``.
    upload_bits: ``upload_bits(value_template) -> int``, the exact bits ONE client uploads (a static count); None
      for the size of what ``client`` returns (:func:`client_upload_bits`).
    dp_event: for differentially private aggregators, ``dp_event() -> dp_accounting.DpEvent`` of one round.
  """

  init: Callable[[PyTree], PyTree]
  broadcast: Callable[[PyTree], PyTree]
  client: Callable[[PyTree, PyTree, jax.Array, jax.Array], PyTree]
  server: ServerFn
  combine: str = SUM
  upload_bits: Callable[[PyTree], int] | None = None
  dp_event: Callable[[], Any] | None = None

  def next(self, state: PyTree, values: PyTree, weights: jax.Array, rng: jax.Array,
           client_mask: jax.Array | None = None) -> MeasuredOutput:
    """Aggregates ``values`` (a leading client axis) with ``weights``; ``client_mask`` (bool ``[clients]``) marks
    real clients: padding slots get weight 0 and contribute nothing."""
    clients_key, server_key = split_rng(rng)
    num = num_clients_of(values)
    keys = jax.vmap(lambda i: jax.random.fold_in(clients_key, i))(jnp.arange(num, dtype=jnp.int32))
    return aggregate_with_keys(self, state, values, weights, keys, server_key, client_mask)


def check_aggregator(aggregator: Any, name: str = "aggregator", *, combine: str | None = None) -> Aggregator:
  """``aggregator`` if it is an :class:`Aggregator` (with ``combine`` when given), else a clear error."""
  if not isinstance(aggregator, Aggregator):
    raise TypeError(f"{name} must be an Aggregator, got {type(aggregator).__name__}.")
  if aggregator.combine not in COMBINES:
    raise ValueError(f"{name}.combine must be one of {COMBINES}, got {aggregator.combine!r}.")
  if combine is not None and aggregator.combine != combine:
    raise ValueError(f"{name} must be a {combine}-combined aggregator (e.g. sum_aggregator()), got one whose "
                     f"combine is {aggregator.combine!r}.")
  return aggregator


def split_rng(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(clients_key, server_key)`` of an aggregation step; client slot ``i`` uses ``fold_in(clients_key, i)``."""
  clients_key, server_key = jax.random.split(rng)
  return clients_key, server_key


def num_clients_of(values: PyTree) -> int:
  leaves = jax.tree.leaves(values)
  if not leaves:
    raise ValueError("values must have at least one array leaf with a leading client axis.")
  return leaves[0].shape[0]


def _expand(mask: jax.Array, leaf: jax.Array) -> jax.Array:
  return mask.reshape(mask.shape + (1,) * (leaf.ndim - mask.ndim))


def combine_contributions(combine: str, contributions: PyTree, mask: jax.Array) -> PyTree:
  """The runner's static combine of stacked contributions: the masked sum, or the stack with padding zeroed."""
  zeroed = jax.tree.map(lambda c: jnp.where(_expand(mask, c), c, jnp.zeros((), c.dtype)), contributions)
  if combine == SUM:
    return jax.tree.map(lambda c: jnp.sum(c, axis=0), zeroed)
  if combine == STACK:
    return zeroed
  raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}.")


def client_total(combined: PyTree, combine: str) -> PyTree:
  """The sum over clients of a part of ``combined``: itself when summed, its sum over the client axis when stacked
  (padding slots are zeros there, so they add nothing)."""
  if combine == SUM:
    return combined
  return jax.tree.map(lambda c: jnp.sum(c, axis=0), combined)


def aggregate_with_keys(
    aggregator: Aggregator,
    state: PyTree,
    values: PyTree,
    weights: jax.Array,
    client_keys: jax.Array,
    server_key: jax.Array,
    client_mask: jax.Array | None = None,
) -> MeasuredOutput:
  """``aggregator``'s round on stacked ``values`` with explicit per-slot client keys ``[clients]`` and server key.

  What :meth:`Aggregator.next` does after splitting its key; a wrapper that holds the stacked values (e.g. an
  attack) calls it to run its inner aggregator with the keys the clients would have used.
  """
  num = num_clients_of(values)
  chex.assert_equal_shape_prefix(jax.tree.leaves(values), 1)  # every leaf has the same client axis
  mask = jnp.ones((num,), bool) if client_mask is None else jnp.asarray(client_mask, bool)
  if mask.shape != (num,):
    raise ValueError(f"client_mask must have shape ({num},) (one entry per client slot of values), got "
                     f"{mask.shape}.")
  weights = jnp.broadcast_to(jnp.asarray(weights, jnp.float32), (num,))
  weights = jnp.where(mask, weights, 0.0)
  contributions = jax.vmap(aggregator.client, in_axes=(None, 0, 0, 0))(
      aggregator.broadcast(state), values, weights, client_keys)
  combined = combine_contributions(aggregator.combine, contributions, mask)
  context = AggregationContext(value_template=jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape[1:], v.dtype),
                                                           values),
                               num_client_slots=num)
  return aggregator.server(state, combined, server_key, context)


def _zeros(template: PyTree) -> PyTree:
  return jax.tree.map(lambda t: jnp.zeros(t.shape, t.dtype), template)


def contribution_template(aggregator: Aggregator, value_template: PyTree) -> PyTree:
  """Shape structs of what ONE client uploads to ``aggregator`` for a value shaped like ``value_template``."""
  template = as_template(value_template)
  state = jax.eval_shape(aggregator.init, template)
  return jax.eval_shape(
      lambda s: aggregator.client(aggregator.broadcast(s), _zeros(template), jnp.ones((), jnp.float32),
                                  jax.random.key(0)), state)


def client_upload_bits(aggregator: Aggregator, value_template: PyTree) -> int:
  """Bits ONE client uploads to ``aggregator`` for a value shaped like ``value_template``.

  The aggregator's own count when it has one (e.g. quantization counts the encoded payload, not its decoded
  stand-in); otherwise the size of its contribution, every leaf at its dtype's width.
  """
  if aggregator.upload_bits is not None:
    return int(aggregator.upload_bits(value_template))
  return tree_size_bits(contribution_template(aggregator, value_template))


def broadcast_bits(aggregator: Aggregator, value_template: PyTree) -> int:
  """Bits the server sends each client for ``aggregator`` (e.g. its current clipping norm); 0 if none."""
  state = jax.eval_shape(aggregator.init, as_template(value_template))
  return tree_size_bits(jax.eval_shape(aggregator.broadcast, state))


def require_floating(value_template: PyTree, aggregator_name: str) -> None:
  """A TypeError naming ``aggregator_name`` unless every leaf of ``value_template`` is floating-point."""
  for leaf in jax.tree.leaves(as_template(value_template)):
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      raise TypeError(f"{aggregator_name} needs floating-point values, got a leaf of dtype {leaf.dtype}.")


def as_template(value_template: PyTree) -> PyTree:
  """``jax.ShapeDtypeStruct``s describing ONE client's value (accepts arrays or shape structs)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), value_template)
