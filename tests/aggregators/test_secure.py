"""Simulated secure summation: exact INT mode with modular wrap-around, FLOAT mode within one quantization step,
adaptive bounds, the modular sum, the ``secure_aggregator`` preset, and argument checks."""

from __future__ import annotations

import contextlib
import functools
import math

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedjax_lite.aggregators import secure
from fedjax_lite.aggregators.base import AggregationContext, as_template, split_rng
from fedjax_lite.aggregators.mean import mean, unweighted_mean
from fedjax_lite.aggregators.estimation import EstimationProcess
from fedjax_lite.aggregators.presets import secure_aggregator
from fedjax_lite.aggregators.quantile_estimation import no_noise_quantile_estimator
from fedjax_lite.aggregators.robust import clipping, zeroing
from fedjax_lite.aggregators.secure import (FLOAT_QUANTIZATION_LEVELS, MAX_CLIENT_SLOTS, secure_modular_sum,
                                            secure_sum)
from fedjax_lite.core.runner import Runner, run_clients
from tests.aggregators.helpers import jitted_next

M = FLOAT_QUANTIZATION_LEVELS
KEY = jax.random.key(0)
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


def first_client(values):
  return jax.tree.map(lambda leaf: np.asarray(leaf)[0], values)


def run(aggregator, values, *, state=None, weights=None, client_mask=None, rng=KEY):
  """One jitted ``next``; ``state`` defaults to ``init`` of one client's value."""
  num = jax.tree.leaves(values)[0].shape[0]
  state = aggregator.init(first_client(values)) if state is None else state
  weights = jnp.ones((num,), jnp.float32) if weights is None else weights
  return jitted_next(aggregator)(state, values, weights, rng, client_mask)


@functools.cache
def streaming_round(aggregator):
  """A jitted round: the client part summed over clients by the sequential streaming runner, then the server
  part, with the keys ``next`` would use."""
  parts = aggregator

  def one_client(client_params, client_data, client_rng):
    return parts.client(client_params, client_data["value"], client_data["weight"], client_rng), None

  @jax.jit
  def go(state, values, weights, num_examples, rng):
    clients_key, server_key = split_rng(rng)
    round_data = {"value": values, "weight": weights, "num_examples": num_examples}
    total, _ = run_clients(one_client, parts.broadcast(state), round_data, clients_key,
                           runner=Runner(strategy="sequential"))
    context = AggregationContext(as_template(jax.tree.map(lambda v: v[0], values)), num_examples.shape[0])
    return parts.server(state, total, server_key, context)

  return go


def streamed(aggregator, values, *, state=None, weights=None, num_examples=None, rng=KEY):
  num = jax.tree.leaves(values)[0].shape[0]
  state = aggregator.init(first_client(values)) if state is None else state
  weights = jnp.ones((num,), jnp.float32) if weights is None else weights
  num_examples = jnp.ones((num,), jnp.int32) if num_examples is None else num_examples
  return streaming_round(aggregator)(state, values, weights, num_examples, rng)


def recording_process(report_value: float) -> EstimationProcess:
  """Reports a constant; its new state is the plain sum of the clients' scalars (to see what it was fed)."""
  return EstimationProcess(
      init=lambda: jnp.zeros((), jnp.float32),
      report=lambda state: jnp.asarray(report_value, jnp.float32),
      broadcast=lambda state: (),
      client=lambda params, x, rng: x,
      server=lambda state, records, rng, context: records,
      upload_bits=32,
  )


# ------------------------------------------------------------------------------------------------- INT mode

INT_BOUNDS = (-1000, 2**20)
INT_SUM = secure_sum(INT_BOUNDS[1], INT_BOUNDS[0])
INT_NEXT = jax.jit(INT_SUM.next)
INT_TEMPLATE = {"a": jnp.zeros((3,), jnp.int32), "b": jnp.zeros((2, 2), jnp.int32)}


@SETTINGS
@given(a=hnp.arrays(np.int32, (9, 3), elements=st.integers(*INT_BOUNDS)),
       b=hnp.arrays(np.int32, (9, 2, 2), elements=st.integers(*INT_BOUNDS)))
