"""add_debug_measurements: exact values, streaming equals ``next``, the inner output is untouched, padding, sizes,
FedAvg metrics and argument checks."""

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
from fedjax_lite.aggregators.debug import DEBUG_KEYS, add_debug_measurements
from fedjax_lite.aggregators.mean import mean, unweighted_mean
from fedjax_lite.aggregators.robust import clipping
from fedjax_lite.aggregators.robust_statistics import coordinate_median, trimmed_mean
from fedjax_lite.aggregators.sum import sum_aggregator
from fedjax_lite.core import pack_clients

from tests.aggregators.helpers import run_streaming

KEY = jax.random.key(0)
NUM_SLOTS = 6

# Three clients with L2 norms 3, 4, 5 and weights 1, 2, 3.
HAND_VALUES = jnp.array([[3.0, 0.0], [0.0, 4.0], [3.0, 4.0]])
HAND_WEIGHTS = jnp.array([1.0, 2.0, 3.0])

MEAN_DEBUG = add_debug_measurements(mean())
MEAN_DEBUG_NEXT = jax.jit(MEAN_DEBUG.next)


def make_values(seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  scale = rng.uniform(0.1, 10.0, size=(NUM_SLOTS, 1))  # spread the client norms
  return {"kernel": (rng.normal(size=(NUM_SLOTS, 3, 2)) * scale[:, :, None]).astype(np.float32),
          "bias": (rng.normal(size=(NUM_SLOTS, 4)) * scale).astype(np.float32)}


def numpy_debug(values: dict, weights: np.ndarray, mask: np.ndarray, result) -> dict[str, float]:
  """The reference formulas in float64 over the real clients."""
  flat = np.concatenate([leaf.reshape(leaf.shape[0], -1) for leaf in values.values()], axis=1)[mask]
  norms, weights = np.linalg.norm(flat.astype(np.float64), axis=1), weights[mask].astype(np.float64)
  a, b = weights.sum(), (weights ** 2).sum()
  mean_norm = (weights * norms).sum() / a
  variance = (weights * norms ** 2).sum() / a - mean_norm ** 2
  unbiasing_factor = a * a / (a * a - b) if a * a - b > 0 else 0.0
  std = math.sqrt(unbiasing_factor * max(variance, 0.0))
  update = np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(result)]).astype(np.float64)
  return {"average_client_norm": mean_norm, "std_dev_client_norm": std, "server_update_max": update.max(),
          "server_update_norm": np.linalg.norm(update), "server_update_min": update.min(),
          "unbiasing_factor": unbiasing_factor, "mean_squared_norm": (weights * norms ** 2).sum() / a}


def assert_debug_close(measurements: dict, expected: dict) -> None:
  """Close to the float64 reference, the spread up to the float32 cancellation in ``E[n^2] - E[n]^2``.

  The summed moments carry a rounding error of a few ``eps * E[n^2]``, which the unbiasing factor
  ``a^2 / (a^2 - b)`` multiplies; the variance is compared with that absolute tolerance.
  """
  for key in DEBUG_KEYS:
    if key != "std_dev_client_norm":
      np.testing.assert_allclose(measurements[key], expected[key], rtol=2e-5, atol=1e-5, err_msg=key)
  tolerance = 4e-6 * expected["unbiasing_factor"] * expected["mean_squared_norm"]
  np.testing.assert_allclose(float(measurements["std_dev_client_norm"]) ** 2,
                             expected["std_dev_client_norm"] ** 2, rtol=1e-4, atol=tolerance + 1e-12)


# Exact values -----------------------------------------------------------------------------------------------------


def test_hand_computed_values_around_mean():
  """a = 6, b = 14, E[n] = 26/6, E[n^2] = 116/6, so std = sqrt(36/22 * 5/9) = sqrt(10/11).

  The weighted mean is ([3, 0] + [0, 8] + [9, 12]) / 6 = [2, 10/3].
  """
  output = MEAN_DEBUG_NEXT(MEAN_DEBUG.init(HAND_VALUES[0]), HAND_VALUES, HAND_WEIGHTS, KEY)
  measurements = output.measurements
  assert set(measurements) == {"mean_value", "mean_weight", *DEBUG_KEYS}
  np.testing.assert_allclose(output.result, [2.0, 10.0 / 3.0], rtol=1e-6)
  expected = {"average_client_norm": 13.0 / 3.0, "std_dev_client_norm": math.sqrt(10.0 / 11.0),
              "server_update_max": 10.0 / 3.0, "server_update_norm": math.sqrt(136.0) / 3.0,
              "server_update_min": 2.0}
  for key, value in expected.items():
    np.testing.assert_allclose(measurements[key], value, rtol=2e-6, err_msg=key)
    assert measurements[key].dtype == jnp.float32 and measurements[key].shape == ()


