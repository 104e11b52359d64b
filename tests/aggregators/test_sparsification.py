"""Sparsified, sign-compressed and count-sketch uploads against NumPy, with their exact upload bits."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lite.aggregators import (
    client_upload_bits,
    compressed,
    count_sketch,
    quantize_above_threshold,
    random_k,
    secure_sum,
    shared_mask_key,
    shared_random_k,
    shared_random_k_compressor,
    sign_compression,
    sum_aggregator,
    top_k,
)
from fedjax_lite.core.tree import tree_size_bits

from tests.aggregators.helpers import run_next
from tests.tolerances import float_atol

VALUES = {"a": jnp.array([[0.5, -3.0, 0.1, 2.0], [1.0, 0.0, -0.2, 0.3], [9.0, 9.0, 9.0, 9.0]]),
          "b": jnp.array([[-1.5, 0.2], [0.05, -4.0], [9.0, 9.0]])}
MASK = jnp.array([True, True, False])
TEMPLATE = {"a": jnp.zeros(4), "b": jnp.zeros(2)}


def _numpy_top_k(vector, kept):
  out = np.zeros_like(vector)
  index = np.argsort(-np.abs(vector), kind="stable")[:kept]
  out[index] = vector[index]
  return out


@pytest.mark.parametrize("per_layer", [False, True])
def test_top_k_against_numpy_and_its_bits(per_layer):
  aggregator = top_k(k=2, per_layer=per_layer, inner=sum_aggregator())
  out = run_next(aggregator, aggregator.init(TEMPLATE), VALUES, [1.0, 1.0, 1.0], jax.random.key(0), MASK)
  expected = {"a": np.zeros(4), "b": np.zeros(2)}
  for i in range(2):
    a, b = np.asarray(VALUES["a"][i]), np.asarray(VALUES["b"][i])
    if per_layer:
      expected["a"] += _numpy_top_k(a, 2)
      expected["b"] += _numpy_top_k(b, 2)
    else:
      flat = _numpy_top_k(np.concatenate([a, b]), 2)
      expected["a"] += flat[:4]
      expected["b"] += flat[4:]
  for name in ("a", "b"):
    np.testing.assert_allclose(out.result[name], expected[name], rtol=1e-6)
  # global: 2 indices into 6 entries (3 bits) + 2 float32 values; per leaf: 2 x (2 + 32) + 2 x (1 + 32).
  assert client_upload_bits(aggregator, TEMPLATE) == (2 * (3 + 32) if not per_layer else 2 * 34 + 2 * 33)


def test_random_k_is_unbiased_and_sends_k_values_and_a_seed():
  """Over 20,000 clients with the same value, the mean of the decoded uploads is the value (each entry within 4.5
  standard errors: kept with probability k / d and scaled by d / k), and each upload has exactly k non-zeros."""
  value = jnp.array([1.0, -2.0, 0.5, 4.0, 0.0, 3.0])
  aggregator = random_k(k=2, inner=sum_aggregator())
  decoded = jax.vmap(lambda key: aggregator.client((), {"w": value}, jnp.float32(1.0), key))(
      jax.random.split(jax.random.key(1), 20_000))
  uploads = np.asarray(decoded["w"])
  assert np.all(np.sum(uploads != 0, axis=1) <= 2)
  standard_error = np.abs(np.asarray(value)) * math.sqrt(3 - 1) / math.sqrt(20_000)  # Var = x^2 (d/k - 1)
  assert np.all(np.abs(uploads.mean(0) - np.asarray(value)) <= 4.5 * standard_error + 1e-6)
  assert client_upload_bits(random_k(k=2), TEMPLATE) == 32 + 2 * 32 + 32  # seed, 2 values, the mean's weight


def test_sign_compression_against_numpy_and_its_bits():
  aggregator = sign_compression(inner=sum_aggregator())
  out = run_next(aggregator, aggregator.init(TEMPLATE), VALUES, [1.0, 1.0, 1.0], jax.random.key(0), MASK)
  for name in ("a", "b"):
    rows = np.asarray(VALUES[name][:2], np.float64)
    expected = sum(np.mean(np.abs(row)) * np.sign(row) for row in rows)
    np.testing.assert_allclose(out.result[name], expected, rtol=1e-6)
  assert client_upload_bits(aggregator, TEMPLATE) == (4 + 32) + (2 + 32)


def test_quantized_top_k_values_and_composition_with_quantization():
  aggregator = top_k(fraction=0.5, quantization_bits=4)
  # 3 indices of 3 bits, 3 values of 4 bits, their float32 range, and the default mean's float32 weight (which
  # the count left out before).
  assert client_upload_bits(aggregator, TEMPLATE) == 3 * 3 + 3 * 4 + 64 + 32
  # inside: the zero-filled dense value is quantized on the server's side; the sparse message is what is counted
  dense = top_k(k=3, inner=quantize_above_threshold(8, threshold=0))
  assert client_upload_bits(dense, TEMPLATE) == 3 * (3 + 32)


def test_bits_add_the_inner_aggregators_other_uploads():
  """The message replaces the dense value only: a DP aggregator's norm records and count still go up."""
  from fedjax_lite.aggregators import gaussian_adaptive, sign_compressor, compressed

  private = gaussian_adaptive(0.5, 100)
  side = client_upload_bits(private, {"a": jnp.zeros(0), "b": jnp.zeros(0)})
  assert side > 0
  assert client_upload_bits(compressed(sign_compressor(), private), TEMPLATE) == (4 + 32) + (2 + 32) + side