def test_int_mode_in_bounds_is_the_exact_integer_sum(a, b):
  out = INT_NEXT(INT_SUM.init(INT_TEMPLATE), {"a": a, "b": b}, jnp.ones(9), KEY)
  expected = {"a": a.astype(np.int64).sum(0), "b": b.astype(np.int64).sum(0)}
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, out.result), jax.tree.map(lambda x: x.astype(np.int32),
                                                                                   expected))
  chex.assert_trees_all_equal_dtypes(out.result, INT_TEMPLATE)
  assert int(out.measurements["secure_upper_clipped_count"]) == 0
  assert int(out.measurements["secure_lower_clipped_count"]) == 0


def test_int_mode_full_int32_range_uses_32_bit_summands_exactly():
  aggregator = secure_sum(2**31 - 1, -(2**31))
  values = jnp.array([[2**30 + 12345, -(2**31)], [-(2**30) - 7, 2**31 - 1], [2**29 + 3, 5]], jnp.int32)
  out = run(aggregator, values)
  np.testing.assert_array_equal(np.asarray(out.result), np.asarray(values, np.int64).sum(0))
  assert aggregator.upload_bits(values[0]) == 2 * 32 + 4


def test_int_mode_clips_out_of_range_inputs_and_counts_clients():
  aggregator = secure_sum(10)  # bounds [-10, 10]
  values = jnp.array([[3, 40, 50], [-30, 2, 1], [4, 5, 6], [-11, 11, 0]], jnp.int32)
  out = run(aggregator, values)
  np.testing.assert_array_equal(np.asarray(out.result), np.clip(np.asarray(values), -10, 10).sum(0))
  chex.assert_trees_all_equal(out.measurements, {
      "secure_upper_clipped_count": np.int32(2),  # clients 0 and 3, though client 0 has two large coordinates
      "secure_lower_clipped_count": np.int32(2),  # clients 1 and 3
      "secure_upper_threshold": np.int32(10),
      "secure_lower_threshold": np.int32(-10),
      "secure_non_finite_count": np.int32(0),
  })


WRAPPING_SUM = secure_sum(7, -2, modulus_bits=4)  # shifted summands in [0, 9], summed modulo 16


@SETTINGS
@given(values=hnp.arrays(np.int32, (6, 4), elements=st.integers(-20, 20)))
def test_int_mode_small_modulus_wraps_around(values):
  lower, upper, modulus_bits = -2, 7, 4
  out = run(WRAPPING_SUM, jnp.asarray(values))
  shifted = np.clip(values.astype(np.int64), lower, upper) - lower
  expected = shifted.sum(0) % 2**modulus_bits + len(values) * lower
  np.testing.assert_array_equal(np.asarray(out.result), expected)


@pytest.mark.parametrize("modulus_bits", [None, 5])
def test_streaming_equals_next_and_padding_changes_nothing(modulus_bits):
  rng = np.random.default_rng(1)
  values = rng.integers(-9, 30, (7, 5)).astype(np.int32)
  aggregator = secure_sum(25, -3, modulus_bits=modulus_bits)
  real = np.array([True, True, False, True, True, True, False])
  out = run(aggregator, values, client_mask=jnp.asarray(real))
  chex.assert_trees_all_equal(streamed(aggregator, values, num_examples=jnp.asarray(real, jnp.int32)), out)
  chex.assert_trees_all_equal(run(aggregator, values[real]), out)
  shifted = np.clip(np.asarray(values, np.int64)[real], -3, 25) + 3
  modulus = 2**modulus_bits if modulus_bits else 2**62
  np.testing.assert_array_equal(np.asarray(out.result), shifted.sum(0) % modulus - 3 * real.sum())


def test_contributions_are_32_bit_arrays():
  aggregator = secure_sum(no_noise_quantile_estimator(1.0, 0.5, 0.2, secure_estimation=True))
  template = {"w": jnp.zeros((3,)), "b": jnp.zeros(())}
  params = aggregator.broadcast(aggregator.init(template))
  shapes = jax.eval_shape(aggregator.client, params, template, jnp.float32(1.0), KEY)
  for leaf in jax.tree.leaves(shapes):
    assert leaf.size == 0 or np.dtype(leaf.dtype) in (np.uint32, np.int32, np.float32), leaf


# ------------------------------------------------------------------------------------------------ FLOAT mode

FLOAT_BOUNDS = (-3.25, 7.5)
FLOAT_SUM = secure_sum(FLOAT_BOUNDS[1], FLOAT_BOUNDS[0])
FLOAT_NEXT = jax.jit(FLOAT_SUM.next)


