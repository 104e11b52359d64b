"""Gaussian DP aggregators: clipping, noise scale, fixed normalizer, adaptive clip, noise split, events, arguments."""

from __future__ import annotations

import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lite.aggregators.differential_privacy import (
    ExtractingDpEventFromInitialStateError,
    adaptive_clip_noise_params,
    extract_dp_event,
    gaussian_adaptive,
    gaussian_fixed,
)
from fedjax_lite.aggregators.presets import dp_aggregator
from fedjax_lite.aggregators.mean import mean

from tests.aggregators.helpers import run_next, run_streaming

TEMPLATE = {"w": jnp.zeros(3)}


def test_fixed_without_noise_is_the_clipped_sum_over_m():
  values = {"w": jnp.array([[3.0, 4.0, 0.0], [0.0, 0.3, 0.4], [0.0, 0.0, 0.0]])}
  agg = gaussian_fixed(0.0, 10.0, 1.0)
  out = run_next(agg, agg.init(TEMPLATE), values, [5.0, 1.0, 1.0], jax.random.key(0))  # weights are ignored
  np.testing.assert_allclose(out.result["w"], np.array([0.6, 0.8 + 0.3, 0.4]) / 10.0, rtol=1e-6)
  assert out.measurements == {"dp_query_metrics": {}, "dp": ()}


def test_fixed_noise_scale_and_fixed_normalizer_with_padding():
  """z = 2, C = 0.5, m = 4: the noise on the mean has standard deviation zC/m = 0.25 per coordinate (checked over
  600 keys x 3 coordinates: within 10%; for 1,799 degrees of freedom that holds with probability > 0.999). A
  padding slot adds nothing but the divisor stays m."""
  values = {"w": jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [9.0, 9.0, 9.0]])}
  mask = jnp.array([True, True, False])
  agg = gaussian_fixed(2.0, 4.0, 0.5)
  state = agg.init(TEMPLATE)
  results = jax.jit(jax.vmap(lambda k: agg.next(state, values, jnp.ones(3), k, mask).result["w"]))(
      jax.random.split(jax.random.key(3), 600))
  noise = np.asarray(results) - np.array([0.5, 0.5, 0.0]) / 4.0
  assert np.std(noise, ddof=1) == pytest.approx(0.25, rel=0.1)
  assert abs(np.mean(noise)) < 4 * 0.25 / math.sqrt(1800)


def test_adaptive_clip_follows_the_geometric_rule():
  """With z = 0 there is no noise: 4 of 10 clients have norms <= C = 0.1, so b = 0.4 and the clip becomes
  C * exp(-0.2 * (0.4 - 0.5)), reported as dp_query_metrics/clip (the post-update clip)."""
  norms = np.array([0.01, 0.05, 0.1, 0.08, 0.2, 0.3, 1.0, 2.0, 5.0, 0.5], np.float32)
  values = {"w": jnp.asarray(np.stack([norms, np.zeros(10), np.zeros(10)], axis=1))}
  agg = gaussian_adaptive(0.0, 10.0)
  out = run_next(agg, agg.init(TEMPLATE), values, np.ones(10), jax.random.key(0))
  expected_clip = 0.1 * math.exp(-0.2 * (0.4 - 0.5))
  assert float(out.measurements["dp_query_metrics"]["clip"]) == pytest.approx(expected_clip, rel=1e-6)
  clipped = np.minimum(norms, 0.1)
  np.testing.assert_allclose(out.result["w"][0], clipped.sum() / 10.0, rtol=1e-6)
  # The next round clips at the new value.
  out2 = run_next(agg, out.state, values, np.ones(10), jax.random.key(1))
  np.testing.assert_allclose(out2.result["w"][0], np.minimum(norms, expected_clip).sum() / 10.0, rtol=1e-5)


def test_reference_log_round_one():
  """google-parfait/tff#1376: dp_aggregator(0.1, 10) moved the clip from 0.1 to 0.1089 after round 1, i.e.
  b ~ 0.07 (nearly all clients clipped). With every norm far above 0.1 and the count noise (sigma_b = 0.5) the
  clip lands near 0.1 * exp(0.1) = 0.1105; over 200 keys the mean of log(C_1 / 0.1) is 0.2 * 0.5 within 0.01."""
  agg = gaussian_adaptive(0.1, 10.0)
  values = {"w": jnp.ones((10, 3))}
  state = agg.init(TEMPLATE)
  clips = jax.jit(jax.vmap(lambda k: agg.next(state, values, jnp.ones(10), k).measurements["dp_query_metrics"][
      "clip"]))(jax.random.split(jax.random.key(0), 200))
  assert np.mean(np.log(np.asarray(clips) / 0.1)) == pytest.approx(0.1, abs=0.01)


