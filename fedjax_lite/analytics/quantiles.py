"""Federated quantiles: the adaptive-clipping quantile estimator run to convergence, and a one-shot private
histogram quantile.

Every client holds one scalar value ``x_i`` (``values [clients]``, ``client_mask`` marking real slots).

:func:`iterative_quantile` runs the quantile estimation process of
:mod:`fedjax_lite.aggregators.quantile_estimation` (Andrew, Thakkar, McMahan & Ramaswamy 2021, arXiv:1905.03871)
for ``T`` rounds in which every real client takes part: each round client ``i`` sends ``1[x_i <= C] - 1/2`` and the
server moves ``C <- C exp(-eta (b - q))`` with ``b`` the (noisy) fraction at or below ``C``. Without noise, with
``F(C)`` the fraction of values ``<= C``, ``Q- = min{x_i : F(x_i) >= q}`` and ``Q+ = min{x_i : F(x_i) > q}``
(``Q+ = max x_i`` when ``q = 1``), the estimate rises while ``C < Q-``, falls while ``C >= Q+``, and once inside
stays in ``[Q- exp(-eta (1 - q)), Q+ exp(eta q)]``: the geometric step size ``eta`` sets the final accuracy. With
``below_estimate_stddev = sigma_b`` each round is ``GaussianDpEvent(2 sigma_b)`` (the record sum has sensitivity
1/2) and ``T`` rounds compose: ``SelfComposedDpEvent(GaussianDpEvent(2 sigma_b), T)``.

:func:`histogram_quantile` answers in ONE round: a private histogram of the values
(:func:`~fedjax_lite.analytics.private_histogram`, ``GaussianDpEvent(z)``), then for each target ``q``, with the
negative noisy counts set to 0, cumulative counts ``S_b`` and total ``N``: the first bin ``b`` with ``S_b >= q N``
(and a positive count) and the linear interpolation ``e_b + (q N - S_{b-1}) / c_b (e_{b+1} - e_b)`` inside it (the
values are taken as uniform within a bin). Post-processing costs no privacy; without noise the answer lies in the
bin holding the lower empirical quantile ``Q-``. A histogram with no count gives NaN.

A NaN value makes the answer NaN in both (the input is malformed; ``x <= C`` would silently count it as large).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lite.aggregators.base import AggregationContext
from fedjax_lite.aggregators.quantile_estimation import no_noise_quantile_estimator, private_quantile_estimator
from fedjax_lite.analytics.base import Query, gaussian_event, real_mask
from fedjax_lite.analytics.histogram import check_bin_edges, private_histogram
from fedjax_lite.core import validation


class QuantileEstimate(NamedTuple):
  """What :func:`iterative_quantile`'s ``compute`` returns.

  Attributes:
    estimate: the final estimate (float32 scalar).
    trajectory: the estimate after each round, float32 ``[num_rounds]``.
  """

  estimate: jax.Array
  trajectory: jax.Array


def _scalar_values(values, client_mask):
  values = jnp.asarray(values)
  if values.ndim != 1:
    raise ValueError(f"values must be 1-d (one scalar per client slot), got shape {values.shape}.")
  mask = real_mask(values.shape[0], client_mask)
  any_nan = jnp.any(jnp.isnan(values) & mask) if jnp.issubdtype(values.dtype, jnp.floating) else False
  return values.astype(jnp.float32), mask, any_nan


def iterative_quantile(
    target_quantile: float,
    *,
    initial_estimate: float,
    learning_rate: float = 0.2,
    num_rounds: int = 100,
    below_estimate_stddev: float = 0.0,
    expected_num_records: float | None = None,
) -> Query:
  """The ``q``-quantile of the clients' values by ``num_rounds`` rounds of geometric quantile estimation.

  ``compute(values, rng, client_mask=None) -> QuantileEstimate(estimate, trajectory)``; all ``T`` rounds run in one
  ``lax.scan`` (jittable). See the module docstring for the update, its accuracy and its privacy.

  Args:
    target_quantile: ``q`` in ``[0, 1]``.
    initial_estimate: ``C_0 > 0`` (the estimate stays positive: the values should be positive, e.g. norms).
    learning_rate: ``eta > 0``; each round moves ``C`` by a factor of at most ``exp(eta)``.
    num_rounds: ``T >= 1``.
    below_estimate_stddev: ``sigma_b >= 0``, the Gaussian noise on the count below ``C`` (0: no noise, exact
      count).
    expected_num_records: ``m > 0``, the fixed normalizer of the private estimator (the expected number of
      clients); required when ``sigma_b > 0``.

  Example::

    query = iterative_quantile(0.5, initial_estimate=1.0, num_rounds=200)
    jax.jit(query.compute)(values, jax.random.key(0)).estimate
  """
  validation.check_float("target_quantile", target_quantile, low=0.0, high=1.0)
  validation.check_positive("initial_estimate", initial_estimate)
  validation.check_positive("learning_rate", learning_rate)
  num_rounds = validation.check_int("num_rounds", num_rounds, minimum=1)
  below_estimate_stddev = validation.check_float("below_estimate_stddev", below_estimate_stddev, low=0.0)
  validation.check_positive("expected_num_records", expected_num_records, allow_none=True)
  if below_estimate_stddev > 0 and expected_num_records is None:
    raise ValueError("expected_num_records is required when below_estimate_stddev > 0 (the private estimator "
                     "divides by this fixed count).")
  if expected_num_records is None:
    estimator = no_noise_quantile_estimator(initial_estimate, target_quantile, learning_rate)
  else:
    estimator = private_quantile_estimator(initial_estimate, target_quantile, learning_rate, below_estimate_stddev,
                                           expected_num_records)

  def compute(values, rng, client_mask=None) -> QuantileEstimate:
    values, mask, any_nan = _scalar_values(values, client_mask)
    slots = jnp.arange(values.shape[0], dtype=jnp.int32)
    context = AggregationContext(jax.ShapeDtypeStruct((), jnp.float32), values.shape[0])

    def one_round(state, round_num):
      clients_key, server_key = jax.random.split(jax.random.fold_in(rng, round_num))
      keys = jax.vmap(lambda slot: jax.random.fold_in(clients_key, slot))(slots)
      records = jax.vmap(estimator.client, in_axes=(None, 0, 0))(estimator.broadcast(state), values, keys)
      total = jax.tree.map(
          lambda r: jnp.sum(jnp.where(mask.reshape((-1,) + (1,) * (r.ndim - 1)), r, jnp.zeros((), r.dtype)), 0),
          records)
      state = estimator.server(state, total, server_key, context)
      return state, estimator.report(state)

    _, trajectory = jax.lax.scan(one_round, estimator.init(), jnp.arange(num_rounds, dtype=jnp.int32))
    trajectory = jnp.where(any_nan, jnp.nan, trajectory)
    return QuantileEstimate(estimate=trajectory[-1], trajectory=trajectory)

  def dp_event():
    import dp_accounting

    if below_estimate_stddev == 0:
      return dp_accounting.NonPrivateDpEvent()
    return dp_accounting.SelfComposedDpEvent(estimator.dp_event(), num_rounds)

  return Query(compute=compute, dp_event=dp_event)


def quantiles_from_counts(counts: jax.Array, bin_edges, target_quantiles) -> jax.Array:
  """The interpolated quantiles of a (noisy) histogram; see the module docstring. Jittable post-processing."""
  edges = jnp.asarray(check_bin_edges(bin_edges))
  targets = jnp.asarray(target_quantiles, jnp.float32)
  counts = jnp.maximum(jnp.asarray(counts, jnp.float32), 0.0)
  cumulative = jnp.cumsum(counts)
  total = cumulative[-1]

  def one(q):
    wanted = q * total
    bin_index = jnp.argmax((cumulative >= wanted) & (counts > 0))
    below = cumulative[bin_index] - counts[bin_index]
    fraction = jnp.clip((wanted - below) / jnp.maximum(counts[bin_index], jnp.finfo(jnp.float32).tiny), 0.0, 1.0)
    value = edges[bin_index] + fraction * (edges[bin_index + 1] - edges[bin_index])
    return jnp.where(total > 0, value, jnp.nan)

  return jax.vmap(one)(targets)


def histogram_quantile(target_quantiles, bin_edges, *, noise_multiplier: float = 0.0, clip: float = 1.0) -> Query:
  """Quantiles of the clients' values from ONE private histogram (module docstring).

  ``compute(values, rng, client_mask=None) -> quantiles`` (float32, one per target); ``dp_event()`` is the
  histogram's ``GaussianDpEvent(z)`` (``NonPrivateDpEvent`` for ``z = 0``).

  Args:
    target_quantiles: a sequence of ``q`` in ``[0, 1]``.
    bin_edges: the histogram's strictly increasing, float32-exact edges; the answer is resolved to a bin, so
      choose them to cover the values with the resolution needed.
    noise_multiplier: ``z >= 0``.
    clip: ``C > 0``; one value per client has a count vector of norm 1, so ``C = 1`` keeps counts exact.

  Example::

    query = histogram_quantile([0.5, 0.9], np.linspace(0, 50, 51, dtype=np.float32), noise_multiplier=2.0)
    median, p90 = jax.jit(query.compute)(temperatures, jax.random.key(0))
  """
  targets = np.atleast_1d(np.asarray(target_quantiles, np.float64))
  if targets.ndim != 1 or targets.size == 0:
    raise ValueError("target_quantiles must be a non-empty sequence of numbers in [0, 1].")
  for q in targets:
    validation.check_float("target_quantiles", float(q), low=0.0, high=1.0)
  edges = check_bin_edges(bin_edges)
  histogram = private_histogram(edges, noise_multiplier=noise_multiplier, clip=clip)

  def compute(values, rng, client_mask=None):
    values, mask, any_nan = _scalar_values(values, client_mask)
    counts = histogram.compute(values, rng, client_mask=mask)
    return jnp.where(any_nan, jnp.nan, quantiles_from_counts(counts, edges, targets))

  return Query(compute=compute, dp_event=lambda: gaussian_event(noise_multiplier))
