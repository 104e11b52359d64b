"""Tests for fedjax_lite.aggregators.quantization: uniform stochastic quantization above a size threshold.

Statistical tolerance: the unbiasedness test draws N = 4000 independent quantizations of a fixed vector and accepts
a coordinate when ``|mean - x| <= 4 * SE + 1e-6``, with ``SE = step * sqrt(f (1 - f) / N)`` the standard error from
the known per-coordinate variance of stochastic rounding (``step = (hi - lo) / L``, ``f`` the fractional part of
``y = (x - lo) / step``); the ``1e-6`` absorbs float32 rounding of the decoded values.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lite.aggregators.base import client_upload_bits, split_rng
from fedjax_lite.aggregators.compression import compression_aggregator
from fedjax_lite.aggregators.mean import mean
from fedjax_lite.aggregators.quantization import (
    broadcast_encoder,
    dequantize,
    quantize,
    quantize_above_threshold,
    quantize_dequantize,
)
from fedjax_lite.models import original_fedavg_cnn


def one_client(values):
  return jax.tree.map(lambda v: v[0], values)


def run_next(aggregator, values, weights, rng, state=None):
  state = aggregator.init(one_client(values)) if state is None else state
  return jax.jit(aggregator.next)(state, values, weights, rng)


def run_streaming(aggregator, state, values, weights, rng):
  """The streaming path: a running sum of each client's contribution, then the server step."""
  clients_key, server_key = split_rng(rng)
  client_params = aggregator.parts.broadcast(state)
  client = jax.jit(aggregator.parts.client)
  total = None
  for index in range(weights.shape[0]):
    contribution = client(client_params, jax.tree.map(lambda v: v[index], values), weights[index],
                          jax.random.fold_in(clients_key, index))
    total = contribution if total is None else jax.tree.map(jnp.add, total, contribution)
  return jax.jit(aggregator.parts.server)(state, total, server_key)


# The pure quantizer ---------------------------------------------------------------------------------------------------


def test_stochastic_quantization_is_unbiased_within_four_standard_errors():
  bits, num_draws = 3, 4000
  x = jnp.asarray(np.random.default_rng(0).uniform(-2.0, 3.0, 64), jnp.float32)
  lo, hi = jnp.min(x), jnp.max(x)
  keys = jax.random.split(jax.random.key(0), num_draws)
  draws = jax.jit(jax.vmap(lambda key: dequantize(quantize(x, lo, hi, bits, key), lo, hi, bits)))(keys)
  sample_mean = np.asarray(jnp.mean(draws, axis=0), np.float64)

  step = (float(hi) - float(lo)) / (2**bits - 1)
  y = (np.asarray(x, np.float64) - float(lo)) / step
  fraction = y - np.floor(y)
  standard_error = step * np.sqrt(fraction * (1.0 - fraction) / num_draws)
  error = np.abs(sample_mean - np.asarray(x, np.float64))
  assert np.all(error <= 4.0 * standard_error + 1e-6), (error / np.maximum(standard_error, 1e-12)).max()
  # The variance matches step^2 f (1 - f) too (loosely: a sample variance of 4000 draws).
  np.testing.assert_allclose(np.var(np.asarray(draws, np.float64), axis=0), step**2 * fraction * (1 - fraction),
                             atol=0.15 * step**2 / 4)


def test_deterministic_rounding_is_biased_and_constant():
  # 1 bit over [0, 1]: 0.3 always rounds to 0, an error of -0.3 whatever the key.
  x = jnp.asarray([0.0, 0.3, 1.0], jnp.float32)
  aggregator = quantize_above_threshold(1, 0, stochastic=False)
  keys = jax.random.split(jax.random.key(1), 50)
  state = aggregator.init(x)
  results = jax.jit(jax.vmap(lambda key: aggregator.next(state, x[None], jnp.ones(1), key).result))(keys)
  errors = np.asarray(results[:, 1] - x[1])
  np.testing.assert_allclose(errors, -0.3, atol=1e-7)
  assert np.ptp(errors) == 0.0
  # Stochastic rounding of the same coordinate averages out instead.
  stochastic = quantize_above_threshold(1, 0)
  averaged = jax.jit(jax.vmap(lambda key: stochastic.next(state, x[None], jnp.ones(1), key).result))(
      jax.random.split(jax.random.key(2), 4000))
  assert abs(float(jnp.mean(averaged[:, 1])) - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 4000)


