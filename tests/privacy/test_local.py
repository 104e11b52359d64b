"""Local DP: the clipped-and-noised upload against NumPy, the noise's scale, each client's epsilon against closed
forms, randomized response's probabilities and its unbiased decoder (histograms and heavy hitters)."""

from __future__ import annotations

import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fedjax_lite import analytics, privacy
from fedjax_lite.aggregators import local_dp, sum_aggregator

from tests.aggregators.helpers import run_next


def _clients_keys(rng, num):
  clients_key, _ = jax.random.split(rng)
  return [jax.random.split(jax.random.fold_in(clients_key, i))[0] for i in range(num)]


@pytest.mark.parametrize("mechanism, order, draw", [("gaussian", 2, privacy.gaussian_noise),
                                                    ("laplace", 1, privacy.laplace_noise)])
def test_upload_is_the_numpy_clip_plus_that_clients_noise(mechanism, order, draw):
  """The sum of the uploads equals NumPy's clip of each value (L2 or L1) plus the noise drawn with that client's
  key, up to the float32 rounding of a 3-term sum; a padding slot contributes nothing."""
  values = np.array([[3.0, 4.0, 0.0], [0.1, -0.2, 0.05], [7.0, 7.0, 7.0]], np.float32)
  clip, z = 1.0, 0.5
  aggregator = local_dp(mechanism, clip=clip, noise_multiplier=z, delta=1e-5, inner=sum_aggregator())
  rng = jax.random.key(3)
  out = run_next(aggregator, (), {"w": jnp.asarray(values)}, [1.0, 1.0, 1.0], rng, jnp.array([True, True, False]))
  expected = np.zeros(3)
  for value, key in zip(values[:2], _clients_keys(rng, 2)):
    norm = np.linalg.norm(value.astype(np.float64), ord=order)
    clipped = value * min(1.0, clip / norm)
    expected += clipped + np.asarray(draw(key, {"w": jnp.zeros(3)}, z * 2 * clip)["w"], np.float64)
  np.testing.assert_allclose(out.result["w"], expected, rtol=0, atol=3 * 3 * np.finfo(np.float32).eps * 10)
  assert out.measurements["local_epsilon"] == np.float32(privacy.local_epsilon(mechanism, z, 1e-5 if
                                                                              mechanism == "gaussian" else 0.0))


def test_noise_scales():
  """4,000 clients x 1 coordinate of zeros: Gaussian sd z 2C (sample sd within 5% of it: the sd of a sample sd of
  n = 4,000 is 1.1%, so 4.4 sigma); Laplace mean |noise| = z 2C (within 5%: its relative sd is 1.6%)."""
  values = {"w": jnp.zeros((4000, 1))}
  for mechanism in ("gaussian", "laplace"):
    aggregator = local_dp(mechanism, clip=0.5, noise_multiplier=1.5, delta=1e-5, inner=sum_aggregator())
    uploads = jax.vmap(aggregator.client, in_axes=(None, 0, None, 0))(
        (), values, jnp.float32(1.0), jax.random.split(jax.random.key(0), 4000))["w"]
    spread = np.std(uploads) if mechanism == "gaussian" else np.mean(np.abs(uploads))
    assert abs(spread / 1.5 - 1.0) < 0.05


def test_local_epsilon_closed_forms():
  """Laplace: 1 / z. Gaussian (Balle & Wang 2018, Thm. 8): delta(eps) = Phi(1/(2z) - eps z) - e^eps
  Phi(-1/(2z) - eps z) at the reported eps is the requested delta (PLD's epsilon is an upper bound within its
  discretization: delta there is <= the target and within 2% of it)."""
  assert privacy.local_epsilon("laplace", 0.25) == 4.0
  for z in (0.5, 1.0, 3.0):
    epsilon = privacy.local_epsilon("gaussian", z, 1e-5)
    delta = stats.norm.cdf(1 / (2 * z) - epsilon * z) - math.exp(epsilon) * stats.norm.cdf(-1 / (2 * z) - epsilon * z)
    assert 0.98e-5 <= delta <= 1e-5 * (1 + 1e-9)


