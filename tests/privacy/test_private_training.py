"""Private training end to end: Poisson cohorts without recompilation, padding that changes nothing, the ledger in
the training loop (per-round epsilon, budget stop), DP-FTRL's tree noise, and the samplers."""

from __future__ import annotations

import chex
import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import monitoring

from fedjax_lite.aggregators.differential_privacy import gaussian_adaptive, gaussian_fixed
from fedjax_lite.aggregators.tree_aggregation import residual_noise, tree_aggregation
from fedjax_lite.algorithms.dp_fed_avg import dp_fed_avg, dp_ftrl
from fedjax_lite.algorithms.fed_avg import fed_avg
from fedjax_lite.core.packing import ClientSpec, pack_clients
from fedjax_lite.core.sampling import (
    PoissonSampler,
    ShuffledCyclicSampler,
    poisson_cohort_capacity,
    poisson_sample_clients,
)
from fedjax_lite.training.loop import run_training
from fedjax_lite.privacy import PrivacyLedger, sampled_run_events

from tests.conftest import make_population

_COMPILES: list[str] = []
monitoring.register_event_duration_secs_listener(
    lambda name, duration, **kwargs: _COMPILES.append(name) if name == "/jax/core/compile/backend_compile_duration"
    else None)


def test_poisson_sampling_is_reproducible_and_has_the_right_rate():
  a = poisson_sample_clients(1000, 0.05, seed=1, round_num=3)
  np.testing.assert_array_equal(a, poisson_sample_clients(1000, 0.05, seed=1, round_num=3))
  sizes = [len(poisson_sample_clients(1000, 0.05, seed=1, round_num=r)) for r in range(200)]
  # Binomial(1000, 0.05): mean 50, sd 6.9; the mean of 200 rounds is within 4 standard errors (1.95).
  assert abs(np.mean(sizes) - 50) < 4 * 6.9 / np.sqrt(200)
  assert len(set(sizes)) > 5  # the cohort size varies
  assert max(sizes) <= poisson_cohort_capacity(1000, 0.05)


def test_poisson_cohorts_compile_once_and_padding_slots_change_nothing(tiny_model, tiny_params):
  data = make_population(num_clients=30, seed=5)
  process = fed_avg(tiny_model, client_learning_rate=0.1, weighting="uniform",
                    aggregator=gaussian_adaptive(0.5, 6.0))
  sampler = PoissonSampler(30, 0.2, seed=2)
  run_training(process, data, tiny_params, client_spec=ClientSpec(batch_size=4), num_rounds=1, sampler=sampler,
               progress=False)  # warm-up of everything but the round program
  before = len(_COMPILES)
  result = run_training(process, data, tiny_params, client_spec=ClientSpec(batch_size=4), num_rounds=8,
                        sampler=sampler, progress=False)
  sizes = {int(r["client_work/train/num_examples"]) for r in result.history}
  assert len(sizes) > 2
  assert len(_COMPILES) - before <= 1

  # The same cohort padded to more client slots gives the same round, bit for bit.
  cohort = sampler(4)
  state = process.init(tiny_params)
  step = jax.jit(process.next)
  out_small = step(state, pack_clients(data, cohort, batch_size=4, num_steps=8), jax.random.key(9))
  out_padded = step(state, pack_clients(data, cohort, batch_size=4, num_steps=8, cohort_size=len(cohort) + 5),
                    jax.random.key(9))
  chex.assert_trees_all_close(out_small[0].params, out_padded[0].params, atol=1e-7)
  clip_small = out_small[1]["aggregator"]["dp_query_metrics"]["clip"]
  assert float(clip_small) == float(out_padded[1]["aggregator"]["dp_query_metrics"]["clip"])


def test_dp_mean_divides_by_the_expected_count_not_the_actual_one():
  agg = gaussian_fixed(0.0, 10.0, 100.0)
  values = {"w": jnp.ones((4, 2))}
  out = agg.next(agg.init({"w": jnp.zeros(2)}), values, jnp.ones(4), jax.random.key(0),
                 jnp.array([True, True, True, False]))
  np.testing.assert_allclose(out.result["w"], [0.3, 0.3])


def test_ledger_in_the_loop_reports_epsilon_and_stops_at_the_budget(tiny_model, tiny_params):
  data = make_population(num_clients=20)
  recipe = dp_fed_avg(tiny_model, noise_multiplier=0.8, num_clients=20, expected_clients_per_round=4.0,
                      delta=1e-3, client_learning_rate=0.1, clip=1.0)
  budget = recipe.ledger.epsilon_after(5) + 1e-9  # exactly 5 rounds fit
  ledger = PrivacyLedger(recipe.ledger.run, 1e-3, epsilon_budget=budget)
  result = run_training(recipe.process, data, tiny_params, client_spec=ClientSpec(batch_size=4), num_rounds=20,
                        sampler=recipe.sampler, privacy=ledger, progress=False,
                        evaluate=lambda params: {"accuracy": 0.0}, evaluate_every=100)
  assert len(result.history) == 5
  assert "privacy budget" in result.stopped_early and "stopped after 5 rounds" in result.stopped_early
  epsilons = [r["privacy/epsilon"] for r in result.history]
  assert epsilons == sorted(epsilons) and epsilons[-1] <= budget
  # The ledger is the same composition dp_accounting gives for Poisson-sampled Gaussian rounds.
  by_hand = dp_accounting.rdp.RdpAccountant()
  by_hand.compose(dp_accounting.PoissonSampledDpEvent(0.2, dp_accounting.GaussianDpEvent(0.8)), 5)
  assert epsilons[-1] == pytest.approx(by_hand.get_epsilon(1e-3), rel=1e-9)
  assert "evaluation/accuracy" in result.history[-1]  # the last round before the stop is evaluated


