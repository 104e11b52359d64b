"""Wrapping: the plumbing between an aggregator and the aggregators (or estimation processes) it calls inside.

A wrapper (zeroing, clipping, a mean around its value and weight sums, DP around its record sum, the secure sum
around its bound estimators) runs other aggregators as parts of its own round. Each part needs the same plumbing,
on the client AND on the server:

* its own random key, ``fold_in(rng, key)`` of the wrapper's key (or the wrapper's key itself), so that the parts
  draw independent randomness and the keys do not depend on the order of calls;
* its own value template in the :class:`~fedjax_lite.aggregators.base.AggregationContext` its server part sees
  (a count sum sees an int32 scalar, a rotated inner aggregator sees the rotated leaves);
* its share of what ONE client uploads (``upload_bits``), summed with the wrapper's own.

:class:`Inner` states that once per part -- ``Inner(count_sum, key=2, template=COUNT_TEMPLATE)`` -- and its
methods (``init``, ``broadcast``, ``client``, ``server``, ``upload_bits``) apply it, so a wrapper's code says only
what the wrapper changes (the value the part sees, the measurements it adds). :func:`wrapper` builds an aggregator
around one inner aggregator: it combines as the inner one does (streams around a sum, stacks around a median),
passes its privacy event through, keeps its state unless told otherwise, and counts the uploads of every part. In
the spirit of optax's ``chain``: composition by plain functions over a record of parts, no framework.

The library's wrappers (``robust``, ``mean``, ``differential_privacy``, ``debug``, ``rotation``, the secure sum and
the quantile estimators) are written this way; :func:`wrapper`'s docstring has a complete small one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from fedjax_lite.aggregators.base import AggregationContext, Aggregator, client_upload_bits
from fedjax_lite.aggregators.estimation import EstimationProcess
from fedjax_lite.core import validation
from fedjax_lite.core.tree import PyTree

Template = Any  # None (the wrapper's value template), a function of the wrapper's template, or a fixed template

COUNT_TEMPLATE = jax.ShapeDtypeStruct((), jnp.int32)  # what a count sum sees: one int32 per client
WEIGHT_TEMPLATE = jax.ShapeDtypeStruct((), jnp.float32)  # what a weight sum sees: one float32 per client


@dataclasses.dataclass(frozen=True)
class Inner:
  """An aggregator or estimation process that runs inside a wrapper: which key it draws from, which template it sees.

  Attributes:
    part: the inner :class:`~fedjax_lite.aggregators.base.Aggregator` or
      :class:`~fedjax_lite.aggregators.estimation.EstimationProcess`.
    key: its client and server keys are ``fold_in(rng, key)`` of the wrapper's; None passes the wrapper's keys
      unchanged (a wrapper that must not change its inner aggregator's randomness). Parts that draw randomness need
      distinct keys; None suits the one random part of a wrapper (e.g. the inner aggregator of a debug wrapper).
    template: the value template the part sees: None for the wrapper's own, a function of the wrapper's (e.g. the
      rotated leaves), or a fixed template (e.g. ``jax.ShapeDtypeStruct((), jnp.int32)`` for a count). Unused for
      an estimation process, whose records are scalars and whose server sees the wrapper's context.
  """

  part: Aggregator | EstimationProcess
  key: int | None = None
  template: Template = None

  def __post_init__(self):
    if not isinstance(self.part, (Aggregator, EstimationProcess)):
      raise TypeError(f"Inner's part must be an Aggregator or an EstimationProcess, got {type(self.part).__name__}.")
    validation.check_int("key", self.key, minimum=0, allow_none=True)

  @property
  def combine(self) -> str:
    return self.part.combine

  def value_template(self, wrapper_template: PyTree) -> PyTree:
    """The template the part sees, given the wrapper's."""
    if self.template is None:
      return wrapper_template
    if callable(self.template):
      return self.template(wrapper_template)
    return self.template

  def rng(self, wrapper_rng: jax.Array) -> jax.Array:
    """The part's key: ``fold_in(wrapper_rng, key)``, or ``wrapper_rng`` when ``key`` is None."""
    return wrapper_rng if self.key is None else jax.random.fold_in(wrapper_rng, self.key)

  def init(self, wrapper_template: PyTree = None) -> PyTree:
    if isinstance(self.part, EstimationProcess):
      return self.part.init()
    return self.part.init(self.value_template(wrapper_template))

  def broadcast(self, state: PyTree) -> PyTree:
    return self.part.broadcast(state)

  def client(self, client_params: PyTree, *inputs_and_rng: Any) -> PyTree:
    """The part's client with its own key: ``(params, value, weight, rng)`` for an aggregator, ``(params, x, rng)``
    for an estimation process -- the wrapper's ``rng`` last, as in the contract."""
    *inputs, rng = inputs_and_rng
    return self.part.client(client_params, *inputs, self.rng(rng))

  def server(self, state: PyTree, combined: PyTree, rng: jax.Array, context: AggregationContext) -> Any:
    """The part's server with its own key and template: a ``MeasuredOutput`` (aggregator) or the new state
    (estimation process)."""
    if self.template is not None and not isinstance(self.part, EstimationProcess):
      context = context._replace(value_template=self.value_template(context.value_template))
    return self.part.server(state, combined, self.rng(rng), context)

  def upload_bits(self, wrapper_template: PyTree) -> int:
    """Bits ONE client uploads to the part for a wrapper value shaped like ``wrapper_template``."""
    if isinstance(self.part, EstimationProcess):
      return int(self.part.upload_bits)
    return client_upload_bits(self.part, self.value_template(wrapper_template))


def total_upload_bits(parts: Sequence[Inner], own_bits: int | Callable[[PyTree], int] = 0
                      ) -> Callable[[PyTree], int]:
  """``upload_bits(value_template)`` of a wrapper: its ``own_bits`` (a count, or a function of the template) plus
  every part's."""
  parts = tuple(parts)
  for part in parts:
    if not isinstance(part, Inner):
      raise TypeError(f"parts must be Inner records, e.g. Inner(sum_aggregator(), key=1), got {part!r}.")

  def upload_bits(value_template: PyTree) -> int:
    own = own_bits(value_template) if callable(own_bits) else own_bits
    return int(own) + sum(part.upload_bits(value_template) for part in parts)

  return upload_bits


def wrapper(
    inner: Inner,
    client: Callable[..., PyTree],
    server: Callable[..., Any],
    *,
    init: Callable[[PyTree], PyTree] | None = None,
    broadcast: Callable[[PyTree], PyTree] | None = None,
    parts: Sequence[Inner] = (),
    own_upload_bits: int | Callable[[PyTree], int] = 0,
) -> Aggregator:
  """An aggregator around ``inner``: the wrapper states its ``client`` and ``server`` (and ``init``/``broadcast``
  when its state or client parameters differ from the inner aggregator's); the rest follows from ``inner``.

  It combines as ``inner`` does (so it streams exactly when ``inner`` sums), passes ``inner``'s ``dp_event``
  through, and uploads ``own_upload_bits`` plus what ``inner`` and the other ``parts`` (norm estimators, count
  sums) need. When ``inner`` stacks, the wrapper's own summed quantities arrive stacked too: read them with
  :func:`~fedjax_lite.aggregators.base.client_total`.

  Example: a wrapper that also counts the clients that took part (a second, int32 sum).

  >>> import jax, jax.numpy as jnp
  >>> from fedjax_lite.aggregators import Inner, client_total, mean, sum_aggregator, wrapper
  >>> def counting(inner_aggregator):
  ...   inner = Inner(inner_aggregator, key=0)
  ...   count = Inner(sum_aggregator(), key=1, template=jax.ShapeDtypeStruct((), jnp.int32))
  ...   def client(params, value, weight, rng):
  ...     return {"inner": inner.client(params, value, weight, rng),
  ...             "count": count.client((), (weight > 0).astype(jnp.int32), weight, rng)}
  ...   def server(state, combined, rng, context):
  ...     output = inner.server(state, combined["inner"], rng, context)
  ...     clients = count.server((), client_total(combined["count"], inner.combine), rng, context).result
  ...     return output._replace(measurements={"inner": output.measurements, "clients": clients})
  ...   return wrapper(inner, client, server, parts=(count,))
  >>> aggregator = counting(mean())
  >>> values = jnp.arange(6.0).reshape(3, 2)
  >>> output = aggregator.next(aggregator.init(values[0]), values, jnp.ones(3), jax.random.key(0))
  >>> output.result, int(output.measurements["clients"])
  (Array([2., 3.], dtype=float32), 3)
  >>> aggregator.upload_bits(values[0])  # the mean's 2 values and 1 weight, and the count: 4 x 32 bits
  128
  """
  if not isinstance(inner, Inner) or not isinstance(inner.part, Aggregator):
    raise TypeError(f"inner must be an Inner holding an Aggregator, e.g. Inner(mean(), key=0), got {inner!r}.")
  for name, function, optional in (("client", client, False), ("server", server, False), ("init", init, True),
                                   ("broadcast", broadcast, True)):
    if not (callable(function) or (optional and function is None)):
      raise TypeError(f"{name} must be a function, got {type(function).__name__}.")
  return Aggregator(
      init=inner.init if init is None else init,
      broadcast=inner.broadcast if broadcast is None else broadcast,
      client=client,
      server=server,
      combine=inner.combine,
      upload_bits=total_upload_bits((inner, *parts), own_upload_bits),
      dp_event=inner.part.dp_event,
  )