def test_randomized_response_probabilities_and_event():
  epsilon, k = 1.2, 5
  p_keep, p_other = privacy.randomized_response_probabilities(epsilon, k)
  assert math.isclose(p_keep / p_other, math.exp(epsilon)) and math.isclose(p_keep + (k - 1) * p_other, 1.0)
  accountant = dp_accounting.pld.PLDAccountant(dp_accounting.NeighboringRelation.REPLACE_ONE)
  assert math.isclose(accountant.compose(privacy.randomized_response_event(epsilon, k)).get_epsilon(0.0), epsilon,
                      rel_tol=1e-3)
  # 60,000 reports of category 2: each category's frequency within 4.5 sd of its probability.
  keys = jax.random.split(jax.random.key(1), 60_000)
  reports = np.asarray(jax.vmap(lambda key: privacy.randomized_response(key, 2, epsilon, k))(keys))
  frequencies = np.bincount(reports, minlength=k) / reports.size
  expected = np.full(k, p_other)
  expected[2] = p_keep
  assert np.all(np.abs(frequencies - expected) <= 4.5 * np.sqrt(expected * (1 - expected) / reports.size))


def test_decoder_is_numpys_unbiased_inverse():
  counts, total, epsilon = np.array([10.0, 3.0, 0.0, 7.0]), 20.0, 0.7
  p_keep, p_other = np.exp(epsilon) / (np.exp(epsilon) + 3), 1 / (np.exp(epsilon) + 3)
  transition = np.full((4, 4), p_other) + np.eye(4) * (p_keep - p_other)  # E[observed] = transition @ true
  np.testing.assert_allclose(privacy.decode_randomized_response(counts, total, epsilon),
                             np.linalg.solve(transition, counts), rtol=1e-5)


def test_randomized_response_histogram_is_unbiased():
  """20,000 clients, 4 bins + out-of-range values: the estimate is within 4.5 sd of the true counts (sd from the
  decoder's variance), and padding slots are not counted."""
  rng = np.random.default_rng(0)
  values = rng.choice(np.array([0.5, 1.5, 2.5, 3.5, 9.0], np.float32), p=[0.4, 0.3, 0.2, 0.05, 0.05], size=20_000)
  edges = np.arange(5, dtype=np.float32)
  true = np.histogram(values, edges)[0]
  epsilon = 1.0
  query = analytics.randomized_response_histogram(edges, epsilon=epsilon)
  padded = np.concatenate([values, np.full(100, 0.5, np.float32)])
  mask = np.arange(padded.size) < values.size
  estimate = np.asarray(jax.jit(query.compute)(padded, jax.random.key(2), client_mask=jnp.asarray(mask)))
  p_keep, p_other = privacy.randomized_response_probabilities(epsilon, 5)
  sd = np.sqrt(values.size * 0.4 * 0.6 + values.size * p_other) / (p_keep - p_other)  # a generous bound
  assert np.all(np.abs(estimate - true) <= 4.5 * sd)
  assert isinstance(query.dp_event(), dp_accounting.RandomizedResponseDpEvent)


def test_randomized_response_heavy_hitters_finds_the_top_items():
  rng = np.random.default_rng(1)
  items = rng.choice(50, p=np.r_[[0.3, 0.2, 0.15], np.full(47, 0.35 / 47)], size=20_000).astype(np.int32)
  query = analytics.randomized_response_heavy_hitters(50, 3, epsilon=3.0)
  top = jax.jit(query.compute)(items, jax.random.key(0))
  assert sorted(np.asarray(top.items).tolist()) == [0, 1, 2]
  assert top.estimates.shape == (50,)


@pytest.mark.parametrize("build, match", [
    (lambda: local_dp("gaussian", clip=1.0, noise_multiplier=1.0), "delta"),
    (lambda: local_dp("uniform", clip=1.0, noise_multiplier=1.0), "mechanism"),
    (lambda: local_dp("laplace", clip=0.0, noise_multiplier=1.0), "clip"),
    (lambda: analytics.randomized_response_histogram([0.0, 1.0], epsilon=0.0), "epsilon"),
    (lambda: privacy.randomized_response_probabilities(1.0, 1), "num_categories"),
])
def test_bad_arguments(build, match):
  with pytest.raises(ValueError, match=match):
    build()
