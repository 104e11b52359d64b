"""Norm-bounding wrappers: zeroing and clipping of client values (TFF ``zeroing_factory``, ``clipping_factory``).

Each wrapper holds a threshold ``c`` (a fixed float or an :class:`EstimationProcess`) and an inner aggregator. In a
round, with ``c = report(norm_state)`` taken from the state BEFORE the round:

1. each client computes the global norm ``n_i`` of its RAW value (over all leaves; L1 ``sum |x|``, L2
   ``sqrt(sum x^2)`` or Linf ``max |x|``, in float32) and transforms the value:

   * zeroing: ``x_i <- 0`` if ``n_i > c`` (the client keeps its weight, so in a weighted mean heavy zeroing pulls
     the result toward 0, as in the reference);
   * clipping (L2 only): ``x_i <- x_i * c / n_i`` if ``n_i > c``, per leaf in that leaf's dtype;

2. the estimation process is updated from the raw norms ``{n_i}`` (it sees values before transformation);
3. the inner aggregator aggregates the transformed values (with the weights);
4. ``count = sum_i 1[n_i > c]`` (strict ``>``), int32, summed by ``count_sum``.

Non-finite values (beyond the reference, where ``NaN > c`` is False and a NaN client passes both wrappers
untouched): a client whose norm is NaN or Inf counts as above the threshold -- zeroing zeroes it, clipping (which
cannot scale an Inf) zeroes it too -- and it is counted in ``zeroed_count``/``clipped_count``. Its norm record
(an indicator ``n_i <= c``) is 0, as for any large norm, so the estimators' state stays finite.

State ``{'<kind>_norm': <estimator state>, 'inner_agg': <inner state>, '<zeroed|clipped>_count_agg': <count
state>}``; measurements ``{'<kind>': <inner measurements>, '<kind>_norm': c, '<zeroed|clipped>_count': count}``,
the reference's keys. The wrapper combines as its inner aggregator does: streamed when the inner one sums, stacked
when it stacks (e.g. zeroing around a median), its own norm records and counts summed either way.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from fedjax_lite.aggregators.base import SUM, Aggregator, check_aggregator, client_total
from fedjax_lite.aggregators.estimation import EstimationProcess, as_estimation_process
from fedjax_lite.aggregators.sum import sum_aggregator
from fedjax_lite.aggregators.wrapping import COUNT_TEMPLATE, Inner, wrapper
from fedjax_lite.core.process import MeasuredOutput
from fedjax_lite.core.tree import PyTree

NORM_ORDERS = (1.0, 2.0, math.inf)


def global_norm(tree: PyTree, order: float) -> jax.Array:
  """The norm of all leaves of ``tree`` taken together, as float32: L1, L2 or Linf."""
  tree = jax.tree.map(lambda leaf: jnp.asarray(leaf, jnp.float32), tree)
  return optax.tree.norm(tree, ord=order).astype(jnp.float32)


def is_above(norm: jax.Array, threshold: jax.Array) -> jax.Array:
  """``norm > threshold``, and True for a NaN norm (``NaN > c`` is False, which would let a NaN client through)."""
  return ~(norm <= threshold)


def zero_if_above(value: PyTree, norm: jax.Array, threshold: jax.Array) -> PyTree:
  """``0`` if ``norm > threshold`` or the norm is NaN, else ``value``."""
  return jax.tree.map(lambda x: jnp.where(is_above(norm, threshold), jnp.zeros_like(x), x), value)


def clip_to(value: PyTree, norm: jax.Array, threshold: jax.Array) -> PyTree:
  """``value * threshold / norm`` if ``norm > threshold`` else ``value`` (per leaf, in the leaf's dtype); a value
  whose norm is NaN or Inf cannot be clipped (``Inf * 0`` is NaN) and becomes 0."""
  scale = jnp.where(norm > threshold, threshold / jnp.where(norm > 0, norm, 1.0), 1.0)
  finite = jnp.isfinite(norm)
  return jax.tree.map(lambda x: jnp.where(finite, x * scale.astype(x.dtype), jnp.zeros_like(x)), value)


def _norm_bounding(
    kind: str,
    count_name: str,
    transform: Callable[[PyTree, jax.Array, jax.Array], PyTree],
    norm: float | EstimationProcess,
    inner: Aggregator | None,
    norm_order: float,
    count_sum: Aggregator | None,
) -> Aggregator:
  estimator = as_estimation_process(norm, f"{kind}_norm")
  inner = check_aggregator(sum_aggregator() if inner is None else inner, "inner")
  count_sum = check_aggregator(sum_aggregator() if count_sum is None else count_sum, f"{count_name}_count_sum",
                               combine=SUM)
  norm_key, count_key = f"{kind}_norm", f"{count_name}_count"
  # Keys: the inner aggregator fold_in(rng, 0), the norm estimator 1, the count sum 2.
  inner_part = Inner(inner, key=0)
  norm_part = Inner(estimator, key=1)
  count_part = Inner(count_sum, key=2, template=COUNT_TEMPLATE)

  def init(value_template):
    return {norm_key: norm_part.init(), "inner_agg": inner_part.init(value_template),
            f"{count_key}_agg": count_part.init()}

  def broadcast(state):
    return ((estimator.report(state[norm_key]), norm_part.broadcast(state[norm_key])),
            inner_part.broadcast(state["inner_agg"]), count_part.broadcast(state[f"{count_key}_agg"]))

  def client(client_params, value, weight, rng):
    (threshold, estimator_params), inner_params, count_params = client_params
    raw_norm = global_norm(value, norm_order)
    above = is_above(raw_norm, threshold)
    return {"inner": inner_part.client(inner_params, transform(value, raw_norm, threshold), weight, rng),
            "norm_record": norm_part.client(estimator_params, raw_norm, rng),
            "count": count_part.client(count_params, above.astype(jnp.int32), jnp.ones((), jnp.float32), rng)}

  def server(state, combined, rng, context):
    threshold = estimator.report(state[norm_key])
    inner_output = inner_part.server(state["inner_agg"], combined["inner"], rng, context)
    count_output = count_part.server(state[f"{count_key}_agg"], client_total(combined["count"], inner.combine), rng,
                                     context)
    norm_state = norm_part.server(state[norm_key], client_total(combined["norm_record"], inner.combine), rng,
                                  context)
    new_state = {norm_key: norm_state, "inner_agg": inner_output.state, f"{count_key}_agg": count_output.state}
    measurements = {kind: inner_output.measurements, norm_key: threshold, count_key: count_output.result}
    return MeasuredOutput(state=new_state, result=inner_output.result, measurements=measurements)

  return wrapper(inner_part, client, server, init=init, broadcast=broadcast, parts=(norm_part, count_part))


def zeroing(
    zeroing_norm: float | EstimationProcess,
    inner: Aggregator | None = None,
    *,
    norm_order: float = math.inf,
    zeroed_count_sum: Aggregator | None = None,
) -> Aggregator:
  """Replaces a client's value by zeros when its norm exceeds ``zeroing_norm`` (TFF ``zeroing_factory``).

  Args:
    zeroing_norm: a fixed threshold > 0, or an :class:`EstimationProcess` (e.g. the adaptive quantile).
    inner: the aggregator of the (possibly zeroed) values; default :func:`sum_aggregator`.
    norm_order: 1, 2 or ``math.inf`` (the default, as in the reference).
    zeroed_count_sum: sum-based aggregator for the zeroed-client count (default the plain sum).
  """
  if norm_order not in NORM_ORDERS:
    raise ValueError(f"norm_order must be one of 1, 2 or math.inf, got {norm_order!r}.")
  return _norm_bounding("zeroing", "zeroed", zero_if_above, zeroing_norm, inner, float(norm_order),
                        zeroed_count_sum)


def clipping(
    clipping_norm: float | EstimationProcess,
    inner: Aggregator | None = None,
    *,
    clipped_count_sum: Aggregator | None = None,
) -> Aggregator:
  """Scales a client's value down to L2 norm ``clipping_norm`` when it is larger (TFF ``clipping_factory``).

  Args:
    clipping_norm: a fixed norm > 0, or an :class:`EstimationProcess` (e.g. the adaptive quantile).
    inner: the aggregator of the clipped values; default :func:`sum_aggregator`.
    clipped_count_sum: sum-based aggregator for the clipped-client count (default the plain sum).
  """
  return _norm_bounding("clipping", "clipped", clip_to, clipping_norm, inner, 2.0, clipped_count_sum)
