"""Zeroing and clipping: reference semantics (strict counts, raw norms, weights kept), composition order, presets,
streaming, vmap over a hyperparameter, arguments."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lite.aggregators.mean import mean, unweighted_mean
from fedjax_lite.aggregators.presets import robust_aggregator
from fedjax_lite.aggregators.quantile_estimation import no_noise_quantile_estimator
from fedjax_lite.aggregators.robust import clipping, global_norm, zeroing
from fedjax_lite.aggregators.sum import sum_aggregator

from tests.aggregators.helpers import run_next, run_streaming

TEMPLATE = {"a": jnp.zeros(2), "b": jnp.zeros(())}


def values_of(rows):
  rows = np.asarray(rows, np.float32)
  return {"a": jnp.asarray(rows[:, :2]), "b": jnp.asarray(rows[:, 2])}


@pytest.mark.parametrize("order, expected", [(1.0, 3 + 4 + 12), (2.0, 13.0), (math.inf, 12.0)])
def test_global_norm_orders(order, expected):
  tree = {"a": jnp.array([3.0, -4.0]), "b": jnp.array(12.0)}
  assert float(global_norm(tree, order)) == pytest.approx(expected)


def test_zeroing_is_strict_keeps_weights_and_reports_the_round_norm():
  values = values_of([[1, 1, 1], [2, 0, 0], [3, 0, 0]])  # Linf norms 1, 2, 3
  agg = zeroing(2.0, mean())
  out = run_next(agg, agg.init(TEMPLATE), values, [1.0, 1.0, 2.0], jax.random.key(0))
  assert int(out.measurements["zeroed_count"]) == 1  # norm 2 == threshold is NOT zeroed
  assert float(out.measurements["zeroing_norm"]) == 2.0
  # The zeroed client keeps its weight 2: mean = (1*[1,1,1] + 1*[2,0,0] + 2*0) / 4.
  np.testing.assert_allclose(out.result["a"], [0.75, 0.25])
  np.testing.assert_allclose(out.result["b"], 0.25)
  assert set(out.measurements) == {"zeroing", "zeroing_norm", "zeroed_count"}
  assert set(out.state) == {"zeroing_norm", "inner_agg", "zeroed_count_agg"}


@pytest.mark.parametrize("order, kept_rows", [(1.0, [3]), (2.0, [2, 3]), (math.inf, [0, 2, 3])])
def test_zeroing_norm_orders(order, kept_rows):
  """Threshold 1.2. Norms of the 4 clients -- L1: 3, 2.5, 1.4, 0.3; L2: 1.73, 2.5, 0.99, 0.17; Linf: 1, 2.5,
  0.7, 0.1 -- so L1 keeps only the last client, L2 the last two, Linf all but the second."""
  rows = np.array([[1, 1, 1], [0, 0, 2.5], [0.7, 0.7, 0], [0.1, 0.1, 0.1]], np.float32)
  agg = zeroing(1.2, sum_aggregator(), norm_order=order)
  out = run_next(agg, agg.init(TEMPLATE), values_of(rows), [1, 1, 1, 1], jax.random.key(0))
  assert int(out.measurements["zeroed_count"]) == 4 - len(kept_rows)
  expected = rows[kept_rows].sum(axis=0)
  np.testing.assert_allclose(np.append(out.result["a"], out.result["b"]), expected, rtol=1e-6)


def test_clipping_exact_values_and_strict_count():
  values = values_of([[3, 4, 0], [0.3, 0.4, 0], [0, 0, 5]])  # L2 norms 5, 0.5, 5
  agg = clipping(5.0, sum_aggregator())
  out = run_next(agg, agg.init(TEMPLATE), values, [1, 1, 1], jax.random.key(0))
  assert int(out.measurements["clipped_count"]) == 0  # norms equal to the clip are not counted
  agg = clipping(1.0, sum_aggregator())
  out = run_next(agg, agg.init(TEMPLATE), values, [1, 1, 1], jax.random.key(0))
  assert int(out.measurements["clipped_count"]) == 2
  np.testing.assert_allclose(out.result["a"], [0.6 + 0.3, 0.8 + 0.4], rtol=1e-6)
  np.testing.assert_allclose(out.result["b"], 1.0, rtol=1e-6)


def test_estimator_sees_raw_norms():
  """Clients' RAW norms feed the estimator: with clip 1 and norms 5, 5, 5, the fraction below is 0 (not 1, which
  clipped norms of 1 <= 1 would give), so the adaptive clip grows by exp(0.2 * 0.8)."""
  values = values_of([[3, 4, 0], [0, 0, 5], [5, 0, 0]])
  agg = clipping(no_noise_quantile_estimator(1.0, 0.8, 0.2), mean())
  out = run_next(agg, agg.init(TEMPLATE), values, [1, 1, 1], jax.random.key(0))
  assert float(out.state["clipping_norm"][0].current_estimate) == pytest.approx(math.exp(0.2 * 0.8), rel=1e-6)
  assert float(out.measurements["clipping_norm"]) == 1.0  # the norm used this round


def test_composition_order_matters():
  """Zeroing (Linf 2.5) outside clipping (L2 1.0), the reference order, zeroes the client with a coordinate of 3
  before anything else; with the order swapped the client is first clipped to norm 1 (max entry 1) and survives
  zeroing."""
  values = values_of([[3, 0, 0], [0.5, 0, 0]])
  reference = zeroing(2.5, clipping(1.0, sum_aggregator()))
  swapped = clipping(1.0, zeroing(2.5, sum_aggregator()))
  out_reference = run_next(reference, reference.init(TEMPLATE), values, [1, 1], jax.random.key(0))
  out_swapped = run_next(swapped, swapped.init(TEMPLATE), values, [1, 1], jax.random.key(0))
  np.testing.assert_allclose(out_reference.result["a"], [0.5, 0.0])
  np.testing.assert_allclose(out_swapped.result["a"], [1.5, 0.0])
  assert int(out_reference.measurements["zeroed_count"]) == 1
  assert int(out_swapped.measurements["clipping"]["zeroed_count"]) == 0


def test_robust_aggregator_state_and_measurement_trees():
  agg = robust_aggregator()
  state = agg.init(TEMPLATE)
  assert set(state) == {"zeroing_norm", "inner_agg", "zeroed_count_agg"}
  assert set(state["inner_agg"]) == {"clipping_norm", "inner_agg", "clipped_count_agg"}
  assert set(state["inner_agg"]["inner_agg"]) == {"value_sum_process", "weight_sum_process"}
  out = run_next(agg, state, values_of([[0.1, 0.2, 0.3]] * 4), [1, 2, 3, 4], jax.random.key(0))
  measurements = out.measurements
  assert set(measurements) == {"zeroing", "zeroing_norm", "zeroed_count"}
  assert set(measurements["zeroing"]) == {"clipping", "clipping_norm", "clipped_count"}
  assert set(measurements["zeroing"]["clipping"]) == {"mean_value", "mean_weight"}
  assert float(measurements["zeroing_norm"]) == 21.0
  assert float(measurements["zeroing"]["clipping_norm"]) == 1.0
  unweighted = robust_aggregator(weighted=False, zeroing=False)
  assert set(run_next(unweighted, unweighted.init(TEMPLATE), values_of([[1, 2, 3]]), [5.0],
                      jax.random.key(0)).measurements["clipping"]) == {"mean_value", "mean_count"}


STREAMABLE = {
    "sum": sum_aggregator,
    "mean": mean,
    "mean_no_nan": lambda: mean(no_nan_division=True),
    "unweighted_mean": unweighted_mean,
    "zeroing_l2": lambda: zeroing(1.5, mean(), norm_order=2.0),
    "clipping_adaptive": lambda: clipping(no_noise_quantile_estimator(1.0, 0.5, 0.2), mean()),
    "robust_aggregator": robust_aggregator,
}


@pytest.mark.parametrize("name", sorted(STREAMABLE))
def test_streaming_equals_next(name):
  agg = STREAMABLE[name]()
  rng = np.random.default_rng(0)
  values = values_of(rng.normal(size=(5, 3)) * 2)
  weights = np.array([1.0, 2.0, 0.5, 3.0, 1.0], np.float32)
  mask = np.array([True, True, False, True, True])
  state = agg.init(TEMPLATE)
  for round_num in range(2):
    key = jax.random.key(round_num)
    expected = run_next(agg, state, values, weights, key, mask)
    streamed = run_streaming(agg, state, values, weights, key, mask)
    chex.assert_trees_all_close(streamed.result, expected.result, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(streamed.state, expected.state, rtol=1e-6)
    chex.assert_trees_all_close(streamed.measurements, expected.measurements, rtol=1e-6)
    state = expected.state


def test_vmap_over_the_clipping_norm():
  """Four clip norms in one program: the aggregator is built inside ``jax.vmap`` with a traced norm."""
  values = values_of([[3, 4, 0], [0, 0, 0.5]])

  def clipped_sum(norm):
    agg = clipping(norm, sum_aggregator())
    return agg.next(agg.init(TEMPLATE), values, jnp.ones(2), jax.random.key(0)).result["a"]

  norms = jnp.array([0.1, 1.0, 5.0, 10.0])
  batched = jax.jit(jax.vmap(clipped_sum))(norms)
  for i, norm in enumerate(np.asarray(norms)):
    np.testing.assert_allclose(batched[i], clipped_sum(float(norm)), rtol=1e-6)
  np.testing.assert_allclose(batched[0], [0.06, 0.08], rtol=1e-5)
  np.testing.assert_allclose(batched[3], [3.0, 4.0], rtol=1e-6)


@pytest.mark.parametrize("build, match", [
    (lambda: zeroing(0.0, mean()), "zeroing_norm"),
    (lambda: zeroing(-1.0, mean()), "zeroing_norm"),
    (lambda: zeroing("big", mean()), "zeroing_norm"),
    (lambda: zeroing(1.0, mean(), norm_order=3), "norm_order"),
    (lambda: clipping(float("inf"), mean()), "clipping_norm"),
    (lambda: clipping(1.0, "mean"), "inner"),
    (lambda: robust_aggregator(weighted="yes"), "weighted"),
])
def test_bad_arguments(build, match):
  with pytest.raises((ValueError, TypeError), match=match):
    build()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("kind", ["zeroing", "clipping"])
def test_non_finite_client_is_zeroed_and_counted(kind, bad):
  """Regression: ``NaN > threshold`` is False, so a NaN client used to pass zeroing and clipping untouched."""
  values = np.array([[0.5, -0.5], [bad, 0.1], [0.2, 0.3]], np.float32)
  wrapper = zeroing(100.0) if kind == "zeroing" else clipping(100.0)
  out = jax.jit(wrapper.next)(wrapper.init(jnp.zeros(2, jnp.float32)), jnp.asarray(values), jnp.ones(3),
                              jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(out.result), values[[0, 2]].sum(0))
  assert int(out.measurements["zeroed_count" if kind == "zeroing" else "clipped_count"]) == 1
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(out.state))
