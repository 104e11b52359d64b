"""Coordinate-wise median and trimmed mean: numpy/scipy agreement over real clients, padding, robustness to
Byzantine clients, NaN/Inf, FedAvg integration, sizes and argument checks."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fedjax_lite
from fedjax_lite.aggregators.base import client_upload_bits
from fedjax_lite.aggregators.mean import mean
from fedjax_lite.aggregators.robust_statistics import coordinate_median, trimmed_mean
from fedjax_lite.core import pack_clients

KEY = jax.random.key(0)
TRIM_FRACTIONS = (0.0, 0.1, 0.2, 0.25, 0.3, 0.45, 0.49)

# One jitted `next` per aggregator, shared by the tests, so each (shape, dtype) compiles once.
MEDIAN = coordinate_median()
MEDIAN_NEXT = jax.jit(MEDIAN.next)
TRIMMED = {fraction: trimmed_mean(fraction) for fraction in TRIM_FRACTIONS}
TRIMMED_NEXT = {fraction: jax.jit(aggregator.next) for fraction, aggregator in TRIMMED.items()}


def make_values(num_slots: int, seed: int, ties: bool = False) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  if ties:  # few distinct values: many equal entries per coordinate
    draw = lambda shape: rng.integers(-2, 3, shape).astype(np.float32)
  else:
    draw = lambda shape: rng.normal(size=shape).astype(np.float32)
  return {"kernel": draw((num_slots, 3, 2)), "bias": draw((num_slots, 4))}


def numpy_trimmed_mean(real: np.ndarray, trim_fraction: float) -> np.ndarray:
  """The reference: sort, drop ``int(trim_fraction * n)`` per side, average the rest (in float64)."""
  num_real = real.shape[0]
  k = int(trim_fraction * num_real)
  return np.sort(real.astype(np.float64), axis=0)[k:num_real - k].mean(axis=0)


def with_garbage_padding(values: dict, mask: np.ndarray) -> dict:
  """Padding slots hold huge values and NaN: none of it may reach the result."""
  padded = {}
  for name, leaf in values.items():
    leaf = leaf.copy()
    leaf[~mask] = 1e30
    if (~mask).any():
      leaf[np.flatnonzero(~mask)[0]].flat[0] = np.nan
    padded[name] = leaf
  return padded


NUM_SLOTS = 8  # most tests share this client axis (the real count varies through the mask) to compile once
masks = st.lists(st.booleans(), min_size=NUM_SLOTS, max_size=NUM_SLOTS).filter(any)


# Agreement with numpy ---------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(mask=masks, seed=st.integers(0, 2**31 - 1), ties=st.booleans())
def test_median_equals_numpy_over_real_clients(mask, seed, ties):
  mask = np.array(mask)
  values = make_values(len(mask), seed, ties)
  output = MEDIAN_NEXT((), with_garbage_padding(values, mask), jnp.ones(len(mask)), KEY, mask)
  expected = {name: np.median(leaf[mask], axis=0) for name, leaf in values.items()}
  chex.assert_trees_all_close(output.result, expected, rtol=1e-6, atol=1e-7)
  assert output.state == () and output.measurements == {}


@settings(max_examples=40, deadline=None)
@given(mask=masks, seed=st.integers(0, 2**31 - 1), ties=st.booleans(), trim_fraction=st.sampled_from(TRIM_FRACTIONS))
def test_trimmed_mean_equals_numpy_over_real_clients(mask, seed, ties, trim_fraction):
  mask = np.array(mask)
  values = make_values(len(mask), seed, ties)
  output = TRIMMED_NEXT[trim_fraction]((), with_garbage_padding(values, mask), jnp.ones(len(mask)), KEY, mask)
  expected = {name: numpy_trimmed_mean(leaf[mask], trim_fraction) for name, leaf in values.items()}
  chex.assert_trees_all_close(output.result, expected, rtol=1e-5, atol=1e-6)
  assert int(output.measurements["trimmed_per_side"]) == int(trim_fraction * mask.sum())


@pytest.mark.parametrize("num_real", [1, 2, 3, 4, 5, 6])
def test_median_even_and_odd_counts_exact(num_real):
  """Odd: the middle value; even: the mean of the two middle values (not the lower or upper median)."""
  real = np.array([10.0, -3.0, 7.0, 1.0, 4.0, 2.0], np.float32)[:num_real]
  values = np.concatenate([real, np.full(3, -1e9, np.float32)])[:, None]  # 3 padding slots after the real ones
  mask = np.arange(len(values)) < num_real
  result = MEDIAN_NEXT((), values, jnp.ones(len(values)), KEY, mask).result
  assert float(result[0]) == float(np.median(real))


def test_trimmed_mean_matches_scipy():
  scipy_stats = pytest.importorskip("scipy.stats")
  values = make_values(NUM_SLOTS, seed=3)
  for fraction in TRIM_FRACTIONS:
    result = TRIMMED_NEXT[fraction]((), values, jnp.ones(NUM_SLOTS), KEY, np.ones(NUM_SLOTS, bool)).result
    expected = {name: scipy_stats.trim_mean(leaf, fraction, axis=0) for name, leaf in values.items()}
    chex.assert_trees_all_close(result, expected, rtol=1e-5, atol=1e-6)


def test_trim_count_uses_float64_floor():
  """``k = floor(beta * n)`` as scipy computes it: 0.3 * 10 trims 3 (also float32 would), 0.25 * 7 trims 1, ..."""
  values = make_values(NUM_SLOTS, seed=0)
  for fraction, num_real, k in [(0.25, 7, 1), (0.25, 8, 2), (0.49, 2, 0), (0.45, 8, 3), (0.1, 8, 0), (0.3, 7, 2)]:
    mask = np.arange(NUM_SLOTS) < num_real
    output = TRIMMED_NEXT[fraction]((), values, jnp.ones(NUM_SLOTS), KEY, mask)
    assert int(output.measurements["trimmed_per_side"]) == k
    assert output.measurements["trimmed_per_side"].dtype == jnp.int32


def test_zero_trim_is_the_unweighted_mean_and_ignores_weights():
  values = make_values(5, seed=1)
  mask = np.array([True, False, True, True, False])
  output = TRIMMED_NEXT[0.0]((), values, jnp.array([1.0, 7.0, 100.0, 0.5, 3.0]), KEY, mask)
  expected = jax.tree.map(lambda leaf: leaf[mask].mean(axis=0), values)
  chex.assert_trees_all_close(output.result, expected, rtol=1e-6)
  # Weight 0 is the contract's "takes no part" (padding, rejected clients): such a client has no vote.
  zero_weight = TRIMMED_NEXT[0.0]((), values, jnp.array([1.0, 7.0, 100.0, 0.0, 3.0]), KEY, mask)
  voters = mask & np.array([True, True, True, False, True])
  chex.assert_trees_all_close(zero_weight.result, jax.tree.map(lambda leaf: leaf[voters].mean(axis=0), values),
                              rtol=1e-6)
  median_a = MEDIAN_NEXT((), values, jnp.ones(5), KEY, mask).result
  median_b = MEDIAN_NEXT((), values, jnp.array([0.5, 5.0, 2.0, 9.0, 1.0]), jax.random.key(9), mask).result
  chex.assert_trees_all_equal(median_a, median_b)


def test_no_mask_means_every_slot_is_real():
  values = make_values(5, seed=2)
  chex.assert_trees_all_equal(MEDIAN_NEXT((), values, jnp.ones(5), KEY).result,
                              MEDIAN_NEXT((), values, jnp.ones(5), KEY, np.ones(5, bool)).result)


def test_bfloat16_values_keep_their_dtype():
  values = jnp.array([[1.0], [2.0], [4.0], [8.0]], jnp.bfloat16)
  assert MEDIAN_NEXT((), values, jnp.ones(4), KEY).result.dtype == jnp.bfloat16
  assert float(MEDIAN_NEXT((), values, jnp.ones(4), KEY).result[0]) == 3.0
  assert float(TRIMMED_NEXT[0.25]((), values, jnp.ones(4), KEY).result[0]) == 3.0


def test_traced_trim_fraction_under_vmap():
  values = np.array([[0.0], [1.0], [2.0], [3.0], [100.0]], np.float32)

  def result_for(fraction):
    return trimmed_mean(fraction).next((), values, jnp.ones(5), KEY).result[0]

  results = jax.jit(jax.vmap(result_for))(jnp.array([0.0, 0.2, 0.4]))
  np.testing.assert_allclose(results, [106.0 / 5, 2.0, 2.0], rtol=1e-6)


# Robustness -------------------------------------------------------------------------------------------------------


def test_three_byzantine_of_ten_cannot_drag_median_or_trimmed_mean():
  honest = np.random.default_rng(0).normal(size=(7, 50)).astype(np.float32)
  values = np.concatenate([honest, np.full((3, 50), 1e6, np.float32)])[np.random.default_rng(1).permutation(10)]
  weights = jnp.ones(10)
  low, high = honest.min(axis=0), honest.max(axis=0)
  median = MEDIAN_NEXT((), values, weights, KEY).result
  trimmed_output = TRIMMED_NEXT[0.3]((), values, weights, KEY)
  trimmed = trimmed_output.result
  assert int(trimmed_output.measurements["trimmed_per_side"]) == 3
  plain_mean = jax.jit(mean().next)(mean().init(values[0]), values, weights, KEY).result
  for robust in (median, trimmed):
    assert np.all((low <= robust) & (robust <= high))
    assert float(jnp.max(jnp.abs(robust))) < 5.0
  # The plain mean moves by 3e5 on every coordinate; trimming too little (k = 1 < 3 attackers) fails as well.
  assert float(jnp.min(plain_mean)) > 2e5
  too_little = TRIMMED_NEXT[0.1]((), values, weights, KEY).result
  assert float(jnp.min(too_little)) > 1e5


def test_minority_nan_attack_is_visible_not_hidden():
  """A real client's NaN makes that coordinate NaN (as np.median); a NaN in a padding slot is ignored."""
  values = np.array([[1.0, 1.0], [2.0, np.nan], [3.0, 3.0], [np.nan, np.nan]], np.float32)
  mask = np.array([True, True, True, False])
  for next_fn in (MEDIAN_NEXT, TRIMMED_NEXT[0.3]):
    result = np.asarray(next_fn((), values, jnp.ones(4), KEY, mask).result)
    assert result[0] == 2.0 and np.isnan(result[1])