@SETTINGS
@given(values=hnp.arrays(np.float32, (11, 6), elements=st.floats(-10.0, 10.0, width=32)))
def test_float_mode_is_within_half_a_step_per_client(values):
  """|secure - sum_i clip(x_i)| <= n * step / 2 + half a float32 ulp of the result, step = (U - L) / M.

  Each client's rounding ``round(x s)`` errs by at most half a step (clipping ``q`` to ``[0, M]`` only moves it
  toward the true value); the float64 decoding adds ~1e-16 relative, and the final cast to float32 half an ulp.
  """
  lower, upper = np.float32(FLOAT_BOUNDS[0]), np.float32(FLOAT_BOUNDS[1])
  out = FLOAT_NEXT(FLOAT_SUM.init(values[0]), values, jnp.ones(11), KEY)
  exact = np.clip(values, lower, upper).astype(np.float64).sum(0)
  step = (float(upper) - float(lower)) / M
  bound = len(values) * step / 2 * (1 + 1e-6) + np.spacing(np.abs(exact).astype(np.float32) + 1e-30) / 2 * 1.01
  assert np.all(np.abs(np.asarray(out.result, np.float64) - exact) <= bound)


def test_float_mode_rounds_half_to_even_deterministically():
  # Bounds [-3, 3]: s = M / 6 = 715827882.5 exactly, so x = 1 lands on the tie 715827882.5, which rounds to the
  # even 715827882 (not up), and round(L s) = round(-2147483647.5) = -2147483648. Every client rounds alike.
  aggregator = secure_sum(3.0, -3.0)
  contribution = jax.jit(aggregator.client)((), jnp.ones((2,)), jnp.float32(1.0), KEY)
  limbs = np.asarray(contribution["value"], np.int64)
  levels = limbs[0] + (limbs[1] << 16)
  np.testing.assert_array_equal(levels, [715827882 + 2147483648] * 2)
  # The decoded value is 715827882 / 715827882.5 = 1 - 7e-10: biased low, below float32 resolution here.
  np.testing.assert_array_equal(np.asarray(run(aggregator, jnp.ones((4, 2))).result), [4.0, 4.0])


def test_float_mode_equal_bounds_gives_n_times_the_bound():
  values = jnp.array([[1.0, -4.0], [0.5, 0.5], [9.0, 0.0]], jnp.float32)
  out = run(secure_sum(0.75, 0.75), values, client_mask=jnp.array([True, False, True]))
  np.testing.assert_array_equal(np.asarray(out.result), [1.5, 1.5])


def test_float_mode_values_at_the_bounds_decode_to_the_bounds_sum():
  lower, upper = -3.7, 12.1
  at_bounds = np.where(np.arange(40).reshape(8, 5) % 3 == 0, upper, lower).astype(np.float32)
  out = run(secure_sum(upper, lower), jnp.asarray(at_bounds))
  np.testing.assert_allclose(np.asarray(out.result), at_bounds.astype(np.float64).sum(0), rtol=2e-7)


def test_float_mode_1000_clients_sum_exactly_in_the_integer_domain():
  lower, upper = -1.0, 3.0
  aggregator = secure_sum(upper, lower)
  rng = np.random.default_rng(4)
  values = np.concatenate([np.full((500, 4), upper), rng.uniform(-2.0, 4.0, (500, 4))]).astype(np.float32)
  parts = aggregator
  summed = jax.jit(lambda v: jax.tree.map(  # uint32 sums with plain +, as the streaming runner adds them
      lambda c: jnp.sum(c, axis=0), jax.vmap(lambda x: parts.client((), x, jnp.float32(1.0), KEY))(v)))(values)
  limb_sums = np.asarray(summed["value"])
  assert limb_sums.dtype == np.uint32
  summed_levels = limb_sums[0].astype(np.int64) + (limb_sums[1].astype(np.int64) << 16)
  scale = M / (upper - lower)
  clipped = np.clip(values, np.float32(lower), np.float32(upper)).astype(np.float64)
  levels = np.clip(np.round(clipped * scale) - np.round(lower * scale), 0, M).astype(np.int64)  # half-to-even
  np.testing.assert_array_equal(summed_levels, levels.sum(0))
  assert summed_levels.max() > 2**32  # far beyond one 32-bit word
  out = run(aggregator, values)
  np.testing.assert_allclose(np.asarray(out.result), clipped.sum(0), rtol=1e-6)


