"""Quantile estimation: the reference's worked values, inclusive comparison, update rules, noise, arguments."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lite.aggregators.base import AggregationContext
from fedjax_lite.aggregators.estimation import constant_estimate
from fedjax_lite.aggregators.quantile_estimation import no_noise_quantile_estimator, private_quantile_estimator


def run_round(process, state, xs, rng=0):
  """One round with clients' scalars ``xs``: sum the records, then the server step."""
  params = process.broadcast(state)
  records = [process.client(params, jnp.float32(x), jax.random.key(i)) for i, x in enumerate(xs)]
  total = jax.tree.map(lambda *r: sum(r), *records) if records else jax.tree.map(
      jnp.zeros_like, process.client(params, jnp.float32(0.0), jax.random.key(0)))
  return process.server(state, total, jax.random.key(rng), AggregationContext((), max(len(xs), 1)))


def test_default_zeroing_worked_values():
  """TFF's default zeroing starts at C=10 reporting 2*10+1 = 21; with every norm <= 10 the fraction below is 1,
  so C <- 10 * exp(-ln(10) * (1 - 0.98)) = 9.5499 and the report is 20.0998 (google-parfait/tff#1376)."""
  process = no_noise_quantile_estimator(10.0, 0.98, math.log(10.0), multiplier=2.0, increment=1.0)
  state = process.init()
  assert float(process.report(state)) == 21.0
  state = run_round(process, state, [0.5, 3.0, 10.0])  # 10.0 counts as below: the comparison is inclusive
  assert float(state[0].current_estimate) == pytest.approx(10 * 10 ** -0.02, rel=1e-6)
  assert float(process.report(state)) == pytest.approx(20.0998, abs=1e-4)


def test_inclusive_comparison_at_the_estimate():
  process = no_noise_quantile_estimator(2.0, 0.5, 1.0)
  at = run_round(process, process.init(), [2.0])  # x == C: below (fraction 1): the estimate shrinks
  above = run_round(process, process.init(), [2.0000002])  # x > C: fraction 0: it grows
  assert float(at[0].current_estimate) == pytest.approx(2.0 * math.exp(-0.5), rel=1e-6)
  assert float(above[0].current_estimate) == pytest.approx(2.0 * math.exp(0.5), rel=1e-6)


def test_geometric_step_is_bounded_and_exact():
  process = no_noise_quantile_estimator(1.0, 0.8, 0.2)
  state = run_round(process, process.init(), [0.1, 5.0, 5.0, 5.0])  # fraction below 0.25
  assert float(state[0].current_estimate) == pytest.approx(math.exp(-0.2 * (0.25 - 0.8)), rel=1e-6)


def test_private_estimator_uses_fixed_expected_count_and_clamps():
  # sigma_b = 0: deterministic. 2 of 3 clients below, but m = 10: b = (2*0.5 - 0.5)/10 + 0.5 = 0.55.
  process = private_quantile_estimator(1.0, 0.5, 0.2, 0.0, 10.0)
  state = run_round(process, process.init(), [0.5, 0.9, 3.0])
  assert float(state[0].current_estimate) == pytest.approx(math.exp(-0.2 * (0.55 - 0.5)), rel=1e-6)
  # Arithmetic update and the clamp of b to [0, 1]: with m = 1 and 3 clients below, b = 1.5 + 0.5 -> 1.
  arithmetic = private_quantile_estimator(1.0, 0.5, 0.2, 0.0, 1.0, geometric_update=False)
  state = run_round(arithmetic, arithmetic.init(), [0.1, 0.2, 0.3])
  assert float(state[0].current_estimate) == pytest.approx(1.0 - 0.2 * (1.0 - 0.5), rel=1e-6)


def test_private_estimator_noise_has_the_stated_scale():
  """With one record below at m = 1000 and sigma_b = 100, b = (0.5 + N(0, 100^2))/1000 + 0.5 (the clamp to [0, 1]
  is 5 standard deviations away); with eta = 1, ln(C_1/C_0) = -(b - q) has standard deviation 100/1000 = 0.1.
  Over 400 keys the sample standard deviation is within 15% of 0.1 (for 399 degrees of freedom that holds with
  probability > 0.999)."""
  process = private_quantile_estimator(1.0, 0.5, 1.0, 100.0, 1000.0)
  state = process.init()
  params = process.broadcast(state)
  record = process.client(params, jnp.float32(0.0), jax.random.key(0))
  estimates = jax.vmap(lambda k: process.server(state, record, k, AggregationContext((), 1))[0].current_estimate)(
      jax.random.split(jax.random.key(1), 400))
  log_steps = np.log(np.asarray(estimates))
  assert np.std(log_steps, ddof=1) == pytest.approx(0.1, rel=0.15)
  assert abs(np.mean(log_steps) - (-(0.5005 - 0.5))) < 4 * 0.1 / np.sqrt(400)  # unbiased around -eta (b - q)


def test_round_without_clients_keeps_the_estimate():
  process = no_noise_quantile_estimator(3.0, 0.5, 0.5)
  state = run_round(process, process.init(), [])
  assert float(state[0].current_estimate) == 3.0


def test_constant_estimate():
  process = constant_estimate(4.5)
  assert process.init() == ()
  assert float(process.report(())) == 4.5
  assert run_round(process, (), [1.0, 9.0]) == ()


def test_private_dp_event():
  import dp_accounting

  assert private_quantile_estimator(1.0, 0.5, 0.2, 3.0, 60.0).dp_event() == dp_accounting.GaussianDpEvent(6.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(initial_estimate=0.0), "initial_estimate"),
    (dict(target_quantile=1.5), "target_quantile"),
    (dict(target_quantile=-0.1), "target_quantile"),
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(multiplier=0.0), "multiplier"),
    (dict(increment=-1.0), "increment"),
    (dict(initial_estimate=float("nan")), "initial_estimate"),
])
def test_no_noise_bad_arguments(kwargs, match):
  args = dict(initial_estimate=1.0, target_quantile=0.5, learning_rate=0.2)
  args.update(kwargs)
  with pytest.raises((ValueError, TypeError), match=match):
    no_noise_quantile_estimator(**args)


@pytest.mark.parametrize("kwargs, match", [
    (dict(below_estimate_stddev=-1.0), "below_estimate_stddev"),
    (dict(expected_num_records=0.0), "expected_num_records"),
    (dict(geometric_update="yes"), "geometric_update"),
])
def test_private_bad_arguments(kwargs, match):
  args = dict(initial_estimate=1.0, target_quantile=0.5, learning_rate=0.2, below_estimate_stddev=1.0,
              expected_num_records=10.0)
  args.update(kwargs)
  with pytest.raises((ValueError, TypeError), match=match):
    private_quantile_estimator(**args)
