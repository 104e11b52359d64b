"""'A little is enough' and inner-product manipulation against NumPy statistics of the honest clients."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from scipy.stats import norm

from fedjax_lite.attacks import a_little_is_enough, inner_product_manipulation
from fedjax_lite.attacks.collusion import alie_z

RNG = np.random.default_rng(0)
UPDATES = {"w": RNG.normal(size=(7, 3, 2)).astype(np.float32), "b": RNG.normal(size=(7, 4)).astype(np.float32)}
MASK = np.array([True, True, True, True, True, True, False])  # the last slot is padding
MALICIOUS = np.array([True, False, False, True, False, False, False])
HONEST = MASK & ~MALICIOUS


def check(output, crafted_of):
  for name, leaf in UPDATES.items():
    honest = leaf[HONEST].astype(np.float64)
    crafted = crafted_of(honest.mean(0), honest.std(0))
    out = np.asarray(output[name])
    # float32 sums of 4 values: a few ulps of the largest magnitude involved.
    scale = np.abs(leaf).max()
    np.testing.assert_allclose(out[MALICIOUS], np.broadcast_to(crafted, out[MALICIOUS].shape), rtol=0,
                               atol=16 * 2 ** -23 * scale * 4)
    np.testing.assert_array_equal(out[~MALICIOUS], leaf[~MALICIOUS])  # honest and padding untouched


def test_a_little_is_enough_with_given_z():
  output = a_little_is_enough(1.5).apply(UPDATES, MALICIOUS, MASK, jax.random.key(0))
  check(output, lambda mean, std: mean - 1.5 * std)


def test_a_little_is_enough_default_z_is_the_papers():
  # n = 6 real, f = 2: s = floor(6/2 + 1) - 2 = 2, z = Phi^-1((6 - 2) / 6).
  z = norm.ppf(4 / 6)
  np.testing.assert_allclose(float(alie_z(6, 2)), z, rtol=1e-6)
  np.testing.assert_allclose(float(alie_z(50, 12)), norm.ppf((50 - 14) / 50), rtol=1e-6)
  output = a_little_is_enough().apply(UPDATES, MALICIOUS, MASK, jax.random.key(0))
  check(output, lambda mean, std: mean - z * std)


def test_inner_product_manipulation():
  output = inner_product_manipulation(0.5).apply(UPDATES, MALICIOUS, MASK, jax.random.key(0))
  check(output, lambda mean, std: -0.5 * mean)
  for name, leaf in UPDATES.items():  # the crafted update points against the honest mean
    assert float(np.sum(np.asarray(output[name])[0] * leaf[HONEST].mean(0))) < 0


def test_no_honest_client_gives_nan_not_a_number():
  all_bad = MASK.copy()
  output = inner_product_manipulation().apply(UPDATES, all_bad, MASK, jax.random.key(0))
  assert np.isnan(np.asarray(output["b"])[MASK]).all()


def test_argument_checks():
  with pytest.raises(ValueError, match="z"):
    a_little_is_enough(-1.0)
  with pytest.raises(ValueError, match="epsilon"):
    inner_product_manipulation(0.0)