def test_default_is_stochastic_two_keys_differ():
  x = jnp.linspace(0.0, 1.0, 101, dtype=jnp.float32) ** 2
  aggregator = quantize_above_threshold(threshold=0)
  state = aggregator.init(x)
  first = run_next(aggregator, x[None], jnp.ones(1), jax.random.key(0), state).result
  second = run_next(aggregator, x[None], jnp.ones(1), jax.random.key(1), state).result
  assert not np.array_equal(np.asarray(first), np.asarray(second))
  levels_a = quantize(x, 0.0, 1.0, 8, jax.random.key(0))
  levels_b = quantize(x, 0.0, 1.0, 8, jax.random.key(1))
  assert levels_a.dtype == jnp.int32 and not np.array_equal(np.asarray(levels_a), np.asarray(levels_b))


def test_deterministic_rounding_needs_no_key_but_stochastic_does():
  x = jnp.asarray([0.0, 0.26, 1.0])
  np.testing.assert_array_equal(quantize(x, 0.0, 1.0, 2, None, stochastic=False), [0, 1, 3])
  with pytest.raises(ValueError, match="rng"):
    quantize(x, 0.0, 1.0, 2, None)


@pytest.mark.parametrize("stochastic", [True, False])
def test_values_on_levels_are_reproduced_exactly(stochastic):
  # 3 bits over [-3.5, 3.5]: the levels are -3.5, -2.5, ..., 3.5 (step 1).
  levels = jnp.arange(8, dtype=jnp.float32) - 3.5
  x = jnp.tile(levels, 5)[jnp.asarray(np.random.default_rng(1).permutation(40))]
  decoded = jax.jit(lambda key: quantize_dequantize(x, 3, key, stochastic=stochastic))(jax.random.key(3))
  np.testing.assert_array_equal(np.asarray(decoded), np.asarray(x))
  aggregator = quantize_above_threshold(3, 0, stochastic=stochastic)
  np.testing.assert_array_equal(np.asarray(run_next(aggregator, x[None], jnp.ones(1), jax.random.key(4)).result),
                                np.asarray(x))


def test_constant_leaf_gives_itself_back():
  x = jnp.full((5, 7), -1.25, jnp.float32)
  aggregator = quantize_above_threshold(4, 0)
  result = run_next(aggregator, x[None], jnp.ones(1), jax.random.key(0)).result
  np.testing.assert_array_equal(np.asarray(result), np.asarray(x))
  np.testing.assert_array_equal(np.asarray(quantize(x, -1.25, -1.25, 4, jax.random.key(0))), 0)


def test_leaves_at_or_below_threshold_pass_through_bit_exactly():
  rng = np.random.default_rng(2)
  values = {
      "at_threshold": jnp.asarray(rng.normal(size=(3, 2, 5)), jnp.float32),  # 10 elements: not quantized
      "above": jnp.asarray(rng.normal(size=(3, 11)), jnp.float32),  # 11 elements: quantized
      "small_ints": jnp.asarray(rng.integers(-5, 5, size=(3, 4)), jnp.int32),
  }
  aggregator = quantize_above_threshold(2, threshold=10)
  state = aggregator.init(one_client(values))
  client = jax.jit(aggregator.parts.client)
  contribution = client(aggregator.parts.broadcast(state), one_client(values), jnp.float32(1.0), jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(contribution["at_threshold"]), np.asarray(values["at_threshold"][0]))
  np.testing.assert_array_equal(np.asarray(contribution["small_ints"]), np.asarray(values["small_ints"][0]))
  assert contribution["small_ints"].dtype == jnp.int32
  assert not np.array_equal(np.asarray(contribution["above"]), np.asarray(values["above"][0]))
  # 2 bits: every decoded coordinate is one of the 4 levels between the client's min and max.
  x = np.asarray(values["above"][0])
  grid = x.min() + np.arange(4) * (x.max() - x.min()) / 3
  assert np.all(np.min(np.abs(np.asarray(contribution["above"])[:, None] - grid[None, :]), axis=1) < 1e-6)

  result = run_next(aggregator, values, jnp.ones(3), jax.random.key(5)).result
  np.testing.assert_array_equal(np.asarray(result["at_threshold"]), np.asarray(jnp.sum(values["at_threshold"], 0)))
  np.testing.assert_array_equal(np.asarray(result["small_ints"]), np.asarray(jnp.sum(values["small_ints"], 0)))