def test_largest_cohort_sums_exactly_and_one_more_client_is_refused():
  aggregator = secure_sum(1.0, 0.0)
  out = run(aggregator, jnp.ones((MAX_CLIENT_SLOTS, 1), jnp.float32))  # every limb at its maximum 0xFFFF
  np.testing.assert_array_equal(np.asarray(out.result), [float(MAX_CLIENT_SLOTS)])
  with pytest.raises(ValueError, match="client slots"):
    run(aggregator, jnp.ones((MAX_CLIENT_SLOTS + 1, 1), jnp.float32))


# -------------------------------------------------------------------------------------------- adaptive bounds


def test_single_process_is_fed_max_abs_before_clipping():
  values = {"w": jnp.array([[1.0, -9.0], [2.0, 3.0], [-0.5, 0.25]]), "b": jnp.array([[4.0], [-6.0], [0.1]])}
  aggregator = secure_sum(recording_process(2.5))
  out = run(aggregator, values)
  assert float(out.state) == pytest.approx(9.0 + 6.0 + 0.5)  # max(|min|, |max|) over all leaves, unclipped
  clipped = jax.tree.map(lambda x: np.clip(np.asarray(x, np.float64), -2.5, 2.5).sum(0), values)
  chex.assert_trees_all_close(jax.tree.map(lambda x: np.asarray(x, np.float64), out.result), clipped, atol=1e-6)
  assert float(out.measurements["secure_lower_threshold"]) == -2.5
  assert int(out.measurements["secure_upper_clipped_count"]) == 2  # clients 0 and 1
  assert int(out.measurements["secure_lower_clipped_count"]) == 2  # clients 0 and 1


def test_two_processes_are_fed_max_and_min():
  values = jnp.array([[1.0, -9.0, 0.0], [2.0, 3.0, 1.0], [-0.5, 0.25, -1.0]])
  aggregator = secure_sum(recording_process(2.5), recording_process(-0.75))
  out = run(aggregator, values)
  np.testing.assert_allclose(np.asarray(out.state), [1.0 + 3.0 + 0.25, -9.0 + 1.0 - 1.0])
  np.testing.assert_allclose(np.asarray(out.result), np.clip(np.asarray(values), -0.75, 2.5).sum(0), atol=1e-6)
  assert int(out.measurements["secure_upper_clipped_count"]) == 1
  assert int(out.measurements["secure_lower_clipped_count"]) == 2


def test_adaptive_bound_moves_as_the_estimator_says():
  aggregator = secure_sum(no_noise_quantile_estimator(50.0, 0.95, 1.0, multiplier=2.0, secure_estimation=True))
  values = jnp.array([[1.0, 2.0], [300.0, -1.0], [-4.0, 3.0], [0.5, 0.5]])  # 3 of 4 clients below 50
  state = aggregator.init(values[0])
  thresholds = []
  for _ in range(3):
    out = run(aggregator, values, state=state)
    thresholds.append(float(out.measurements["secure_upper_threshold"]))
    state = out.state
  estimate = 50.0
  expected = []
  for _ in range(3):
    expected.append(2.0 * estimate)
    below = np.mean(np.abs(np.asarray(values)).max(1) <= estimate)
    estimate *= math.exp(-1.0 * (below - 0.95))
  np.testing.assert_allclose(thresholds, expected, rtol=1e-6)
  assert float(out.measurements["secure_lower_threshold"]) == -thresholds[-1]
  assert int(out.measurements["secure_upper_clipped_count"]) == 1


# ------------------------------------------------------------------------------------------ modular sum


def test_modular_sum_wraps_around():
  values = jnp.array([[10, -1], [13, -1], [0, 0]], jnp.int32)  # 23 mod 7 = 2 and -2 mod 7 = 5
  out = run(secure_modular_sum(7), values)
  np.testing.assert_array_equal(np.asarray(out.result), [2, 5])
  assert out.state == () and out.measurements == ()


