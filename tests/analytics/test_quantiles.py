"""Federated quantiles: the estimator's convergence band and noise, and the histogram quantile against NumPy."""

from __future__ import annotations

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lite.analytics import histogram_quantile, iterative_quantile

VALUES = np.random.default_rng(0).lognormal(0.0, 1.0, size=101).astype(np.float32)


def empirical_bounds(values: np.ndarray, q: float) -> tuple[float, float]:
  """``Q- = min{x : F(x) >= q}`` and ``Q+ = min{x : F(x) > q}`` with ``F(x)`` the fraction of values ``<= x``."""
  ordered = np.sort(values.astype(np.float64))
  fractions = np.searchsorted(ordered, ordered, side="right") / len(ordered)
  return ordered[fractions >= q].min(), ordered[fractions > q].min()


def test_noiseless_estimate_converges_into_the_band_and_ignores_padding():
  q, eta = 0.3, 0.2
  query = iterative_quantile(q, initial_estimate=0.01, learning_rate=eta, num_rounds=300)
  padded = np.concatenate([VALUES, np.full(7, 1e6, np.float32)])
  mask = np.arange(108) < 101
  run = jax.jit(query.compute)
  result = run(padded, jax.random.key(0), client_mask=mask)
  # The record sums (+-1/2, counts) are exact whatever the padding; two programs may differ by an ulp of exp per
  # round.
  np.testing.assert_allclose(result.trajectory, run(VALUES, jax.random.key(0)).trajectory, rtol=300 * 2 ** -22)
  lower, upper = empirical_bounds(VALUES, q)
  tail = np.asarray(result.trajectory[-100:], np.float64)
  slack = 1e-5  # float32 products over the rounds
  assert np.all(tail >= lower * np.exp(-eta * (1 - q)) * (1 - slack))
  assert np.all(tail <= upper * np.exp(eta * q) * (1 + slack))
  assert float(result.estimate) == float(result.trajectory[-1])
  assert isinstance(query.dp_event(), dp_accounting.NonPrivateDpEvent)


def test_noiseless_trajectory_matches_numpy_recursion():
  q, eta = 0.7, 0.1
  trajectory = np.asarray(jax.jit(iterative_quantile(q, initial_estimate=5.0, learning_rate=eta,
                                                     num_rounds=40).compute)(VALUES, jax.random.key(0)).trajectory)
  estimate, expected = np.float32(5.0), []
  for _ in range(40):
    below = np.mean(VALUES <= estimate)
    estimate = np.float32(estimate * np.exp(np.float32(-eta * (below - q))))
    expected.append(estimate)
  np.testing.assert_allclose(trajectory, expected, rtol=40 * 2 ** -22)  # one or two ulps of exp per round


def test_private_estimator_adds_the_calibrated_noise():
  # One round from C0 = the median of 200 values (b = 1/2 exactly): the noisy fraction is
  # b' = q - log(C1 / C0) / eta and b' - 1/2 ~ N(0, (sigma_b / m)^2) = N(0, 0.05^2). 500 independent keys: the
  # mean within 5 sd / sqrt(500), the sample sd within 5 x its own sd (~ 0.05 / sqrt(1000)).
  values = np.arange(1, 201, dtype=np.float32)
  c0 = 100.5
  query = iterative_quantile(0.5, initial_estimate=c0, learning_rate=0.2, num_rounds=1, below_estimate_stddev=10.0,
                             expected_num_records=200.0)
  keys = jax.random.split(jax.random.key(3), 500)
  c1 = np.asarray(jax.jit(jax.vmap(lambda key: query.compute(values, key).estimate))(keys), np.float64)
  noise = (0.5 - np.log(c1 / np.float32(c0)) / np.float32(0.2)) - 0.5
  assert abs(noise.mean()) < 5 * 0.05 / np.sqrt(500)
  assert abs(noise.std() - 0.05) < 5 * 0.05 / np.sqrt(1000)
  assert query.dp_event() == dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(20.0), 1)


def numpy_histogram_quantile(values, edges, q):
  counts = np.histogram(values, edges)[0].astype(np.float64)
  cumulative, total = np.cumsum(counts), counts.sum()
  b = int(np.flatnonzero((cumulative >= q * total) & (counts > 0))[0])
  below = cumulative[b] - counts[b]
  return edges[b] + min(max((q * total - below) / counts[b], 0.0), 1.0) * (edges[b + 1] - edges[b])


def test_histogram_quantile_matches_numpy_and_the_true_quantiles_bin():
  edges = np.linspace(0.0, 16.0, 33).astype(np.float32)
  targets = [0.0, 0.1, 0.5, 0.9, 1.0]
  query = histogram_quantile(targets, edges)
  result = np.asarray(jax.jit(query.compute)(VALUES, jax.random.key(0)))
  for q, got in zip(targets, result):
    # float32 cumulative counts are exact; the interpolation is a few float32 operations on values <= 16.
    np.testing.assert_allclose(got, numpy_histogram_quantile(VALUES, edges, q), atol=8 * 16 * 2 ** -24)
    true = np.quantile(VALUES, q, method="inverted_cdf")
    bin_index = np.searchsorted(edges, true, side="right") - 1
    assert edges[bin_index] - 1e-6 <= got <= edges[bin_index + 1] + 1e-6
  assert isinstance(query.dp_event(), dp_accounting.NonPrivateDpEvent)
  private = histogram_quantile([0.5], edges, noise_multiplier=3.0)
  assert private.dp_event() == dp_accounting.GaussianDpEvent(3.0)
  noisy = float(jax.jit(private.compute)(VALUES, jax.random.key(0))[0])
  assert edges[0] <= noisy <= edges[-1]


def test_nan_and_empty_inputs_give_nan():
  values = VALUES.copy()
  values[3] = np.nan
  estimate = jax.jit(iterative_quantile(0.5, initial_estimate=1.0, num_rounds=2).compute)
  assert np.isnan(estimate(values, jax.random.key(0)).estimate)
  quantile = jax.jit(histogram_quantile([0.5], np.linspace(0.0, 16.0, 5).astype(np.float32)).compute)
  assert np.isnan(quantile(values, jax.random.key(0))).all()
  assert np.isnan(quantile(VALUES + 100, jax.random.key(0))).all()  # no value in any bin


def test_argument_checks():
  with pytest.raises(ValueError, match="expected_num_records"):
    iterative_quantile(0.5, initial_estimate=1.0, below_estimate_stddev=1.0)
  with pytest.raises(ValueError, match="target_quantile"):
    iterative_quantile(1.5, initial_estimate=1.0)
  with pytest.raises(ValueError, match="num_rounds"):
    iterative_quantile(0.5, initial_estimate=1.0, num_rounds=0)
  with pytest.raises(ValueError, match="target_quantiles"):
    histogram_quantile([0.5, 2.0], [0.0, 1.0])
  with pytest.raises(ValueError, match="values must be 1-d"):
    iterative_quantile(0.5, initial_estimate=1.0).compute(jnp.zeros((2, 2)), jax.random.key(0))