def test_count_sketch_recovers_the_heavy_coordinates_like_numpy():
  """Two clients, d = 200 with three heavy coordinates: the server's estimate (NumPy's median-of-rows decode of
  the summed sketch over the total weight) keeps the 3 heaviest and they match NumPy's decode."""
  rng = np.random.default_rng(0)
  values = rng.normal(0, 0.01, size=(2, 200)).astype(np.float32)
  values[:, [5, 50, 150]] += np.array([3.0, -2.0, 1.5], np.float32)
  weights = np.array([1.0, 3.0], np.float32)
  aggregator = count_sketch(k=3, width=64, depth=5, seed=4)
  out = run_next(aggregator, (), {"w": jnp.asarray(values)}, weights, jax.random.key(0))
  generator = np.random.default_rng(4)
  buckets = generator.integers(0, 64, size=(5, 200))
  signs = (2 * generator.integers(0, 2, size=(5, 200)) - 1).astype(np.float64)
  sketch = np.zeros((5, 64))
  for row in range(5):
    np.add.at(sketch[row], buckets[row], signs[row] * (weights[:, None] * values).sum(0))
  estimates = np.median(signs * np.take_along_axis(sketch / weights.sum(), buckets, axis=1), axis=0)
  expected = np.zeros(200)
  expected[[5, 50, 150]] = estimates[[5, 50, 150]]
  np.testing.assert_allclose(out.result["w"], expected, atol=1e-5)
  assert set(np.flatnonzero(np.asarray(out.result["w"]))) == {5, 50, 150}
  assert client_upload_bits(aggregator, {"w": jnp.zeros(200)}) == 5 * 64 * 32 + 32


@pytest.mark.parametrize("build, match", [
    (lambda: top_k(), "exactly one of k"),
    (lambda: top_k(k=1, fraction=0.5), "exactly one of k"),
    (lambda: random_k(fraction=1.5), "fraction"),
    (lambda: count_sketch(k=0, width=4), "k"),
])
def test_bad_arguments(build, match):
  with pytest.raises(ValueError, match=match):
    build()


# ----------------------------------------------------------------------------------------------- shared random-k

def _shared_indices(seed, round_num, group, size, kept):
  """The public support of round ``round_num`` (``shared_mask_key``'s docstring), drawn as documented."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), round_num), group)
  return np.asarray(jax.lax.top_k(jax.random.uniform(key, (size,)), kept)[1])


# Three rounds of ragged values: 3, 2 and 4 real clients (padding rows after them), unequal weights.
SHARED_ROUNDS = [(np.random.default_rng(r).normal(size=(4, 6)).astype(np.float32), np.array(w, np.float32), mask)
                 for r, (w, mask) in enumerate([([1.0, 3.0, 2.0, 0.0], [True, True, True, False]),
                                                ([5.0, 1.0, 0.0, 0.0], [True, True, False, False]),
                                                ([2.0, 1.0, 1.0, 4.0], [True, True, True, True])])]


@pytest.mark.parametrize("per_layer, unbiased", [(False, True), (True, False)])
def test_shared_random_k_matches_numpy_over_three_rounds(per_layer, unbiased):
  """Every client of round t sends its values at the same support (drawn from ``shared_mask_key(seed, t)``); the
  server's weighted mean of those k values, put back at the support (times d/k when unbiased), matches NumPy."""
  aggregator = shared_random_k(k=2, per_layer=per_layer, unbiased=unbiased, seed=11)
  state = aggregator.init(TEMPLATE)
  for round_num, (rows, weights, mask) in enumerate(SHARED_ROUNDS):
    values = {"a": jnp.asarray(rows[:, :4]), "b": jnp.asarray(rows[:, 4:])}
    out = run_next(aggregator, state, values, weights, jax.random.key(round_num), jnp.asarray(mask))
    state = out.state
    real = np.asarray(mask)
    mean = (weights[real, None].astype(np.float64) * rows[real]).sum(0) / weights[real].sum()
    expected = np.zeros(6)
    groups = [(0, 0, 4), (1, 4, 6)] if per_layer else [(0, 0, 6)]
    for group, start, stop in groups:
      index = start + _shared_indices(11, round_num, group, stop - start, 2)
      expected[index] = mean[index] * ((stop - start) / 2 if unbiased else 1.0)
    np.testing.assert_allclose(np.concatenate([out.result["a"], out.result["b"]]), expected, rtol=1e-6, atol=1e-6)
    assert int(state["round"]) == round_num + 1
  # the k values only (no indices, no seed) and the mean's weight; the round number (32 bits) is broadcast
  assert client_upload_bits(aggregator, TEMPLATE) == (2 * 2 if per_layer else 2) * 32 + 32
  assert tree_size_bits(jax.eval_shape(aggregator.broadcast, state)) == 32