def test_modular_sum_symmetric_range():
  values = jnp.array([[3, -3, 4, 40], [4, -4, -4, 0]], jnp.int32)
  out = run(secure_modular_sum(5, symmetric_range=True), values)
  # modulo 9, then v >= 5 -> v - 9: 7 -> -2, -7 = 2, 0, 40 = 4.
  np.testing.assert_array_equal(np.asarray(out.result), [-2, 2, 0, 4])


MODULAR = secure_modular_sum(1000, symmetric_range=True)
MODULAR_NEXT = jax.jit(MODULAR.next)


@SETTINGS
@given(values=hnp.arrays(np.int32, (5, 3), elements=st.integers(-(2**31), 2**31 - 1)))
def test_modular_sum_matches_the_formula(values):
  out = MODULAR_NEXT(MODULAR.init(values[0]), values, jnp.ones(5), KEY)
  residue = values.astype(np.int64).sum(0) % 1999
  np.testing.assert_array_equal(np.asarray(out.result), np.where(residue >= 1000, residue - 1999, residue))


def test_modular_sum_rejects_non_integers_and_small_moduli():
  with pytest.raises(TypeError, match="integer"):
    secure_modular_sum(7).init(jnp.zeros((2,), jnp.float32))
  with pytest.raises(ValueError, match="modulus"):
    secure_modular_sum(1)
  with pytest.raises(ValueError, match="modulus"):
    secure_modular_sum(200, symmetric_range=True).init(jnp.zeros((2,), jnp.int8))


# ------------------------------------------------------------------------------------------ secure_aggregator


def plain_counterpart(weighted: bool):
  """The same composition with plain sums: zeroing(q=.98) o clipping(q=.8) o mean."""
  inner = mean() if weighted else unweighted_mean()
  inner = clipping(no_noise_quantile_estimator(1.0, 0.8, 0.2), inner)
  return zeroing(no_noise_quantile_estimator(10.0, 0.98, math.log(10.0), multiplier=2.0, increment=1.0), inner)


@pytest.mark.parametrize("weighted", [True, False])
def test_secure_aggregator_matches_the_plain_composition(weighted):
  values = {"w": np.random.default_rng(7).normal(size=(8, 3, 4)).astype(np.float32) * 0.4,
            "b": np.linspace(-0.5, 0.5, 8, dtype=np.float32)[:, None]}
  values["w"][2] = 50.0  # zeroed (L-inf 50 > 21); some others are clipped at L2 norm 1
  weights = np.arange(1.0, 9.0, dtype=np.float32)
  secure, plain = secure_aggregator(weighted=weighted), plain_counterpart(weighted)
  secure_state, plain_state = secure.init(first_client(values)), plain.init(first_client(values))
  for round_num in range(2):
    secure_out = run(secure, values, state=secure_state, weights=weights)
    plain_out = run(plain, values, state=plain_state, weights=weights)
    chex.assert_trees_all_close(secure_out.result, plain_out.result, rtol=1e-4, atol=1e-7)
    assert int(secure_out.measurements["zeroed_count"]) == int(plain_out.measurements["zeroed_count"]) == 1
    assert int(secure_out.measurements["zeroing"]["clipped_count"]) == int(
        plain_out.measurements["zeroing"]["clipped_count"]) > 0
    assert float(secure_out.measurements["zeroing_norm"]) == pytest.approx(
        float(plain_out.measurements["zeroing_norm"]), rel=1e-5)
    assert float(secure_out.measurements["zeroing"]["clipping_norm"]) == pytest.approx(
        float(plain_out.measurements["zeroing"]["clipping_norm"]), rel=1e-5)
    if weighted and round_num == 1:  # the streaming runner agrees with next, estimator states included
      chex.assert_trees_all_equal(streamed(secure, values, state=secure_state, weights=weights), secure_out)
    secure_state, plain_state = secure_out.state, plain_out.state

  secure_keys = {"secure_upper_clipped_count", "secure_lower_clipped_count", "secure_upper_threshold",
                 "secure_lower_threshold", "secure_non_finite_count"}
  inner_measurements = secure_out.measurements["zeroing"]["clipping"]
  assert set(secure_out.measurements) == {"zeroing", "zeroing_norm", "zeroed_count"}
  assert set(secure_out.measurements["zeroing"]) == {"clipping", "clipping_norm", "clipped_count"}
  assert set(inner_measurements["mean_value"]) == secure_keys
  assert set(secure_state) == {"zeroing_norm", "inner_agg", "zeroed_count_agg"}
  assert set(secure_state["inner_agg"]) == {"clipping_norm", "inner_agg", "clipped_count_agg"}
  assert secure_state["zeroed_count_agg"] == () and secure_state["inner_agg"]["clipped_count_agg"] == ()
  mean_state = secure_state["inner_agg"]["inner_agg"]
  if weighted:
    assert set(inner_measurements) == {"mean_value", "mean_weight"}
    assert set(inner_measurements["mean_weight"]) == secure_keys
    assert float(inner_measurements["mean_weight"]["secure_upper_threshold"]) == 2**20 - 1
    assert set(mean_state) == {"value_sum_process", "weight_sum_process"}
    assert mean_state["weight_sum_process"] == ()
    value_sum_state = mean_state["value_sum_process"]
  else:
    assert set(inner_measurements) == {"mean_value", "mean_count"}
    value_sum_state, count_state = mean_state
    assert count_state == ()
  # The value sum's bound is its estimator's state: (query state, state of the secure record sum).
  assert value_sum_state[1] == ()
  # 2 * 50 * exp(-(1 - 0.95)) after one round in which every |w_i x_i| <= 50 except the zeroed client's 0.
  assert float(inner_measurements["mean_value"]["secure_upper_threshold"]) == pytest.approx(
      100.0 * math.exp(-0.05), rel=1e-6)


