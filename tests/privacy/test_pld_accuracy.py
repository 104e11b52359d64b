"""PLD accounting at long horizons: the discretization follows the requested accuracy; calibration with PLD; users'
own accountants wherever an accountant is named."""

from __future__ import annotations

import dp_accounting
import pytest
from dp_accounting import NeighboringRelation

from fedjax_lite.privacy import (
    DEFAULT_PLD_RELATIVE_ACCURACY,
    PrivacyLedger,
    calibrate_noise_multiplier,
    check_accountant,
    describe_accountant,
    epsilon_of,
    planned_epsilon,
    sampled_run_events,
)
from fedjax_lite.privacy import accounting

# 3,000 rounds of a Poisson-sampled (q = 0.005) Gaussian with z = 0.7, delta = 1e-5.
LONG_RUN = dp_accounting.SelfComposedDpEvent(
    dp_accounting.PoissonSampledDpEvent(0.005, dp_accounting.GaussianDpEvent(0.7)), 3000)
DELTA = 1e-5


def _pld(interval):
  accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=interval)
  accountant.compose(LONG_RUN)
  return accountant.get_epsilon(DELTA)


def test_long_horizon_pld_epsilon_is_within_the_documented_bound_of_an_accurate_one():
  accurate = _pld(1e-4)  # 10x finer than what the default accuracy picks here (its own error is ~1e-6 relative)
  ours = epsilon_of(LONG_RUN, DELTA, accountant="pld")
  _, interval = accounting._adaptive_pld_epsilon(LONG_RUN, 1, DELTA, NeighboringRelation.ADD_OR_REMOVE_ONE,
                                                 DEFAULT_PLD_RELATIVE_ACCURACY)
  assert interval == pytest.approx(1e-3)
  # An upper bound (pessimistic discretization), within the documented relative accuracy.
  assert accurate * (1 - 1e-9) <= ours <= accurate * (1 + DEFAULT_PLD_RELATIVE_ACCURACY)
  # A fixed coarse discretization over-reports by more than the bound: the choice matters at long horizons.
  coarse = epsilon_of(LONG_RUN, DELTA, accountant={"name": "pld", "value_discretization_interval": 1e-2})
  assert coarse > accurate * (1 + DEFAULT_PLD_RELATIVE_ACCURACY)


def test_a_tighter_accuracy_refines_further():
  short = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.0)), 20)
  _, coarse = accounting._adaptive_pld_epsilon(short, 1, DELTA, NeighboringRelation.ADD_OR_REMOVE_ONE, 0.05)
  _, fine = accounting._adaptive_pld_epsilon(short, 1, DELTA, NeighboringRelation.ADD_OR_REMOVE_ONE, 1e-5)
  assert fine < coarse


def test_pld_calibration_round_trips_and_is_bracketed_by_rdp():
  kwargs = dict(rounds=200, delta=1e-5, sampling="poisson", sampling_probability=0.02)
  tolerance = 1e-3
  z = calibrate_noise_multiplier(2.0, accountant="pld", tolerance=tolerance, **kwargs)
  assert planned_epsilon(z, accountant="pld", **kwargs) <= 2.0
  assert planned_epsilon(z / (1 + 2 * tolerance), accountant="pld", **kwargs) > 2.0  # nearly the smallest
  assert z <= calibrate_noise_multiplier(2.0, accountant="rdp", **kwargs)  # PLD is tighter than RDP


def test_users_own_accountants_and_parameters():
  orders = [1.5, 2.0, 4.0, 8.0, 16.0, 32.0]
  event = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0)), 10)
  by_name = epsilon_of(event, DELTA, accountant={"name": "rdp", "orders": orders})
  instance = dp_accounting.rdp.RdpAccountant(orders=orders)
  assert epsilon_of(event, DELTA, accountant=instance) == by_name
  assert epsilon_of(event, DELTA, accountant=instance) == by_name  # the instance is copied, never composed into
  assert epsilon_of(event, DELTA, accountant=lambda: dp_accounting.rdp.RdpAccountant(orders=orders)) == by_name
  assert by_name >= epsilon_of(event, DELTA, accountant="rdp")  # fewer orders: a looser bound
  fixed = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
  fixed.compose(event)
  assert epsilon_of(event, DELTA, accountant={"name": "pld", "value_discretization_interval": 1e-3}) == \
      fixed.get_epsilon(DELTA)
  run = sampled_run_events(dp_accounting.GaussianDpEvent(1.0), sampling="poisson", sampling_probability=0.1)
  ledger = PrivacyLedger(run, DELTA, instance)
  assert ledger.epsilon_after(10) == by_name
  z = calibrate_noise_multiplier(3.0, rounds=10, delta=DELTA, sampling="poisson", sampling_probability=0.1,
                                 accountant=instance)
  assert planned_epsilon(z, rounds=10, delta=DELTA, sampling="poisson", sampling_probability=0.1,
                         accountant=instance) <= 3.0
  assert describe_accountant("pld") == f"pld(relative_accuracy={DEFAULT_PLD_RELATIVE_ACCURACY:g})"
  assert describe_accountant(instance) == "custom RdpAccountant"


@pytest.mark.parametrize("accountant, error, match", [
    ("gdp", ValueError, "accountant"),
    ({"name": "pld", "value_discretization_interval": 1e-3, "relative_accuracy": 0.1}, TypeError, "OR"),
    ({"name": "pld", "relative_accuracy": 1.5}, ValueError, "relative_accuracy"),
    ({"name": "rdp", "ordres": [2.0]}, TypeError, "RdpAccountant parameters"),
    ({"orders": [2.0]}, ValueError, "accountant\\['name'\\]"),
    (3, TypeError, "accountant must be"),
])
def test_bad_accountants(accountant, error, match):
  with pytest.raises(error, match=match):
    check_accountant(accountant)


def test_an_accountant_with_another_adjacency_is_refused():
  run = sampled_run_events(dp_accounting.GaussianDpEvent(1.0), sampling="poisson", sampling_probability=0.1)
  with pytest.raises(ValueError, match="REPLACE_ONE adjacency"):
    PrivacyLedger(run, DELTA, dp_accounting.rdp.RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE))


def test_ledger_rdp_shortcut_equals_dp_accounting_round_by_round():
  from fedjax_lite.aggregators.differential_privacy import gaussian_adaptive
  from fedjax_lite.privacy import run_epsilon

  for round_event in (dp_accounting.GaussianDpEvent(1.0), gaussian_adaptive(1.0, 20.0).dp_event()):
    run = sampled_run_events(round_event, sampling="poisson", sampling_probability=0.05)
    ledger = PrivacyLedger(run, DELTA)
    assert ledger._rdp_of_one_round is not None  # the shortcut is in use...
    for rounds in (1, 2, 7, 100):  # ...and gives dp_accounting's own answer
      assert ledger.epsilon_after(rounds) == pytest.approx(run_epsilon(run, rounds, DELTA), rel=1e-12)