def test_noise_split_formula_and_limits():
  value_noise, stddev = adaptive_clip_noise_params(1.0, 100.0)
  assert stddev == pytest.approx(5.0)
  assert value_noise == pytest.approx((1.0 - 1 / 100.0) ** -0.5)
  assert 1 / value_noise**2 + 1 / (2 * stddev) ** 2 == pytest.approx(1.0)
  assert adaptive_clip_noise_params(0.0, 10.0) == (0.0, 0.0)
  with pytest.raises(ValueError, match="clipped_count_stddev"):
    adaptive_clip_noise_params(1.0, 10.0)  # 2 * 0.5 = 1.0 is not > 1.0
  with pytest.warns(UserWarning, match="twice"):
    adaptive_clip_noise_params(1.0, 11.0)  # z_v = (1 - 1/1.21)^-0.5 = 2.4


def test_dp_events_and_extraction():
  fixed = gaussian_fixed(1.3, 10.0, 0.5)
  assert fixed.dp_event() == dp_accounting.GaussianDpEvent(1.3)
  adaptive = gaussian_adaptive(1.0, 100.0)
  value_noise, stddev = adaptive_clip_noise_params(1.0, 100.0)
  assert adaptive.dp_event() == dp_accounting.ComposedDpEvent(
      [dp_accounting.GaussianDpEvent(value_noise), dp_accounting.GaussianDpEvent(2 * stddev)])
  state = fixed.init(TEMPLATE)
  with pytest.raises(ExtractingDpEventFromInitialStateError):
    extract_dp_event(fixed, state)
  state = run_next(fixed, state, {"w": jnp.ones((2, 3))}, [1, 1], jax.random.key(0)).state
  assert extract_dp_event(fixed, state) == dp_accounting.GaussianDpEvent(1.3)
  with pytest.raises(ValueError, match="not a differentially private"):
    extract_dp_event(mean(), mean().init(TEMPLATE))


def test_dp_aggregator_preset_structure_and_streaming():
  agg = dp_aggregator(0.5, 20.0)
  state = agg.init(TEMPLATE)
  assert set(state) == {"zeroing_norm", "inner_agg", "zeroed_count_agg"}
  assert set(state["inner_agg"]) == {"query_state", "agg_state", "is_init_state"}
  values = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(6, 3)), jnp.float32)}
  out = run_next(agg, state, values, np.ones(6), jax.random.key(4))
  streamed = run_streaming(agg, state, values, np.ones(6), jax.random.key(4))
  np.testing.assert_allclose(streamed.result["w"], out.result["w"], rtol=1e-6)
  assert set(out.measurements["zeroing"]) == {"dp_query_metrics", "dp"}
  assert extract_dp_event(agg, out.state) == agg.dp_event()
  assert dp_aggregator(0.5, 20.0, zeroing=False).init(TEMPLATE).keys() == {"query_state", "agg_state",
                                                                           "is_init_state"}


@pytest.mark.parametrize("build, match", [
    (lambda: gaussian_fixed(-1.0, 10.0, 1.0), "noise_multiplier"),
    (lambda: gaussian_fixed(1.0, 0.0, 1.0), "clients_per_round"),
    (lambda: gaussian_fixed(1.0, 10.0, 0.0), "clip"),
    (lambda: gaussian_adaptive(1.0, 100.0, target_unclipped_quantile=2.0), "target_quantile"),
    (lambda: gaussian_adaptive(1.0, 100.0, learning_rate=-0.2), "learning_rate"),
    (lambda: gaussian_adaptive(1.0, 100.0, initial_l2_norm_clip=0.0), "initial_estimate"),
    (lambda: dp_aggregator(5.0, 10.0), "clipped_count_stddev"),
])
def test_bad_arguments(build, match):
  with pytest.raises((ValueError, TypeError), match=match):
    build()