def test_one_bit_and_sixteen_bits():
  x = jnp.asarray(np.random.default_rng(3).normal(size=1000), jnp.float32)
  lo, hi = float(jnp.min(x)), float(jnp.max(x))
  one_bit = np.asarray(jax.jit(lambda key: quantize_dequantize(x, 1, key))(jax.random.key(0)))
  assert set(np.unique(one_bit)) <= {np.float32(lo), np.float32(hi)}
  sixteen_bits = np.asarray(jax.jit(lambda key: quantize_dequantize(x, 16, key))(jax.random.key(0)))
  step = (hi - lo) / (2**16 - 1)
  assert np.max(np.abs(sixteen_bits - np.asarray(x))) <= step * (1 + 1e-3)
  levels = quantize(x, lo, hi, 16, jax.random.key(1))
  assert int(jnp.min(levels)) == 0 and int(jnp.max(levels)) == 2**16 - 1


def test_fixed_min_max_clips_and_is_not_sent():
  x = jnp.asarray([-3.0, -1.0, 0.0, 0.5, 1.0, 4.0], jnp.float32)
  aggregator = quantize_above_threshold(2, 0, min_max=(-1.0, 2.0))  # levels -1, 0, 1, 2
  result = run_next(aggregator, x[None], jnp.ones(1), jax.random.key(0)).result
  np.testing.assert_array_equal(np.asarray(result)[[0, 1, 2, 4, 5]], [-1.0, -1.0, 0.0, 1.0, 2.0])
  assert float(result[3]) in (0.0, 1.0)
  assert aggregator.upload_bits(x) == 6 * 2


def test_padding_clients_contribute_nothing():
  values = jnp.asarray(np.random.default_rng(4).normal(size=(3, 30)), jnp.float32)
  aggregator = quantize_above_threshold(8, 0)
  state = aggregator.init(values[0])
  masked = jax.jit(aggregator.next)(state, values, jnp.ones(3), jax.random.key(0), jnp.asarray([True, True, False]))
  assert np.max(np.abs(np.asarray(masked.result - values[0] - values[1]))) < 2 * 2 * 6 / 255


# Sizes ----------------------------------------------------------------------------------------------------------------


def test_upload_bits_of_a_small_template_by_hand():
  template = {"big": jax.ShapeDtypeStruct((3, 4), jnp.float32), "small": jnp.zeros(5, jnp.float32),
              "ints": jax.ShapeDtypeStruct((2,), jnp.int32), "halves": jax.ShapeDtypeStruct((11,), jnp.float16)}
  # big: 12 * 5 + 64; small: 5 * 32; ints: 2 * 32; halves: 11 * 5 + 64.
  assert quantize_above_threshold(5, threshold=10).upload_bits(template) == 124 + 160 + 64 + 119
  assert quantize_above_threshold(5, threshold=10, min_max=(-1.0, 1.0)).upload_bits(template) == 60 + 160 + 64 + 55
  # threshold 12: nothing has more than 12 elements, so every leaf is sent at its dtype's width.
  assert client_upload_bits(quantize_above_threshold(5, threshold=12), template) == 12 * 32 + 160 + 64 + 11 * 16
  assert broadcast_encoder(5, threshold=10).bits(template) == 124 + 160 + 64 + 119