def test_infinities_are_ordered_like_values():
  values = np.array([[-np.inf], [1.0], [2.0], [3.0], [np.inf], [7.0]], np.float32)
  mask = np.array([True, True, True, True, True, False])
  assert float(MEDIAN_NEXT((), values, jnp.ones(6), KEY, mask).result[0]) == 2.0
  assert float(TRIMMED_NEXT[0.3]((), values, jnp.ones(6), KEY, mask).result[0]) == 2.0
  assert float(TRIMMED_NEXT[0.0]((), values[1:], jnp.ones(5), KEY, mask[1:]).result[0]) == np.inf


def test_all_padding_gives_nan_and_empty_client_axis_raises():
  values = np.ones((3, 2), np.float32)
  for next_fn in (MEDIAN_NEXT, TRIMMED_NEXT[0.1]):
    assert np.all(np.isnan(next_fn((), values, jnp.ones(3), KEY, np.zeros(3, bool)).result))
  for aggregator in (MEDIAN, TRIMMED[0.1]):
    with pytest.raises(ValueError, match="at least one client"):
      jax.eval_shape(aggregator.next, (), np.ones((0, 2), np.float32), jnp.ones(0), KEY)


# FedAvg -----------------------------------------------------------------------------------------------------------


def test_fed_avg_with_median_runs_one_round(population, tiny_model, tiny_params):
  """One round with padding slots: the update is finite and non-zero, and padding never votes.

  With ``shuffle=False`` copies of a client train identically, so the median of three copies of client 4 is its
  delta, as is the median of client 4 alone among padding slots (were the padding's zero deltas counted, the
  update would be 0). Both rounds share one shape and one compilation.
  """
  num_steps = fedjax_lite.core.max_num_steps(population, batch_size=4)
  pack = lambda indices: pack_clients(population, indices, batch_size=4, num_steps=num_steps, cohort_size=6,
                                      shuffle=False)
  process = fedjax_lite.algorithms.fed_avg(tiny_model, client_learning_rate=0.1, aggregator=coordinate_median())
  next_fn = jax.jit(process.next)
  initial = process.init(tiny_params)
  state, metrics, _ = next_fn(initial, pack([0, 2, 3, 5]), jax.random.key(1))
  update = jax.tree.map(jnp.subtract, tiny_params, state.params)
  assert bool(fedjax_lite.core.tree_all_finite(update))
  assert any(float(jnp.max(jnp.abs(leaf))) > 0 for leaf in jax.tree.leaves(update))
  assert metrics["aggregator"] == {}
  assert int(metrics["finalizer"]["update_non_finite"]) == 0

  alone, _, _ = next_fn(initial, pack([4]), jax.random.key(1))
  copies, _, _ = next_fn(initial, pack([4, 4, 4]), jax.random.key(1))
  chex.assert_trees_all_close(alone.params, copies.params, rtol=1e-6, atol=1e-7)
  assert any(float(jnp.max(jnp.abs(a - b))) > 1e-4
             for a, b in zip(jax.tree.leaves(alone.params), jax.tree.leaves(tiny_params)))


