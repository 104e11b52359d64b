"""Privacy auditing with canaries (Andrew et al. 2024): the empirical lower bounds never exceed the accountant's
epsilon for the Gaussian mechanism; the estimate finds the mechanism's mu; canary insertion against NumPy."""

from __future__ import annotations

import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lite import privacy
from fedjax_lite.aggregators import dp_matrix_factorization, gaussian_fixed, insert_canaries, sum_aggregator

from tests.aggregators.helpers import run_next


def test_canary_directions_have_the_norm_and_shapes():
  canaries = privacy.canary_directions(jax.random.key(0), {"a": jnp.zeros((3, 4)), "b": jnp.zeros(5)}, 7, norm=0.5)
  assert canaries["a"].shape == (7, 3, 4) and canaries["b"].shape == (7, 5)
  norms = np.sqrt(np.sum(np.asarray(canaries["a"]).reshape(7, -1) ** 2, 1) + np.sum(np.asarray(canaries["b"]) ** 2, 1))
  np.testing.assert_allclose(norms, 0.5, rtol=1e-6)


def test_inserted_canaries_are_clipped_clients_of_the_round():
  """Without noise, the round's sum is NumPy's sum of the clipped real clients and clipped canaries."""
  values = {"w": jnp.array([[3.0, 4.0], [0.1, 0.2]])}
  canaries = {"w": jnp.array([[0.0, 2.0], [0.3, 0.0], [1.0, 1.0]])}
  aggregator = insert_canaries(gaussian_fixed(0.0, 1.0, 1.0), canaries)
  out = run_next(aggregator, aggregator.init({"w": jnp.zeros(2)}), values, [1.0, 1.0], jax.random.key(0))
  rows = np.concatenate([np.asarray(values["w"]), np.asarray(canaries["w"])])
  clipped = rows * np.minimum(1.0, 1.0 / np.linalg.norm(rows, axis=1, keepdims=True))
  np.testing.assert_allclose(out.result["w"], clipped.sum(0), rtol=1e-6)
  with pytest.raises(ValueError, match="participation_probability"):
    insert_canaries(sum_aggregator(), canaries, participation_probability=0.0)


def test_grouped_canaries_take_part_once_every_num_groups_rounds():
  """Canary i is in group i mod 3 and round t adds group t mod 3 (NumPy over 7 rounds, no noise); the inner state
  runs on beside the round count."""
  values = {"w": jnp.array([[0.5, 0.0]])}
  canaries = {"w": jnp.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.2, 0.1]])}
  aggregator = insert_canaries(gaussian_fixed(0.0, 1.0, 10.0), canaries, num_groups=3)
  state = aggregator.init({"w": jnp.zeros(2)})
  assert int(state["round"]) == 0
  for round_num in range(7):
    out = run_next(aggregator, state, values, [1.0], jax.random.key(round_num))
    joining = [i for i in range(4) if i % 3 == round_num % 3]
    expected = 0.5 * np.eye(2)[0] + np.asarray(canaries["w"])[joining].sum(0)
    np.testing.assert_allclose(out.result["w"], expected, rtol=1e-6)
    state = out.state
  assert int(state["round"]) == 7


def test_gdp_epsilon_matches_dp_accounting():
  """mu-GDP is the Gaussian mechanism with noise multiplier 1/mu: dp_accounting's PLD epsilon (an upper bound
  within its 1e-4 discretization) is within 0.5% above the closed form."""
  for mu in (0.5, 1.0, 2.0):
    reference = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4).compose(
        dp_accounting.GaussianDpEvent(1.0 / mu)).get_epsilon(1e-5)
    assert privacy.gdp_epsilon(mu, 1e-5) <= reference <= privacy.gdp_epsilon(mu, 1e-5) * 1.005


CANARY_DIMENSION = 5000


def _canaries(clip):
  """800 canary directions in d = 5,000 (norm ``clip``): 400 to insert, 400 held out."""
  canaries = privacy.canary_directions(jax.random.key(1), {"w": jnp.zeros(CANARY_DIMENSION)}, 800, norm=clip)
  return jax.tree.map(lambda c: c[:400], canaries), jax.tree.map(lambda c: c[400:], canaries)


def _released_total(aggregator, rounds):
  """The sum of ``aggregator``'s results over ``rounds`` rounds of 5 fixed small clients."""
  values = {"w": jax.random.normal(jax.random.key(2), (5, CANARY_DIMENSION)) * 0.05}
  state, total = aggregator.init({"w": jnp.zeros(CANARY_DIMENSION)}), jnp.zeros(CANARY_DIMENSION)
  for round_num in range(rounds):
    out = run_next(aggregator, state, values, [1.0] * 5, jax.random.fold_in(jax.random.key(3), round_num))
    state, total = out.state, total + out.result["w"]
  return {"w": total}