def test_cnn_upload_ratio_against_the_uncompressed_mean():
  template = jax.eval_shape(original_fedavg_cnn().init, jax.random.key(0))
  uncompressed = client_upload_bits(mean(), template)
  compressed = client_upload_bits(compression_aggregator(), template)
  assert uncompressed == 1_663_370 * 32 + 32
  # Quantized: Conv_1 kernel (51,200) and Dense_0 kernel (1,605,632) at 8 bits + 2 x 64; the other 6,538 floats
  # exact; + the float32 weight; + zeroing and clipping: a (below, count) record and an int32 count each.
  assert compressed == (51_200 + 1_605_632) * 8 + 2 * 64 + 6_538 * 32 + 32 + 2 * (64 + 32)
  ratio = uncompressed / compressed
  assert ratio >= 3.4
  assert ratio == pytest.approx(3.9533, abs=1e-4)


# Streaming ------------------------------------------------------------------------------------------------------------


def test_streaming_equals_next():
  rng = np.random.default_rng(5)
  values = {"w": jnp.asarray(rng.normal(size=(5, 8, 9)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)}
  weights = jnp.asarray(rng.uniform(1, 5, 5), jnp.float32)
  aggregator = quantize_above_threshold(6, threshold=3)
  state = aggregator.init(one_client(values))
  expected = jax.jit(aggregator.next)(state, values, weights, jax.random.key(7))
  streamed = run_streaming(aggregator, state, values, weights, jax.random.key(7))
  chex.assert_trees_all_close(streamed, expected, atol=0, rtol=1e-6)
  assert expected.state == () and expected.measurements == ()


# Broadcast encoder ----------------------------------------------------------------------------------------------------


def test_broadcast_encoder_quantizes_large_leaves_only():
  rng = np.random.default_rng(6)
  params = {"kernel": jnp.asarray(rng.normal(size=(20, 30)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=30), jnp.float32)}
  encoder = broadcast_encoder(4, threshold=100)
  encode = jax.jit(encoder.encode)
  first, second = encode(params, jax.random.key(0)), encode(params, jax.random.key(1))
  chex.assert_trees_all_equal_shapes_and_dtypes(first, params)
  np.testing.assert_array_equal(np.asarray(first["bias"]), np.asarray(params["bias"]))
  assert not np.array_equal(np.asarray(first["kernel"]), np.asarray(second["kernel"]))
  kernel = np.asarray(params["kernel"])
  assert np.max(np.abs(np.asarray(first["kernel"]) - kernel)) <= (kernel.max() - kernel.min()) / 15 * (1 + 1e-5)
  assert encoder.bits(params) == 600 * 4 + 64 + 30 * 32
  deterministic = broadcast_encoder(4, threshold=100, stochastic=False)
  chex.assert_trees_all_equal(deterministic.encode(params, jax.random.key(0)),
                              deterministic.encode(params, jax.random.key(1)))


# Arguments ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [0, 17])
def test_bad_quantization_bits(bits):
  with pytest.raises(ValueError, match="quantization_bits"):
    quantize_above_threshold(bits)
  with pytest.raises(ValueError, match="quantization_bits"):
    broadcast_encoder(bits)


def test_bad_threshold_min_max_and_stochastic():
  with pytest.raises(ValueError, match="threshold"):
    quantize_above_threshold(8, -1)
  with pytest.raises(TypeError, match="quantization_bits"):
    quantize_above_threshold(8.0)
  with pytest.raises(ValueError, match="min_max"):
    quantize_above_threshold(8, min_max=(1.0, -1.0))
  with pytest.raises(ValueError, match="min_max"):
    quantize_above_threshold(8, min_max=(1.0, 1.0))
  with pytest.raises(ValueError, match="min_max"):
    quantize_above_threshold(8, min_max=(1.0,))
  with pytest.raises(TypeError, match="stochastic"):
    quantize_above_threshold(8, stochastic=1)