def test_unit_weights_give_sample_standard_deviation():
  values = jnp.array([[1.0, 0.0], [0.0, 2.0], [6.0, 0.0], [0.0, 0.0]])
  output = MEAN_DEBUG_NEXT(MEAN_DEBUG.init(values[0]), values, jnp.ones(4), KEY)
  np.testing.assert_allclose(output.measurements["average_client_norm"], 9.0 / 4.0, rtol=1e-6)
  np.testing.assert_allclose(output.measurements["std_dev_client_norm"], np.std([1.0, 2.0, 6.0, 0.0], ddof=1),
                             rtol=1e-6)


@settings(max_examples=30, deadline=None)
@given(mask=st.lists(st.booleans(), min_size=NUM_SLOTS, max_size=NUM_SLOTS).filter(lambda m: sum(m) >= 2),
       seed=st.integers(0, 2**31 - 1), unit_weights=st.booleans())
def test_random_inputs_match_numpy_and_ignore_padding(mask, seed, unit_weights):
  mask = np.array(mask)
  values = make_values(seed)
  rng = np.random.default_rng(seed + 1)
  weights = np.ones(NUM_SLOTS, np.float32) if unit_weights else rng.uniform(0.5, 20.0, NUM_SLOTS).astype(np.float32)
  padded_values = jax.tree.map(lambda leaf: np.where(mask.reshape((-1,) + (1,) * (leaf.ndim - 1)), leaf, 1e6),
                               values)
  padded_weights = np.where(mask, weights, 1e3).astype(np.float32)
  state = MEAN_DEBUG.init(jax.tree.map(lambda leaf: leaf[0], values))
  output = MEAN_DEBUG_NEXT(state, padded_values, padded_weights, KEY, mask)
  expected = numpy_debug(values, weights, mask, output.result)
  assert_debug_close(output.measurements, expected)
  if unit_weights:
    norms = [np.linalg.norm(np.concatenate([leaf[i].ravel() for leaf in values.values()]))
             for i in np.flatnonzero(mask)]
    assert_debug_close(output.measurements, dict(expected, std_dev_client_norm=float(np.std(norms, ddof=1))))


def test_undefined_statistics_are_zero():
  one_client = MEAN_DEBUG_NEXT(MEAN_DEBUG.init(HAND_VALUES[0]), HAND_VALUES, HAND_WEIGHTS, KEY,
                               np.array([False, True, False]))
  assert float(one_client.measurements["average_client_norm"]) == 4.0
  assert float(one_client.measurements["std_dev_client_norm"]) == 0.0
  no_weight = MEAN_DEBUG_NEXT(MEAN_DEBUG.init(HAND_VALUES[0]), HAND_VALUES, jnp.zeros(3), KEY)
  assert float(no_weight.measurements["average_client_norm"]) == 0.0
  assert float(no_weight.measurements["std_dev_client_norm"]) == 0.0
  equal_norms = MEAN_DEBUG_NEXT(MEAN_DEBUG.init(HAND_VALUES[0]), jnp.array([[3.0, 4.0], [5.0, 0.0], [0.0, -5.0]]),
                                HAND_WEIGHTS, KEY)
  assert float(equal_norms.measurements["std_dev_client_norm"]) == 0.0  # equal norms: no spread