# ------------------------------------------------------------------------------------------ upload bits


def test_upload_bits():
  template = {"w": jnp.zeros((3, 4), jnp.float32), "b": jnp.zeros((5,), jnp.float32)}
  # Values, then four 1-bit secure sums: the client count, the two clipping indicators, the non-finite flag.
  assert secure_sum(1.0).upload_bits(template) == 17 * 32 + 4
  assert secure_sum(7, 0).upload_bits(jnp.zeros((10,), jnp.int32)) == 10 * 3 + 4
  estimator = no_noise_quantile_estimator(1.0, 0.5, 0.2, secure_estimation=True)
  assert estimator.upload_bits == 2 * 32 + 4
  assert secure_sum(estimator).upload_bits(template) == 17 * 32 + 4 + 68
  assert secure_modular_sum(7).upload_bits(jnp.zeros((4,), jnp.int32)) == 4 * 3
  assert secure_modular_sum(7, symmetric_range=True).upload_bits(jnp.zeros((4,), jnp.int32)) == 4 * 4


# ------------------------------------------------------------------------------------------ bad arguments


def test_bad_arguments():
  with pytest.raises(ValueError, match="lower_bound must be < upper_bound"):
    secure_sum(1, 5)
  with pytest.raises(ValueError, match="lower_bound must be <= upper_bound"):
    secure_sum(1.0, 2.0)
  with pytest.raises(ValueError, match="lower_bound must be < upper_bound"):
    secure_sum(3, 3)
  with pytest.raises(TypeError, match="upper_bound and lower_bound must both be ints"):
    secure_sum(1, 0.0)
  with pytest.raises(ValueError, match="upper_bound"):
    secure_sum(0)
  with pytest.raises(ValueError, match="upper_bound"):
    secure_sum(-4)
  with pytest.raises(ValueError, match="upper_bound"):
    secure_sum(-1.5)
  with pytest.raises(TypeError, match="upper_bound"):
    secure_sum(True)
  with pytest.raises(TypeError, match="lower_bound"):
    secure_sum(no_noise_quantile_estimator(1.0, 0.5, 0.2), -1.0)
  with pytest.raises(ValueError, match="modulus_bits"):
    secure_sum(1, 0, modulus_bits=0)
  with pytest.raises(ValueError, match="modulus_bits"):
    secure_sum(1, 0, modulus_bits=63)
  with pytest.raises(TypeError, match=r"share one dtype.*float16.*float32"):
    secure_sum(1.0).init({"a": jnp.zeros(2, jnp.float32), "b": jnp.zeros(2, jnp.float16)})
  with pytest.raises(TypeError, match="integer values"):
    secure_sum(5).init(jnp.zeros(2, jnp.float32))
  with pytest.raises(TypeError, match="floating values"):
    secure_sum(5.0).init(jnp.zeros(2, jnp.int32))
  with pytest.raises(ValueError, match="upper_bound must lie within"):
    secure_sum(300, 0).init(jnp.zeros(2, jnp.int8))
  with pytest.raises(ValueError, match="modulus must be >= 2"):
    secure_modular_sum(1)
  with pytest.raises(TypeError, match="symmetric_range"):
    secure_modular_sum(7, symmetric_range=1)
  with pytest.raises(TypeError, match="weighted"):
    secure_aggregator(weighted="yes")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_client_is_rejected_and_counted_never_a_finite_wrong_value(bad):
  """Regression: a NaN client used to be encoded into a finite wrong coordinate, with nothing reported."""
  aggregator = secure_sum(4.0)
  values = np.array([[1.0, -2.0], [bad, 0.5], [0.25, 3.0]], np.float32)
  out = run(aggregator, jnp.asarray(values))
  expected = values[[0, 2]].sum(0)  # the finite clients only
  # Two clients' rounding to levels of (U - L) / M, then the float32 result's own rounding.
  step = 8.0 / (2**32 - 1)
  np.testing.assert_allclose(np.asarray(out.result), expected,
                             atol=2 * step + 2 * np.finfo(np.float32).eps * np.abs(expected).max())
  assert int(out.measurements["secure_non_finite_count"]) == 1
  assert int(out.measurements["secure_upper_clipped_count"]) == 0


