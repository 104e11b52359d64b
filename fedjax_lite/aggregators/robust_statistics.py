"""Byzantine-robust coordinate-wise statistics: the median and the trimmed mean of the clients' values.

Yin, Chen, Ramchandran & Bartlett 2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates"
(arXiv:1803.01498). The reference (TFF) has no such aggregator (only norm zeroing and clipping); these are beyond it.

For every coordinate ``j`` (every element of every leaf of the value), let ``x_(1) <= ... <= x_(n)`` be the values
of the ``n`` REAL clients at ``j``, sorted (``client_mask`` marks them; padding slots never take part):

* :func:`coordinate_median`: ``med_j = x_((n+1)/2)`` for odd ``n`` and ``(x_(n/2) + x_(n/2+1)) / 2`` for even ``n``,
  exactly ``np.median``;
* :func:`trimmed_mean`: with ``k = floor(beta * n)`` for the trim fraction ``beta`` in ``[0, 1/2)``,
  ``mean_j = sum_{r=k+1}^{n-k} x_(r) / (n - 2k)``, exactly ``scipy.stats.trim_mean(x, beta)`` (``k`` is computed
  in float64 as there, so ``beta = 0.3, n = 10`` trims 3 per side).

Robustness. If ``b`` of the ``n`` clients are Byzantine (send arbitrary values), every coordinate of the median
lies within the honest clients' range at that coordinate whenever ``b < n/2``, and every coordinate of the trimmed
mean does whenever ``b <= k`` (each kept value has at least one honest value at or above it and one at or below
it). For strongly convex losses, with ``n`` clients of ``s`` samples each and a fraction ``alpha < 1/2`` of them
Byzantine, the paper shows that gradient descent on these aggregates of the clients' gradients reaches an error of
order ``alpha / sqrt(s) + 1 / sqrt(n s)`` (up to log factors) with the trimmed mean when ``beta >= alpha``, which
is order-optimal, and the same plus a ``1 / s`` term with the median.

Contract and caveats:

* Stacked (``combine='stack'``), not streamable: a client's contribution cannot be summed away, the server needs
  every client's value at once (memory ``O(clients x value size)``, time ``O(clients log clients)`` per
  coordinate). Each client uploads its value; the server also reads who took part from the weight the round
  passed with it (padding and rejected clients have weight 0 and never vote).
* Unweighted: a positive weight is one vote, whatever its size. In ``fed_avg`` a client whose update was
  non-finite is rejected with weight 0, so it does not vote.
* A NaN at a coordinate from any real client makes that coordinate NaN (as ``np.median``; ``fed_avg`` then
  rejects the non-finite aggregate and keeps its parameters); +-Inf values are ordered like any other value.
  With no real client (all slots padding) every coordinate is NaN; a client axis of static length 0 raises a
  ValueError at trace time.
* State ``()``; measurements ``{}`` for the median and ``{'trimmed_per_side': k}`` (int32) for the trimmed mean.
* ``upload_bits``: the raw value at its dtype's width (32 bits per float32 element); no weight is uploaded.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lite.aggregators.base import STACK, AggregationContext, Aggregator, as_template, require_floating
from fedjax_lite.core import validation
from fedjax_lite.core.process import MeasuredOutput
from fedjax_lite.core.tree import PyTree, tree_size_bits

# (sorted leaf with padding last, number of real clients, k per side) -> per-coordinate statistic.
StatisticFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
# (stacked contributions, context) -> (result, measurements): the server step of a stacked statistic.
StackedServerFn = Callable[[dict, AggregationContext], tuple[PyTree, Any]]


def stacked_client(client_params: PyTree, value: PyTree, weight: jax.Array, rng: jax.Array) -> dict:
  """The client part of a stacked statistic: the value, and the weight that says whether the client takes part."""
  del client_params, rng
  return {"value": value, "weight": weight}


def participants(combined: dict, context: AggregationContext, aggregator_name: str) -> tuple[PyTree, jax.Array]:
  """``(values, mask)`` of a stacked statistic's server: the stacked values and bool ``[slots]`` of who took part
  (weight > 0), after checking the client axis (a static length of 0 is a ValueError)."""
  values = combined["value"]
  chex.assert_equal_shape_prefix(jax.tree.leaves(values), 1)
  if context.num_client_slots == 0:
    raise ValueError(f"{aggregator_name} needs at least one client, got values with a client axis of length 0.")
  return values, combined["weight"] > 0


def stacked_statistic(aggregator_name: str, statistic: StackedServerFn) -> Aggregator:
  """An unweighted, deterministic, non-streamable aggregator of floating values: each client uploads its value and
  weight (:func:`stacked_client`), and the server applies ``statistic(combined, context) -> (result,
  measurements)`` to the stack. State ``()``; ``upload_bits`` is the raw value at its dtype's width.

  The shape shared by the coordinate-wise statistics here and Krum (:mod:`fedjax_lite.aggregators.krum`).
  """

  def init(value_template: PyTree) -> tuple:
    require_floating(value_template, aggregator_name)
    return ()

  def server(state, combined, rng, context) -> MeasuredOutput:
    del rng  # Deterministic.
    require_floating(context.value_template, aggregator_name)
    result, measurements = statistic(combined, context)
    return MeasuredOutput(state=state, result=result, measurements=measurements)

  def upload_bits(value_template: PyTree) -> int:
    require_floating(value_template, aggregator_name)
    return tree_size_bits(as_template(value_template))

  return Aggregator(init, lambda state: (), stacked_client, server, combine=STACK, upload_bits=upload_bits)


def sort_real_first(leaf: jax.Array, mask: jax.Array) -> jax.Array:
  """``leaf`` sorted along the client axis with padding slots moved to the end (as +Inf).

  A real +Inf sorts among the padding, which does no harm: it has the same value. NaNs are handled by the caller.
  """
  real = mask.reshape((mask.shape[0],) + (1,) * (leaf.ndim - 1))
  return jnp.sort(jnp.where(real, leaf, jnp.asarray(jnp.inf, leaf.dtype)), axis=0)


def _any_real_nan(leaf: jax.Array, mask: jax.Array) -> jax.Array:
  real = mask.reshape((mask.shape[0],) + (1,) * (leaf.ndim - 1))
  return jnp.any(jnp.isnan(leaf) & real, axis=0)


def _coordinatewise(
    aggregator_name: str,
    statistic: StatisticFn,
    trimmed_per_side: Callable[[jax.Array, int], jax.Array],
    measurements: Callable[[jax.Array], dict],
) -> Aggregator:
  """An unweighted, non-streamable aggregator applying ``statistic`` to every coordinate of the real clients."""

  def coordinatewise(combined, context):
    values, mask = participants(combined, context, aggregator_name)
    num_real = jnp.sum(mask, dtype=jnp.int32)
    k = trimmed_per_side(num_real, mask.shape[0])

    def one_leaf(leaf):
      result = statistic(sort_real_first(leaf, mask), num_real, k).astype(leaf.dtype)
      return jnp.where(_any_real_nan(leaf, mask), jnp.asarray(jnp.nan, leaf.dtype), result)

    return jax.tree.map(one_leaf, values), measurements(k)

  return stacked_statistic(aggregator_name, coordinatewise)


def _median_of_sorted(sorted_leaf: jax.Array, num_real: jax.Array, k: jax.Array) -> jax.Array:
  del k
  lower = jax.lax.dynamic_index_in_dim(sorted_leaf, jnp.maximum(num_real - 1, 0) // 2, axis=0, keepdims=False)
  upper = jax.lax.dynamic_index_in_dim(sorted_leaf, num_real // 2, axis=0, keepdims=False)
  # Halves first so two huge values do not overflow; the odd case (lower == upper) is returned as is.
  middle = jnp.where(lower == upper, lower, lower * 0.5 + upper * 0.5)
  return jnp.where(num_real > 0, middle, jnp.asarray(jnp.nan, sorted_leaf.dtype))


def coordinate_median() -> Aggregator:
  """The coordinate-wise median of the real clients' values (Yin et al. 2018, arXiv:1803.01498).

  ``result_j = median_i x_ij`` over the real clients (``np.median``: the mean of the two middle values for an even
  count). Unweighted (weights are ignored) and NOT streamable (needs every client's value at once). Robust to any
  minority of Byzantine clients: with fewer than half of them, each coordinate stays within the honest range.
  State ``()``, measurements ``{}``; see the module docstring for NaN, padding and empty rounds.

  Example::

    aggregator = coordinate_median()
    output = aggregator.next(aggregator.init(template), updates, weights, rng, client_mask)
  """

  def no_trim(num_real: jax.Array, num_slots: int) -> jax.Array:
    return jnp.zeros((), jnp.int32)

  return _coordinatewise("coordinate_median", _median_of_sorted, no_trim, lambda k: {})


def _trimmed_mean_of_sorted(sorted_leaf: jax.Array, num_real: jax.Array, k: jax.Array) -> jax.Array:
  positions = jnp.arange(sorted_leaf.shape[0]).reshape((-1,) + (1,) * (sorted_leaf.ndim - 1))
  kept = (positions >= k) & (positions < num_real - k)
  accumulate = jnp.promote_types(sorted_leaf.dtype, jnp.float32)
  total = jnp.sum(jnp.where(kept, sorted_leaf, jnp.zeros((), sorted_leaf.dtype)), axis=0, dtype=accumulate)
  num_kept = num_real - 2 * k
  return jnp.where(num_kept > 0, total / jnp.maximum(num_kept, 1).astype(accumulate), jnp.nan)


def trimmed_mean(trim_fraction: float = 0.1) -> Aggregator:
  """The coordinate-wise trimmed mean of the real clients' values (Yin et al. 2018, arXiv:1803.01498).

  Per coordinate, drop the ``k = floor(trim_fraction * n)`` largest and ``k`` smallest of the ``n`` real clients'
  values and average the remaining ``n - 2k`` (``scipy.stats.trim_mean``). Unweighted (weights are ignored) and NOT
  streamable (needs every client's value at once). Each coordinate stays within the honest range when at most
  ``k`` clients are Byzantine. State ``()``; measurements ``{'trimmed_per_side': k}`` (int32).

  Since ``trim_fraction < 1/2``, at least one value remains whenever there is a real client; a round whose slots
  are all padding gives NaN (and a static client axis of length 0 raises a ValueError at trace time). A traced
  ``trim_fraction`` (e.g. under ``jax.vmap``) is used unchecked with ``k`` computed in float32; if it leaves nothing
  (``n - 2k <= 0``) the result is NaN.

  Args:
    trim_fraction: the fraction ``beta`` trimmed from EACH side, in ``[0, 0.5)``; 0 gives the unweighted mean.
      Choose it at least the expected fraction of Byzantine clients.

  Example::

    aggregator = trimmed_mean(0.2)  # with 10 clients: drop the 2 largest and 2 smallest per coordinate
  """
  trim_fraction = validation.check_float("trim_fraction", trim_fraction, low=0.0, high=0.5, high_inclusive=False)

  def trimmed_per_side(num_real: jax.Array, num_slots: int) -> jax.Array:
    if validation.is_traced(trim_fraction):
      return jnp.floor(trim_fraction * num_real.astype(jnp.float32)).astype(jnp.int32)
    # A static table over every possible real count keeps the float64 floor of scipy.stats.trim_mean.
    table = np.array([math.floor(trim_fraction * n) for n in range(num_slots + 1)], np.int32)
    return jnp.asarray(table)[num_real]

  return _coordinatewise("trimmed_mean", _trimmed_mean_of_sorted, trimmed_per_side,
                         lambda k: {"trimmed_per_side": k})