# Streaming and transparency ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("build_inner", [mean, lambda: clipping(5.0, mean())], ids=["mean", "clipping_mean"])
def test_streaming_equals_next(build_inner):
  aggregator = add_debug_measurements(build_inner())
  assert aggregator.combine == "sum"
  values = make_values(seed=4)
  weights = np.arange(1.0, NUM_SLOTS + 1, dtype=np.float32)
  mask = np.array([True, False, True, True, False, True])
  state = aggregator.init(jax.tree.map(lambda leaf: leaf[0], values))
  # client part per real client with the keys `next` uses, summed, then the server part.
  streamed = run_streaming(aggregator, state, values, weights, KEY, client_mask=mask)
  direct = jax.jit(aggregator.next)(state, values, weights, KEY, mask)
  chex.assert_trees_all_close(streamed, direct, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("build_inner", [mean, unweighted_mean, sum_aggregator, lambda: clipping(5.0, mean()),
                                         coordinate_median, lambda: trimmed_mean(0.2)],
                         ids=["mean", "unweighted_mean", "sum", "clipping_mean", "median", "trimmed_mean"])
def test_inner_output_unchanged(build_inner):
  inner = build_inner()
  wrapped = add_debug_measurements(inner)
  assert wrapped.combine == inner.combine
  values = make_values(seed=5)
  weights = np.arange(1.0, NUM_SLOTS + 1, dtype=np.float32)
  mask = np.array([True, True, False, True, True, False])
  state = inner.init(jax.tree.map(lambda leaf: leaf[0], values))
  chex.assert_trees_all_equal(wrapped.init(jax.tree.map(lambda leaf: leaf[0], values)), state)
  plain = jax.jit(inner.next)(state, values, weights, KEY, mask)
  debugged = jax.jit(wrapped.next)(state, values, weights, KEY, mask)
  chex.assert_trees_all_equal(debugged.state, plain.state)
  chex.assert_trees_all_equal(debugged.result, plain.result)
  inner_measurements = ({key: debugged.measurements[key] for key in debugged.measurements if key not in DEBUG_KEYS}
                        if isinstance(plain.measurements, dict) else debugged.measurements["inner"])
  chex.assert_trees_all_equal(inner_measurements, plain.measurements)
  assert_debug_close(debugged.measurements, numpy_debug(values, weights, mask, plain.result))


def test_non_dict_measurements_nest_under_inner():
  wrapped = add_debug_measurements(sum_aggregator())
  output = jax.jit(wrapped.next)((), HAND_VALUES, HAND_WEIGHTS, KEY)
  assert set(output.measurements) == {"inner", *DEBUG_KEYS}
  assert output.measurements["inner"] == ()
  np.testing.assert_allclose(output.result, [6.0, 8.0])
  assert float(output.measurements["server_update_max"]) == 8.0


def test_upload_bits_add_four_float32_scalars():
  template = {"kernel": jax.ShapeDtypeStruct((3, 2), jnp.float32), "bias": jax.ShapeDtypeStruct((4,), jnp.float32)}
  for inner in (mean(), coordinate_median(), clipping(1.0, mean())):
    assert client_upload_bits(add_debug_measurements(inner), template) == client_upload_bits(inner, template) + 128
  assert client_upload_bits(add_debug_measurements(mean()), template) == 10 * 32 + 32 + 128


def test_dp_event_passes_through():
  inner = mean()._replace(dp_event=lambda: "event")
  assert add_debug_measurements(inner).dp_event() == "event"


# FedAvg -----------------------------------------------------------------------------------------------------------


def test_fed_avg_reports_debug_measurements(population, tiny_model, tiny_params):
  round_data = pack_clients(population, [0, 1, 3], batch_size=4, cohort_size=4)
  process = fedjax_lite.algorithms.fed_avg(tiny_model, client_learning_rate=0.1,
                                           aggregator=add_debug_measurements(mean()))
  state, metrics, _ = jax.jit(process.next)(process.init(tiny_params), round_data, jax.random.key(1))
  measurements = metrics["aggregator"]
  assert set(measurements) == {"mean_value", "mean_weight", *DEBUG_KEYS}
  update = jax.tree.map(jnp.subtract, tiny_params, state.params)
  flat = jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree.leaves(update)])
  np.testing.assert_allclose(measurements["server_update_norm"], jnp.linalg.norm(flat), rtol=1e-5)
  np.testing.assert_allclose(measurements["server_update_max"], jnp.max(flat), rtol=1e-6)
  np.testing.assert_allclose(measurements["server_update_min"], jnp.min(flat), rtol=1e-6)
  assert float(measurements["average_client_norm"]) > 0.0
  assert float(measurements["std_dev_client_norm"]) >= 0.0
  # The triangle inequality: the weighted mean of the deltas is no longer than the weighted mean of their norms.
  assert float(measurements["server_update_norm"]) <= float(measurements["average_client_norm"]) * (1 + 1e-5)


# Argument checks --------------------------------------------------------------------------------------------------


def test_rejects_non_aggregator():
  with pytest.raises(TypeError, match="inner must be an Aggregator, got function"):
    add_debug_measurements(mean)


def test_rejects_double_wrapping():
  twice = add_debug_measurements(add_debug_measurements(mean()))
  with pytest.raises(ValueError, match="already have the debug keys.*apply add_debug_measurements once"):
    jax.eval_shape(twice.next, twice.init(HAND_VALUES[0]), HAND_VALUES, HAND_WEIGHTS, KEY)