# ------------------------------------------------------------------------------------------ the x64 region


def test_float_mode_on_a_backend_without_float64_raises_one_clear_error(monkeypatch):
  values = jnp.array([[1.0, -2.0], [0.5, 3.0]], jnp.float32)
  monkeypatch.setattr(secure, "default_platform", lambda: "tpu")
  for build in (lambda: secure_sum(1.0), lambda: secure_sum(no_noise_quantile_estimator(1.0, 0.5, 0.2)),
                secure_aggregator):
    with pytest.raises(NotImplementedError, match=r"'tpu' backend does not support.*int bounds.*on CPU"):
      build().init(first_client(values))
  with pytest.raises(NotImplementedError, match="'tpu' backend"):  # inside a round too, not a compiler error
    jax.jit(secure_sum(2.0).next)((), values, jnp.ones(2), KEY)
  # INT mode and the modular sum compute with 64-bit integers only: they still run.
  integers = jnp.array([[1, 9], [2, -3]], jnp.int32)
  np.testing.assert_array_equal(jax.jit(secure_sum(7, 0).next)((), integers, jnp.ones(2), KEY).result, [3, 7])
  np.testing.assert_array_equal(jax.jit(secure_modular_sum(5).next)((), integers, jnp.ones(2), KEY).result, [3, 1])


def test_default_platform_follows_the_default_device():
  assert secure.default_platform() == jax.default_backend()
  with jax.default_device(jax.devices("cpu")[0]):
    assert secure.default_platform() == "cpu"


def test_x64_context_under_either_name(monkeypatch):
  assert jnp.asarray(1).dtype == np.int32  # x64 is off outside the region
  with secure._enable_x64():
    assert jnp.asarray(1).dtype == np.int64
  entered = []
  monkeypatch.setattr(jax, "enable_x64", None)
  monkeypatch.setattr(jax.experimental, "enable_x64", lambda: entered.append(True) or contextlib.nullcontext(),
                      raising=False)
  with secure._enable_x64():
    assert entered == [True]
  monkeypatch.setattr(jax.experimental, "enable_x64", None)
  with pytest.raises(NotImplementedError, match="x64"):
    secure._enable_x64()


def test_the_x64_region_takes_and_returns_32_bit_arrays_only():
  region = jax.make_jaxpr(lambda v: secure_sum(3.0).client((), v, jnp.float32(1.0), KEY))(jnp.ones((4,)))
  (eqn,) = [eqn for eqn in region.jaxpr.eqns if eqn.params.get("name") == secure.X64_REGION]
  inner = str(eqn.params["jaxpr"])
  assert "f64[" in inner and "i64[" in inner  # the quantization runs in float64 and int64 ...
  assert all(np.dtype(v.aval.dtype).itemsize <= 4 for v in [*eqn.invars, *eqn.outvars])  # ... inside only
  with pytest.raises(TypeError, match="returns arrays of at most 32 bits, got dtypes \\['int64'\\]"):
    secure.in_x64(lambda x: x.astype(jnp.int64), jnp.ones(2, jnp.int32), float64=False)