@pytest.mark.parametrize("per_layer", [False, True])
def test_shared_random_k_composes_with_the_secure_sum_and_counts_its_bits(per_layer):
  """``inner=secure_sum(U)`` securely sums the k values only: the aggregate equals the plain sum's within the
  secure sum's quantization (each real client off by at most (U - L) / (2 (2^32 - 1)) per value, plus float32
  rounding of a sum of 4 values of magnitude <= U), and each client uploads k 32-bit summands and its 4 indicator
  bits, exactly."""
  plain = shared_random_k(k=3, per_layer=per_layer, unbiased=False, inner=sum_aggregator(), seed=5)
  secure = shared_random_k(k=3, per_layer=per_layer, unbiased=False, inner=secure_sum(4.0), seed=5)
  plain_state, secure_state = plain.init(TEMPLATE), secure.init(TEMPLATE)
  for round_num, (rows, weights, mask) in enumerate(SHARED_ROUNDS):
    values = {"a": jnp.asarray(rows[:, :4]), "b": jnp.asarray(rows[:, 4:])}
    key, mask = jax.random.key(round_num), jnp.asarray(mask)
    plain_out = run_next(plain, plain_state, values, weights, key, mask)
    secure_out = run_next(secure, secure_state, values, weights, key, mask)
    plain_state, secure_state = plain_out.state, secure_out.state
    clients = int(np.sum(np.asarray(mask)))
    bound = clients * 8.0 / (2 * (2**32 - 1)) + float_atol(4, 4.0 * clients)
    for name in ("a", "b"):
      np.testing.assert_allclose(secure_out.result[name], plain_out.result[name], rtol=0, atol=bound)
      assert np.sum(np.asarray(secure_out.result[name]) != 0) <= 3  # the support is the same for every client
  kept = 3 + 2 if per_layer else 3
  assert client_upload_bits(plain, TEMPLATE) == kept * 32
  assert client_upload_bits(secure, TEMPLATE) == kept * 32 + 4
  # quantization as the inner aggregator: b bits per kept value plus each vector's float32 range, nothing dense
  quantized = shared_random_k(k=3, per_layer=per_layer, inner=quantize_above_threshold(4, threshold=0))
  assert client_upload_bits(quantized, TEMPLATE) == kept * 4 + (2 if per_layer else 1) * 64


def test_shared_random_k_is_unbiased_over_rounds():
  """Over 20,000 rounds (round numbers 0..19,999 of the public key), the mean of the decoded value is the value
  (each entry within 4.5 standard errors: kept with probability k / d and scaled by d / k), and each round keeps
  exactly k entries."""
  value = {"w": jnp.array([1.0, -2.0, 0.5, 4.0, 0.0, 3.0])}
  compressor = shared_random_k_compressor(k=2, seed=9)
  decoded = jax.vmap(lambda t: compressor.compress(value, shared_mask_key(9, t))["w"])(jnp.arange(20_000))
  decoded = np.asarray(decoded)
  assert np.all(np.sum(decoded != 0, axis=1) <= 2)
  standard_error = np.abs(np.asarray(value["w"])) * math.sqrt(3 - 1) / math.sqrt(20_000)  # Var = x^2 (d/k - 1)
  assert np.all(np.abs(decoded.mean(0) - np.asarray(value["w"])) <= 4.5 * standard_error + 1e-6)


def test_shared_random_k_arguments():
  with pytest.raises(ValueError, match="unbiased=False"):
    shared_random_k_compressor(k=2, error_feedback=True)
  with pytest.raises(ValueError, match="exactly one of k"):
    shared_random_k(k=2, fraction=0.5)
  with pytest.raises(ValueError, match="seed"):
    shared_random_k(k=2, seed=-1)
  with pytest.raises(ValueError, match="per client"):
    compressed(shared_random_k_compressor(k=2, unbiased=False, error_feedback=True))
