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
from fedjax_lite.aggregators import gaussian_fixed, insert_canaries, sum_aggregator

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


def test_gdp_epsilon_matches_dp_accounting():
  """mu-GDP is the Gaussian mechanism with noise multiplier 1/mu: dp_accounting's PLD epsilon (an upper bound
  within its 1e-4 discretization) is within 0.5% above the closed form."""
  for mu in (0.5, 1.0, 2.0):
    reference = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4).compose(
        dp_accounting.GaussianDpEvent(1.0 / mu)).get_epsilon(1e-5)
    assert privacy.gdp_epsilon(mu, 1e-5) <= reference <= privacy.gdp_epsilon(mu, 1e-5) * 1.005


@pytest.mark.parametrize("noise_multiplier", [2.0, 8.0])
def test_empirical_epsilon_never_exceeds_the_gaussian_accountant(noise_multiplier):
  """DP sums over 4 rounds, every canary in every round (sampling 'all'): the released total of the rounds is a
  Gaussian mechanism with mu = sqrt(4) / z on each canary's direction, the accountant's bound. Both lower bounds
  (95% confidence) stay below the accountant's epsilon, and the estimate finds mu within 5 of its standard errors
  (about 0.07 with 400 + 400 canaries in d = 5,000, where the canaries' cross-talk lowers mu by about 2%)."""
  rounds, clip, delta, dimension = 4, 1.0, 1e-5, 5000
  canaries = privacy.canary_directions(jax.random.key(1), {"w": jnp.zeros(dimension)}, 800, norm=clip)
  inserted = jax.tree.map(lambda c: c[:400], canaries)
  held_out = jax.tree.map(lambda c: c[400:], canaries)
  aggregator = insert_canaries(gaussian_fixed(noise_multiplier, 1.0, clip), inserted)
  values = {"w": jax.random.normal(jax.random.key(2), (5, dimension)) * 0.05}
  state, total = aggregator.init({"w": jnp.zeros(dimension)}), jnp.zeros(dimension)
  for round_num in range(rounds):
    out = run_next(aggregator, state, values, [1.0] * 5, jax.random.fold_in(jax.random.key(3), round_num))
    state, total = out.state, total + out.result["w"]
  result = privacy.audit({"w": total}, inserted, held_out, delta=delta, significance=0.05)
  bound = privacy.planned_epsilon(noise_multiplier, rounds=rounds, delta=delta, sampling="all")
  assert result.epsilon_lower_bound <= bound
  if result.epsilon_lower_bound_clopper_pearson is not None:
    assert result.epsilon_lower_bound_clopper_pearson <= bound
  assert abs(result.mu_estimate - math.sqrt(rounds) / noise_multiplier) <= 0.35
  assert result.mu_lower_bound <= result.mu_estimate


def test_bad_arguments():
  canaries = {"w": jnp.ones((3, 4))}
  with pytest.raises(ValueError, match="coordinates"):
    privacy.audit({"w": jnp.ones(5)}, canaries, canaries, delta=1e-5)
  with pytest.raises(ValueError, match="significance"):
    privacy.audit({"w": jnp.ones(4)}, canaries, canaries, delta=1e-5, significance=0.7)
  with pytest.raises(ValueError, match="non-zero"):
    privacy.audit({"w": jnp.zeros(4)}, canaries, canaries, delta=1e-5)
