"""Private histograms: numpy.histogram without noise, the calibrated Gaussian spread with it."""

from __future__ import annotations

import dp_accounting
import jax
import numpy as np
import pytest

from fedjax_lite.analytics import private_histogram

EDGES = np.linspace(0.0, 10.0, 11).astype(np.float32)


def test_one_value_per_client_matches_numpy_histogram():
  values = np.concatenate([np.random.default_rng(0).uniform(-1, 11, size=37),
                           EDGES[[0, 3, 10]], [np.nan]]).astype(np.float32)  # edges, out of range, NaN
  mask = np.ones(values.shape[0], bool)
  mask[5] = False  # a padding slot
  counts = jax.jit(private_histogram(EDGES).compute)(values, jax.random.key(0), client_mask=mask)
  finite = values[mask & ~np.isnan(values)]
  np.testing.assert_array_equal(counts, np.histogram(finite, EDGES)[0])  # small integers in float32: exact
  assert isinstance(private_histogram(EDGES).dp_event(), dp_accounting.NonPrivateDpEvent)


def test_many_values_per_client_and_clipping():
  values = np.array([[0.5, 0.5, 0.5, 7.0], [1.5, 2.5, 3.5, 4.5]], np.float32)
  value_mask = np.array([[True, True, True, True], [True, True, False, False]])
  exact = private_histogram(EDGES, clip=None).compute(values, jax.random.key(0), value_mask=value_mask)
  np.testing.assert_array_equal(exact, np.histogram(values[value_mask], EDGES)[0])
  # Client 0's counts (3 in bin 0, 1 in bin 7) have norm sqrt(10); clipped to 1 they scale by 1/sqrt(10).
  clipped = private_histogram(EDGES, clip=1.0).compute(values, jax.random.key(0), value_mask=value_mask)
  expected = np.zeros(10)
  expected[[0, 7]] = np.array([3.0, 1.0]) / np.sqrt(10)
  expected[[1, 2]] += 1 / np.sqrt(2)
  np.testing.assert_allclose(clipped, expected, rtol=4 * 2 ** -23)


def test_noise_has_the_calibrated_spread():
  # 1000 bins, z = 2, C = 1.5: every bin gets N(0, 3^2). Mean error within 5 sd / sqrt(1000); the sample sd within
  # 5 x its own sd (~ 3 / sqrt(2 x 1000)).
  edges = np.arange(1001, dtype=np.float32)
  values = np.random.default_rng(1).uniform(0, 1000, size=300).astype(np.float32)
  query = private_histogram(edges, noise_multiplier=2.0, clip=1.5)
  noisy = np.asarray(jax.jit(query.compute)(values, jax.random.key(2)), np.float64)
  error = noisy - np.histogram(values, edges)[0]
  assert abs(error.mean()) < 5 * 3 / np.sqrt(1000)
  assert abs(error.std() - 3.0) < 5 * 3 / np.sqrt(2 * 1000)
  assert query.dp_event() == dp_accounting.GaussianDpEvent(2.0)


def test_argument_checks():
  for edges in ([1.0], [0.0, 0.0, 1.0], [0.0, np.inf], [0.0, 0.1]):  # 0.1 is not a float32
    with pytest.raises(ValueError, match="bin_edges"):
      private_histogram(edges)
  with pytest.raises(ValueError, match="clip"):
    private_histogram(EDGES, noise_multiplier=1.0, clip=None)
  with pytest.raises(ValueError, match="noise_multiplier"):
    private_histogram(EDGES, noise_multiplier=-1.0)
  with pytest.raises(ValueError, match="value_mask"):
    private_histogram(EDGES).compute(np.zeros((2, 3)), jax.random.key(0), value_mask=np.ones((2, 2), bool))
  with pytest.raises(ValueError, match="values must be"):
    private_histogram(EDGES).compute(np.zeros((2, 3, 1)), jax.random.key(0))
