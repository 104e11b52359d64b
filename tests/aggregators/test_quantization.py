"""Tests for fedjax_lite.aggregators.quantization: uniform stochastic quantization above a size threshold.

Statistical tolerance: the unbiasedness test draws N = 4000 independent quantizations of a fixed vector and accepts
a coordinate when ``|mean - x| <= 4 * SE + 1e-6``, with ``SE = step * sqrt(f (1 - f) / N)`` the standard error from
the known per-coordinate variance of stochastic rounding (``step = (hi - lo) / L``, ``f`` the fractional part of
``y = (x - lo) / step``); the ``1e-6`` absorbs float32 rounding of the decoded values.

Inputs are numpy arrays and each check runs in one jitted program: on CPU, compiling is what these tests spend
their time on.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lite.aggregators.base import client_upload_bits, split_rng
from fedjax_lite.aggregators.presets import compression_aggregator
from fedjax_lite.aggregators.mean import mean
from fedjax_lite.aggregators.quantization import (
    broadcast_encoder,
    dequantize,
    quantize,
    quantize_above_threshold,
    quantize_dequantize,
)
from fedjax_lite.models import original_fedavg_cnn

from tests.aggregators.helpers import one_client, run_streaming

NUM_DRAWS = 4000


@pytest.fixture(scope="module")
def many_keys():
  return jax.jit(lambda key: jax.random.split(key, NUM_DRAWS))(jax.random.key(0))



def results_over_keys(aggregator, x, keys):
  """``aggregator.next`` on the single client value ``x``, once per key (vmapped, one program)."""
  state = aggregator.init(x)
  return jax.jit(jax.vmap(lambda key: aggregator.next(state, x[None], np.ones(1, np.float32), key).result))(keys)



# The quantizer's statistics -------------------------------------------------------------------------------------------


def test_stochastic_quantization_is_unbiased_within_four_standard_errors(many_keys):
  bits = 3
  x = np.random.default_rng(0).uniform(-2.0, 3.0, 64).astype(np.float32)
  lo, hi = float(x.min()), float(x.max())
  draws = np.asarray(jax.jit(jax.vmap(lambda key: dequantize(quantize(x, lo, hi, bits, key), lo, hi, bits)))(
      many_keys), np.float64)

  step = (hi - lo) / (2**bits - 1)
  y = (x.astype(np.float64) - lo) / step
  fraction = y - np.floor(y)
  standard_error = step * np.sqrt(fraction * (1.0 - fraction) / NUM_DRAWS)
  error = np.abs(draws.mean(axis=0) - x)
  assert np.all(error <= 4.0 * standard_error + 1e-6), (error / np.maximum(standard_error, 1e-12)).max()
  # The spread matches the known variance step^2 f (1 - f) too (a sample variance of 4000 draws).
  np.testing.assert_allclose(draws.var(axis=0), step**2 * fraction * (1 - fraction), atol=0.15 * step**2 / 4)


def test_deterministic_rounding_is_biased_and_stochastic_is_not(many_keys):
  # 1 bit over [0, 1]: round-to-nearest sends 0.3 to 0 whatever the key, a constant error of -0.3.
  x = np.asarray([0.0, 0.3, 1.0], np.float32)
  deterministic = np.asarray(results_over_keys(quantize_above_threshold(1, 0, stochastic=False), x, many_keys))
  errors = deterministic[:, 1] - x[1]
  np.testing.assert_allclose(errors, -0.3, atol=1e-7)
  assert np.ptp(errors) == 0.0
  stochastic = np.asarray(results_over_keys(quantize_above_threshold(1, 0), x, many_keys))
  assert abs(stochastic[:, 1].mean() - 0.3) < 4 * math.sqrt(0.3 * 0.7 / NUM_DRAWS)
  np.testing.assert_array_equal(stochastic[:, [0, 2]], np.broadcast_to(x[[0, 2]], (NUM_DRAWS, 2)))


def test_default_is_stochastic_two_keys_differ():
  x = (np.linspace(0.0, 1.0, 101) ** 2).astype(np.float32)
  keys = jax.jit(lambda key: jax.random.split(key, 2))(jax.random.key(1))
  results = np.asarray(results_over_keys(quantize_above_threshold(threshold=0), x, keys))
  assert not np.array_equal(results[0], results[1])
  levels = np.asarray(jax.jit(jax.vmap(lambda key: quantize(x, 0.0, 1.0, 8, key)))(keys))
  assert levels.dtype == np.int32 and not np.array_equal(levels[0], levels[1])


def test_deterministic_rounding_needs_no_key_but_stochastic_does():
  x = np.asarray([0.0, 0.26, 1.0], np.float32)
  np.testing.assert_array_equal(jax.jit(lambda x: quantize(x, 0.0, 1.0, 2, None, stochastic=False))(x), [0, 1, 3])
  with pytest.raises(ValueError, match="rng"):
    jax.eval_shape(lambda x: quantize(x, 0.0, 1.0, 2, None), x)


# Exactness ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stochastic", [True, False])
def test_values_on_levels_and_constant_leaves_are_reproduced_exactly(stochastic):
  # 3 bits over [-3.5, 3.5]: the levels are -3.5, -2.5, ..., 3.5 (step 1); a constant leaf has hi == lo.
  levels = np.arange(8, dtype=np.float32) - 3.5
  values = {"on_levels": np.tile(levels, 5)[np.random.default_rng(1).permutation(40)][None],
            "constant": np.full((1, 5, 7), -1.25, np.float32)}
  aggregator = quantize_above_threshold(3, 0, stochastic=stochastic)
  result = jax.jit(aggregator.next)(aggregator.init(one_client(values)), values, np.ones(1, np.float32),
                                    jax.random.key(4)).result
  chex.assert_trees_all_equal(result, one_client(values))


def test_leaves_at_or_below_threshold_pass_through_bit_exactly():
  rng = np.random.default_rng(2)
  values = {
      "at_threshold": rng.normal(size=(3, 2, 5)).astype(np.float32),  # 10 elements: not quantized
      "above": rng.normal(size=(3, 11)).astype(np.float32),  # 11 elements: quantized
      "small_ints": rng.integers(-5, 5, size=(3, 4)).astype(np.int32),
  }
  aggregator = quantize_above_threshold(2, threshold=10)
  state = aggregator.init(one_client(values))

  @jax.jit
  def contribution_and_result(values, rng):
    contribution = aggregator.client(aggregator.broadcast(state), one_client(values), 1.0, rng)
    return contribution, aggregator.next(state, values, jnp.ones(3), rng).result

  contribution, result = contribution_and_result(values, jax.random.key(0))
  np.testing.assert_array_equal(contribution["at_threshold"], values["at_threshold"][0])
  np.testing.assert_array_equal(contribution["small_ints"], values["small_ints"][0])
  assert contribution["small_ints"].dtype == jnp.int32
  assert not np.array_equal(contribution["above"], values["above"][0])
  # 2 bits: every decoded coordinate is one of the 4 levels between this client's min and max.
  x = values["above"][0]
  grid = x.min() + np.arange(4) * (x.max() - x.min()) / 3
  assert np.all(np.min(np.abs(np.asarray(contribution["above"])[:, None] - grid[None, :]), axis=1) < 1e-6)
  np.testing.assert_array_equal(result["at_threshold"], values["at_threshold"].sum(0))
  np.testing.assert_array_equal(result["small_ints"], values["small_ints"].sum(0))


def test_one_bit_and_sixteen_bits():
  x = np.random.default_rng(3).normal(size=1000).astype(np.float32)
  lo, hi = float(x.min()), float(x.max())

  @jax.jit
  def encode(x, key):
    return (quantize_dequantize(x, 1, key), quantize_dequantize(x, 16, key),
            quantize(x, jnp.min(x), jnp.max(x), 16, key))

  one_bit, sixteen_bits, levels = map(np.asarray, encode(x, jax.random.key(0)))
  assert set(np.unique(one_bit)) == {np.float32(lo), np.float32(hi)}
  assert np.max(np.abs(sixteen_bits - x)) <= (hi - lo) / (2**16 - 1) * (1 + 1e-3)
  assert levels.min() == 0 and levels.max() == 2**16 - 1


def test_fixed_min_max_clips_and_is_not_sent():
  x = np.asarray([-3.0, -1.0, 0.0, 0.5, 1.0, 4.0], np.float32)
  aggregator = quantize_above_threshold(2, 0, min_max=(-1.0, 2.0))  # levels -1, 0, 1, 2
  result = np.asarray(jax.jit(aggregator.next)(aggregator.init(x), x[None], np.ones(1, np.float32),
                                               jax.random.key(0)).result)
  np.testing.assert_array_equal(result[[0, 1, 2, 4, 5]], [-1.0, -1.0, 0.0, 1.0, 2.0])
  assert result[3] in (0.0, 1.0)
  assert aggregator.upload_bits(x) == 6 * 2


def test_padding_clients_contribute_nothing():
  values = np.random.default_rng(4).normal(size=(3, 30)).astype(np.float32)
  values[2] = 1e6  # a padding slot holding garbage
  aggregator = quantize_above_threshold(8, 0)
  masked = jax.jit(aggregator.next)(aggregator.init(values[0]), values, np.ones(3, np.float32), jax.random.key(0),
                                    np.asarray([True, True, False]))
  # Each real client is off by at most one step of its own range.
  steps = (values[:2].max(1) - values[:2].min(1)) / 255
  assert np.max(np.abs(np.asarray(masked.result) - values[0] - values[1])) <= steps.sum() * (1 + 1e-4)


# Sizes ----------------------------------------------------------------------------------------------------------------


def test_upload_bits_of_a_small_template_by_hand():
  template = {"big": jax.ShapeDtypeStruct((3, 4), jnp.float32), "small": np.zeros(5, np.float32),
              "ints": jax.ShapeDtypeStruct((2,), jnp.int32), "halves": jax.ShapeDtypeStruct((11,), jnp.float16)}
  # threshold 10: big (12) 12 * 5 + 64; small 5 * 32; ints 2 * 32; halves (11) 11 * 5 + 64.
  assert quantize_above_threshold(5, threshold=10).upload_bits(template) == 124 + 160 + 64 + 119
  # A fixed range is known to the server: no 64 bits of [lo, hi].
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
  # exact; + the float32 weight; + zeroing and clipping: a (below, count) float32 record and an int32 count each.
  assert compressed == (51_200 + 1_605_632) * 8 + 2 * 64 + 6_538 * 32 + 32 + 2 * (64 + 32)
  ratio = uncompressed / compressed
  assert ratio >= 3.4
  assert ratio == pytest.approx(3.9533, abs=1e-4)  # 53,227,872 / 13,464,224 bits


# Streaming ------------------------------------------------------------------------------------------------------------


def test_streaming_equals_next():
  rng = np.random.default_rng(5)
  values = {"w": rng.normal(size=(5, 8, 9)).astype(np.float32), "b": rng.normal(size=(5, 3)).astype(np.float32)}
  weights = rng.uniform(1, 5, 5).astype(np.float32)
  aggregator = quantize_above_threshold(6, threshold=3)
  state = aggregator.init(one_client(values))
  expected = jax.jit(aggregator.next)(state, values, weights, jax.random.key(7))
  streamed = run_streaming(aggregator, state, values, weights, jax.random.key(7))
  chex.assert_trees_all_equal(streamed, expected)
  assert expected.state == () and expected.measurements == ()


# Broadcast encoder ----------------------------------------------------------------------------------------------------


def test_broadcast_encoder_quantizes_large_leaves_only():
  rng = np.random.default_rng(6)
  params = {"kernel": rng.normal(size=(20, 30)).astype(np.float32), "bias": rng.normal(size=30).astype(np.float32)}
  encoder = broadcast_encoder(4, threshold=100)
  deterministic = broadcast_encoder(4, threshold=100, stochastic=False)

  @jax.jit
  def encodings(params, keys):
    return jax.vmap(encoder.encode, in_axes=(None, 0))(params, keys), jax.vmap(deterministic.encode, (None, 0))(
        params, keys)

  stochastic, rounded = encodings(params, jax.random.split(jax.random.key(0), 2))
  chex.assert_trees_all_equal_shapes_and_dtypes(one_client(stochastic), params)
  np.testing.assert_array_equal(stochastic["bias"][0], params["bias"])
  assert not np.array_equal(stochastic["kernel"][0], stochastic["kernel"][1])
  kernel = params["kernel"]
  step = (kernel.max() - kernel.min()) / 15
  assert np.max(np.abs(np.asarray(stochastic["kernel"][0]) - kernel)) <= step * (1 + 1e-5)
  assert np.max(np.abs(np.asarray(rounded["kernel"][0]) - kernel)) <= step / 2 * (1 + 1e-5)
  np.testing.assert_array_equal(rounded["kernel"][0], rounded["kernel"][1])
  assert encoder.bits(params) == 600 * 4 + 64 + 30 * 32


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
  with pytest.raises(ValueError, match="threshold"):
    broadcast_encoder(8, -1)
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