# Contract and argument checks -------------------------------------------------------------------------------------


def test_not_streamable_state_and_upload_bits():
  template = {"kernel": jax.ShapeDtypeStruct((3, 2), jnp.float32), "bias": jnp.zeros(4, jnp.float32)}
  for aggregator in (MEDIAN, TRIMMED[0.1]):
    assert aggregator.combine == "stack"
    assert aggregator.init(template) == ()
    assert client_upload_bits(aggregator, template) == 10 * 32  # raw float32 values, no weight


@pytest.mark.parametrize("build", [coordinate_median, trimmed_mean], ids=["median", "trimmed_mean"])
def test_rejects_non_float_values(build):
  aggregator = build()
  with pytest.raises(TypeError, match="floating-point values.*int32"):
    aggregator.init(jnp.zeros(3, jnp.int32))
  with pytest.raises(TypeError, match="floating-point values.*int32"):
    jax.eval_shape(aggregator.next, (), {"a": jnp.zeros((2, 3)), "b": jnp.zeros((2, 3), jnp.int32)}, jnp.ones(2),
                   KEY)
  with pytest.raises(TypeError, match="floating-point values"):
    aggregator.upload_bits(jnp.zeros(3, jnp.bool_))


@pytest.mark.parametrize("bad, error, match", [
    (0.5, ValueError, r"trim_fraction must be in \[0.0, 0.5\), got 0.5"),
    (-0.1, ValueError, r"trim_fraction must be in \[0.0, 0.5\)"),
    (1.0, ValueError, r"trim_fraction must be in \[0.0, 0.5\)"),
    (math.nan, ValueError, "trim_fraction must be finite"),
    ("0.1", TypeError, "trim_fraction must be a real number"),
    (True, TypeError, "trim_fraction must be a real number"),
])
def test_trim_fraction_checked(bad, error, match):
  with pytest.raises(error, match=match):
    trimmed_mean(bad)


def test_client_mask_shape_checked():
  with pytest.raises(ValueError, match=r"client_mask must have shape \(3,\)"):
    jax.eval_shape(MEDIAN.next, (), np.zeros((3, 2), np.float32), jnp.ones(3), KEY, np.ones(4, bool))
  with pytest.raises(AssertionError):  # leaves disagree on the number of client slots
    jax.eval_shape(MEDIAN.next, (), {"a": np.zeros((3, 2), np.float32), "b": np.zeros((2, 2), np.float32)},
                   jnp.ones(3), KEY)