def test_dp_fed_avg_recipe_is_unweighted_with_poisson_sampling(tiny_model):
  recipe = dp_fed_avg(tiny_model, noise_multiplier=1.0, num_clients=200, expected_clients_per_round=40.0,
                      delta=1e-5, client_learning_rate=0.1)
  assert isinstance(recipe.sampler, PoissonSampler) and recipe.sampler.sampling_probability == 0.2
  assert recipe.ledger.epsilon_after(10) > recipe.ledger.epsilon_after(1) > 0
  with pytest.raises((ValueError, TypeError), match="expected_clients_per_round"):
    dp_fed_avg(tiny_model, noise_multiplier=1.0, num_clients=10, expected_clients_per_round=20.0, delta=1e-5,
               client_learning_rate=0.1)
  with pytest.raises((ValueError, TypeError), match="delta"):
    dp_fed_avg(tiny_model, noise_multiplier=1.0, num_clients=10, expected_clients_per_round=5.0, delta=2.0,
               client_learning_rate=0.1, clip=1.0)


def test_tree_noise_on_prefix_sums_has_logarithmic_variance():
  """Summing the residuals of rounds 1..n gives the noisy prefix sum: its noise has variance popcount(n) (z C)^2
  (each of the nodes covering [0, n) once), not n (z C)^2. Checked on 20,000 coordinates (sample variance within
  5% for every n <= 16; 4 standard errors of a chi-square with 20,000 degrees of freedom is 4%)."""
  template = jnp.zeros(20000)
  key = jax.random.key(3)
  noise = jax.jit(lambda count: residual_noise(key, count, 5, template, 1.0))
  prefix = np.zeros(20000)
  for n in range(1, 17):
    prefix += np.asarray(noise(jnp.int32(n)))
    assert np.var(prefix) == pytest.approx(bin(n).count("1"), rel=0.05), n


def test_tree_aggregation_restarts_and_clips():
  agg = tree_aggregation(0.0, 2.0, 1.0, rounds_per_tree=3)
  state = agg.init({"w": jnp.zeros(2)})
  values = {"w": jnp.array([[3.0, 4.0], [0.1, 0.0]])}
  rounds = []
  for round_num in range(4):
    out = jax.jit(agg.next)(state, values, jnp.ones(2), jax.random.key(round_num))
    state = out.state
    rounds.append(int(state["round_in_tree"]))
    np.testing.assert_allclose(out.result["w"], [(0.6 + 0.1) / 2, 0.8 / 2], rtol=1e-6)  # no noise: the mean
  assert rounds == [1, 2, 0, 1]


def test_dp_ftrl_recipe_trains_and_accounts(tiny_model, tiny_params):
  data = make_population(num_clients=12)
  recipe = dp_ftrl(tiny_model, noise_multiplier=1.0, num_clients=12, clients_per_round=4, clip=1.0, delta=1e-3,
                   client_learning_rate=0.1)
  assert recipe.sampler.rounds_per_epoch == 3
  seen = np.concatenate([recipe.sampler(r) for r in range(3)])
  assert sorted(seen.tolist()) == list(range(12))  # each client exactly once per epoch
  result = run_training(recipe.process, data, tiny_params, client_spec=ClientSpec(batch_size=4), num_rounds=4,
                        sampler=recipe.sampler, privacy=recipe.ledger, progress=False)
  assert len(result.history) == 4
  chex.assert_tree_all_finite(result.state.params)
  assert result.history[-1]["privacy/epsilon"] > result.history[0]["privacy/epsilon"] > 0


def test_sampler_arguments():
  with pytest.raises((ValueError, TypeError), match="sampling_probability"):
    PoissonSampler(10, 0.0)
  with pytest.raises((ValueError, TypeError), match="sampling_probability"):
    PoissonSampler(10, 1.5)
  with pytest.raises((ValueError, TypeError), match="clients_per_round"):
    ShuffledCyclicSampler(10, 11)
  with pytest.raises(ValueError, match="exactly one"):
    run_training(fed_avg(_tiny_model(), client_learning_rate=0.1), make_population(), None,
                 client_spec=ClientSpec(4), num_rounds=1)


def _tiny_model():
  from tests.conftest import TinyMLP
  from fedjax_lite.models.adapter import from_flax

  return from_flax(TinyMLP(), np.zeros((1, 8), np.float32))
