"""Weighted and unweighted means (TFF ``MeanFactory`` and ``UnweightedMeanFactory``).

* :func:`mean`: ``result = VSum({w_i x_i}) / WSum({w_i})``. Clients scale their value by their weight (cast to
  the value's dtype) before the value sum, so an inner sum that transforms values (quantization, secure
  summation) sees the weighted values, as in the reference. With ``no_nan_division`` the result is 0 when the
  weights sum to 0; otherwise the plain division gives NaN or Inf, which ``fed_avg``'s server step rejects.
* :func:`unweighted_mean`: ``result = VSum({x_i}) / CSum({1})``, counting real clients only.

State and measurement keys follow the reference: ``{'value_sum_process', 'weight_sum_process'}`` and
``{'mean_value', 'mean_weight'}``; the unweighted mean's state is the tuple ``(value_state, count_state)`` and
its measurements ``{'mean_value', 'mean_count'}``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_lite.aggregators.base import SUM, Aggregator, check_aggregator, require_floating
from fedjax_lite.aggregators.sum import sum_aggregator
from fedjax_lite.aggregators.wrapping import COUNT_TEMPLATE, WEIGHT_TEMPLATE, Inner, total_upload_bits
from fedjax_lite.core.process import MeasuredOutput
from fedjax_lite.core.tree import tree_scale_by_weight


def _require_sum_based(aggregator: Aggregator | None, name: str) -> Aggregator:
  return check_aggregator(sum_aggregator() if aggregator is None else aggregator, name, combine=SUM)


def mean(
    value_sum: Aggregator | None = None,
    weight_sum: Aggregator | None = None,
    *,
    no_nan_division: bool = False,
) -> Aggregator:
  """The weighted mean ``sum_i w_i x_i / sum_i w_i`` (TFF ``MeanFactory``).

  Args:
    value_sum: sum-based aggregator for the weighted values (default :func:`sum_aggregator`).
    weight_sum: sum-based aggregator for the weights (default :func:`sum_aggregator`).
    no_nan_division: return 0 instead of NaN/Inf when the weights sum to 0.
  """
  value_sum = Inner(_require_sum_based(value_sum, "value_sum"), key=0)
  weight_sum = Inner(_require_sum_based(weight_sum, "weight_sum"), key=1, template=WEIGHT_TEMPLATE)
  if not isinstance(no_nan_division, bool):
    raise TypeError(f"no_nan_division must be a bool, got {type(no_nan_division).__name__}.")

  def init(value_template):
    require_floating(value_template, "mean")
    return {"value_sum_process": value_sum.init(value_template), "weight_sum_process": weight_sum.init()}

  def broadcast(state):
    return (value_sum.broadcast(state["value_sum_process"]), weight_sum.broadcast(state["weight_sum_process"]))

  def client(client_params, value, weight, rng):
    weight = jnp.asarray(weight, jnp.float32)
    return {"value": value_sum.client(client_params[0], tree_scale_by_weight(value, weight), weight, rng),
            "weight": weight_sum.client(client_params[1], weight, weight, rng)}

  def server(state, total, rng, context):
    value_out = value_sum.server(state["value_sum_process"], total["value"], rng, context)
    weight_out = weight_sum.server(state["weight_sum_process"], total["weight"], rng, context)
    weight_total = weight_out.result

    def divide(value_total):
      denominator = jnp.asarray(weight_total).astype(value_total.dtype)
      if no_nan_division:
        safe = jnp.where(denominator == 0, jnp.ones_like(denominator), denominator)
        return jnp.where(denominator == 0, jnp.zeros_like(value_total), value_total / safe)
      return value_total / denominator

    return MeasuredOutput(
        state={"value_sum_process": value_out.state, "weight_sum_process": weight_out.state},
        result=jax.tree.map(divide, value_out.result),
        measurements={"mean_value": value_out.measurements, "mean_weight": weight_out.measurements},
    )

  return Aggregator(init, broadcast, client, server, upload_bits=total_upload_bits((value_sum, weight_sum)))


def unweighted_mean(value_sum: Aggregator | None = None, count_sum: Aggregator | None = None) -> Aggregator:
  """The unweighted mean ``sum_i x_i / (number of real clients)`` (TFF ``UnweightedMeanFactory``); ignores weights.

  Args:
    value_sum: sum-based aggregator for the values (default :func:`sum_aggregator`).
    count_sum: sum-based aggregator for the int32 client counts (default :func:`sum_aggregator`).
  """
  value_sum = Inner(_require_sum_based(value_sum, "value_sum"), key=0)
  count_sum = Inner(_require_sum_based(count_sum, "count_sum"), key=1, template=COUNT_TEMPLATE)

  def init(value_template):
    require_floating(value_template, "unweighted_mean")
    return (value_sum.init(value_template), count_sum.init())

  def broadcast(state):
    return (value_sum.broadcast(state[0]), count_sum.broadcast(state[1]))

  def client(client_params, value, weight, rng):
    return {"value": value_sum.client(client_params[0], value, weight, rng),
            "count": count_sum.client(client_params[1], jnp.ones((), jnp.int32), weight, rng)}

  def server(state, total, rng, context):
    value_out = value_sum.server(state[0], total["value"], rng, context)
    count_out = count_sum.server(state[1], total["count"], rng, context)
    result = jax.tree.map(lambda v: v / jnp.asarray(count_out.result).astype(v.dtype), value_out.result)
    return MeasuredOutput(
        state=(value_out.state, count_out.state),
        result=result,
        measurements={"mean_value": value_out.measurements, "mean_count": count_out.measurements},
    )

  return Aggregator(init, broadcast, client, server, upload_bits=total_upload_bits((value_sum, count_sum)))