@pytest.mark.parametrize("noise_multiplier", [2.0, 8.0])
def test_empirical_epsilon_never_exceeds_the_gaussian_accountant(noise_multiplier):
  """DP sums over 4 rounds, every canary in every round (sampling 'all'): the released total of the rounds is a
  Gaussian mechanism with mu = sqrt(4) / z on each canary's direction, the accountant's bound. Both lower bounds
  (95% confidence) stay below the accountant's epsilon, and the estimate finds mu within 5 of its standard errors
  (about 0.07 with 400 + 400 canaries in d = 5,000, where the canaries' cross-talk lowers mu by about 2%)."""
  rounds, clip, delta = 4, 1.0, 1e-5
  inserted, held_out = _canaries(clip)
  total = _released_total(insert_canaries(gaussian_fixed(noise_multiplier, 1.0, clip), inserted), rounds)
  result = privacy.audit(total, inserted, held_out, delta=delta, significance=0.05)
  bound = privacy.planned_epsilon(noise_multiplier, rounds=rounds, delta=delta, sampling="all")
  assert result.epsilon_lower_bound <= bound
  if result.epsilon_lower_bound_clopper_pearson is not None:
    assert result.epsilon_lower_bound_clopper_pearson <= bound
  assert abs(result.mu_estimate - math.sqrt(rounds) / noise_multiplier) <= 0.35
  assert result.mu_lower_bound <= result.mu_estimate


BLT_PARAMETERS = ([0.9842298634927619, 0.7270931425682697], [0.1706081571013166, 0.3102560932438474])


@pytest.mark.parametrize("strategy, options", [
    ("blt", {"blt_parameters": BLT_PARAMETERS}),
    ("banded", {"coefficients": [0.75, 0.5], "min_separation": 2}),
    ("toeplitz", {}),
])
def test_empirical_epsilon_never_exceeds_the_matrix_factorization_accountant(strategy, options):
  """Matrix-factorization DP-FTRL, 8 rounds, the canaries in 2 cyclic groups (4 participations each, 2 rounds
  apart: the pattern the ledger accounts). The released total of the rounds carries, on a canary's direction,
  ``k C`` of signal and noise of standard deviation ``z C ||C||_col ||1^T C^{-1}||`` (the prefix sum of the
  correlated noise), so mu = k / (z ||C||_col ||1^T C^{-1}||) <= the accountant's. Both lower bounds (95%) stay
  below the accountant's epsilon; the estimate finds mu within 0.35 (5 standard errors, as for the Gaussian)."""
  pytest.importorskip("jax_privacy", reason="the [dp_mf] extra (jax_privacy, Python >= 3.11)")
  rounds, groups, clip, delta, z = 8, 2, 1.0, 1e-5, 3.0
  mechanism = privacy.matrix_factorization(strategy, num_rounds=rounds, **options)
  inserted, held_out = _canaries(clip)
  aggregator = insert_canaries(dp_matrix_factorization(z, 1.0, mechanism, clip=clip), inserted, num_groups=groups)
  result = privacy.audit(_released_total(aggregator, rounds), inserted, held_out, delta=delta, significance=0.05)
  bound = privacy.run_epsilon(privacy.matrix_factorization_run_events(mechanism, z, min_separation=groups), rounds,
                              delta)
  assert result.epsilon_lower_bound <= bound
  if result.epsilon_lower_bound_clopper_pearson is not None:
    assert result.epsilon_lower_bound_clopper_pearson <= bound
  prefix_noise = np.linalg.norm(np.ones(rounds) @ np.linalg.inv(mechanism.strategy_matrix(rounds)))
  mu = (rounds // groups) / (z * mechanism.column_norm * prefix_noise)
  assert abs(result.mu_estimate - mu) <= 0.35, (result.mu_estimate, mu)
  assert privacy.gdp_epsilon(mu, delta) <= bound


def test_bad_arguments():
  canaries = {"w": jnp.ones((3, 4))}
  with pytest.raises(ValueError, match="coordinates"):
    privacy.audit({"w": jnp.ones(5)}, canaries, canaries, delta=1e-5)
  with pytest.raises(ValueError, match="significance"):
    privacy.audit({"w": jnp.ones(4)}, canaries, canaries, delta=1e-5, significance=0.7)
  with pytest.raises(ValueError, match="non-zero"):
    privacy.audit({"w": jnp.zeros(4)}, canaries, canaries, delta=1e-5)
