"""Privacy accounting: wiring against dp_accounting, an independent analytic check, calibration, monotonicity,
sampling events and arguments."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import NeighboringRelation
from scipy import optimize, stats

from fedjax_lite.aggregators.differential_privacy import gaussian_adaptive
from fedjax_lite.privacy import (
    PrivacyLedger,
    calibrate_noise_multiplier,
    epsilon_of,
    halve_gaussian_noise,
    planned_epsilon,
    sampled_run_events,
    tree_run_events,
)


def analytic_gaussian_epsilon(noise_multiplier: float, delta: float) -> float:
  """Balle & Wang 2018 ("Improving the Gaussian Mechanism for Differential Privacy", Thm. 8): the exact epsilon of
  one Gaussian release with sensitivity 1 and std z solves
  delta = Phi(1/(2z) - eps z) - e^eps Phi(-1/(2z) - eps z)."""
  z = noise_multiplier

  def delta_of(eps):
    return stats.norm.cdf(0.5 / z - eps * z) - math.exp(eps) * stats.norm.cdf(-0.5 / z - eps * z) - delta

  return optimize.brentq(delta_of, 1e-9, 100.0)


@pytest.mark.parametrize("noise_multiplier", [0.5, 1.0, 2.0, 5.0])
def test_pld_matches_the_analytic_gaussian_mechanism(noise_multiplier):
  delta = 1e-5
  ours = epsilon_of(dp_accounting.GaussianDpEvent(noise_multiplier), delta, accountant="pld")
  assert ours == pytest.approx(analytic_gaussian_epsilon(noise_multiplier, delta), rel=0.01)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_ledger_equals_dp_accounting_on_the_same_event_built_by_hand(accountant):
  round_event = gaussian_adaptive(1.0, 50.0).dp_event()
  ledger = PrivacyLedger(sampled_run_events(round_event, sampling="poisson", sampling_probability=0.05), 1e-5,
                         accountant)
  if accountant == "rdp":  # RDP takes the composed (value noise, count noise) event as the aggregator emits it
    by_hand = dp_accounting.rdp.RdpAccountant()
    inner = round_event
  else:  # PLD needs one Gaussian under Poisson sampling: the split was made so the two merge back to z = 1
    by_hand = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    inner = dp_accounting.GaussianDpEvent(1.0)
  by_hand.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(0.05, inner), 30))
  assert ledger.epsilon_after(30) == pytest.approx(by_hand.get_epsilon(1e-5), rel=1e-9)
  assert ledger.epsilon_after(0) == 0.0


def test_fixed_size_sampling_uses_replace_one_with_halved_noise():
  """Replacing one client moves a clipped sum by up to 2C: dp_accounting takes noise relative to the sensitivity
  of the relation in force, so the event carries z/2 under REPLACE_ONE."""
  run = sampled_run_events(dp_accounting.GaussianDpEvent(2.0), sampling="without_replacement", num_clients=100,
                           clients_per_round=10)
  assert run.neighboring_relation == NeighboringRelation.REPLACE_ONE
  event = run.event_after(3)
  assert event == dp_accounting.SelfComposedDpEvent(
      dp_accounting.SampledWithoutReplacementDpEvent(100, 10, dp_accounting.GaussianDpEvent(1.0)), 3)
  with pytest.raises(ValueError, match="does not support"):
    PrivacyLedger(run, 1e-5, "pld")
  assert halve_gaussian_noise(dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(4.0)])) == \
      dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(2.0)])


def test_calibration_round_trips_and_is_nearly_smallest():
  kwargs = dict(rounds=200, delta=1e-5, sampling="poisson", sampling_probability=0.02)
  for target in (1.0, 4.0):
    z = calibrate_noise_multiplier(target, **kwargs)
    assert planned_epsilon(z, **kwargs) <= target
    assert planned_epsilon(z * 0.99, **kwargs) > target  # within 1% of the smallest that meets it


def test_calibration_for_adaptive_clipping():
  kwargs = dict(rounds=50, delta=1e-5, sampling="poisson", sampling_probability=0.1,
                round_event_fn=lambda z: gaussian_adaptive(z, 100.0).dp_event())
  z = calibrate_noise_multiplier(3.0, **kwargs)
  assert planned_epsilon(z, **kwargs) <= 3.0 < planned_epsilon(z * 0.99, **kwargs)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_monotonicity(accountant):
  base = dict(delta=1e-5, sampling="poisson", accountant=accountant)
  eps = lambda z, q, t: planned_epsilon(z, rounds=t, sampling_probability=q, **base)
  assert eps(1.0, 0.01, 10) < eps(1.0, 0.01, 100)   # more rounds cost more
  assert eps(1.0, 0.01, 50) < eps(1.0, 0.05, 50)    # a higher sampling rate costs more
  assert eps(2.0, 0.01, 50) < eps(1.0, 0.01, 50)    # more noise costs less


def test_adaptive_clipping_composes_value_and_count_noise():
  """The adaptive aggregator's round is two Gaussians whose combined multiplier is the requested z, so it costs
  the same as one Gaussian with multiplier z (RDP composition of Gaussians is exact)."""
  adaptive = planned_epsilon(1.0, rounds=20, delta=1e-5, sampling="all",
                             round_event_fn=lambda z: gaussian_adaptive(z, 100.0).dp_event())
  single = planned_epsilon(1.0, rounds=20, delta=1e-5, sampling="all")
  assert adaptive == pytest.approx(single, rel=1e-6)


def test_tree_events():
  run = tree_run_events(1.5, rounds_per_tree=4)
  assert run.neighboring_relation == NeighboringRelation.REPLACE_SPECIAL
  assert run.event_after(10) == dp_accounting.ComposedDpEvent(
      [dp_accounting.SingleEpochTreeAggregationDpEvent(1.5, 4)] * 2
      + [dp_accounting.SingleEpochTreeAggregationDpEvent(1.5, 2)])
  ledger = PrivacyLedger(run, 1e-5)
  values = [ledger.epsilon_after(t) for t in (1, 4, 8, 12)]
  assert values == sorted(values) and values[0] > 0


@pytest.mark.parametrize("build, match", [
    (lambda: planned_epsilon(1.0, rounds=10, delta=0.0, sampling_probability=0.1), "delta"),
    (lambda: planned_epsilon(1.0, rounds=10, delta=1.0, sampling_probability=0.1), "delta"),
    (lambda: planned_epsilon(0.0, rounds=10, delta=1e-5, sampling_probability=0.1), "noise_multiplier"),
    (lambda: planned_epsilon(-1.0, rounds=10, delta=1e-5, sampling_probability=0.1), "noise_multiplier"),
    (lambda: planned_epsilon(1.0, rounds=10, delta=1e-5, sampling_probability=0.0), "sampling_probability"),
    (lambda: planned_epsilon(1.0, rounds=10, delta=1e-5, sampling_probability=1.5), "sampling_probability"),
    (lambda: planned_epsilon(1.0, rounds=0, delta=1e-5, sampling_probability=0.1), "rounds"),
    (lambda: planned_epsilon(1.0, rounds=5, delta=1e-5, sampling="shuffle"), "sampling"),
    (lambda: planned_epsilon(1.0, rounds=5, delta=1e-5, sampling_probability=0.1, accountant="gdp"), "accountant"),
    (lambda: calibrate_noise_multiplier(0.0, rounds=5, delta=1e-5, sampling_probability=0.1), "target_epsilon"),
    (lambda: PrivacyLedger(sampled_run_events(dp_accounting.GaussianDpEvent(1.0), sampling="poisson",
                                              sampling_probability=0.5), 1e-5, epsilon_budget=0.01),
     "exceeded by the very first round"),
])
def test_bad_arguments(build, match):
  with pytest.raises((ValueError, TypeError), match=match):
    build()


def test_sampling_probability_one_is_the_unsampled_event():
  run = sampled_run_events(dp_accounting.GaussianDpEvent(1.0), sampling="poisson", sampling_probability=1.0)
  assert run.event_after(2) == dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(1.0), 2)
  assert np.isfinite(PrivacyLedger(run, 1e-5).epsilon_after(2))
