"""``algorithms.dp_ftrl`` with each strategy: the participation pattern it samples, the ledger's epsilon against an
independent computation (NumPy brute-force sensitivity, dp_accounting, jax_privacy's amplified event), training,
canaries that follow the clients' pattern, and arguments."""

from __future__ import annotations

import importlib
import math

import chex
import dp_accounting
import numpy as np
import pytest
from dp_accounting import NeighboringRelation

from fedjax_lite import privacy
from fedjax_lite.algorithms import dp_ftrl
from fedjax_lite.core import ClientSpec, CyclicSampler, ShuffledCyclicSampler
from fedjax_lite.training import run_training

from tests.aggregators.helpers import brute_force_sensitivity
from tests.conftest import make_population

recipes = importlib.import_module("fedjax_lite.algorithms.dp_fed_avg")  # the module (the package exports the function)

# Fast stand-ins for the optimized strategies (jax_privacy's optimizers take tens of seconds to compile): what
# dp_ftrl asks privacy.matrix_factorization for is recorded, and a fixed strategy of that kind is built instead.
BLT_PARAMETERS = ([0.9842298634927619, 0.7270931425682697], [0.1706081571013166, 0.3102560932438474])
BANDED = [0.75, 0.5, 0.3]


def _jax_privacy():
  return pytest.importorskip("jax_privacy", reason="the [dp_mf] extra (jax_privacy, Python >= 3.11)")


@pytest.fixture
def planned(monkeypatch):
  """Records dp_ftrl's calls to privacy.matrix_factorization and builds a fixed strategy of the asked kind."""
  calls = []

  def fixed(strategy, *, num_rounds, min_separation):
    calls.append((strategy, num_rounds, min_separation))
    options = {"blt": {"blt_parameters": BLT_PARAMETERS}, "banded": {"coefficients": BANDED[:min_separation]},
               "toeplitz": {"num_bands": 6}}.get(strategy, {})
    return privacy.matrix_factorization(strategy, num_rounds=num_rounds, min_separation=min_separation, **options)

  monkeypatch.setattr(recipes, "matrix_factorization", fixed)
  return calls


def _reference_epsilon(noise_multiplier, mechanism, rounds, min_separation, delta):
  """RDP epsilon of GaussianDpEvent(z ||C||_col / sens_r) under REPLACE_SPECIAL, sens_r by enumeration."""
  sensitivity = brute_force_sensitivity(mechanism.coefficients(rounds), rounds, min_separation)
  accountant = dp_accounting.rdp.RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_SPECIAL)
  accountant.compose(dp_accounting.GaussianDpEvent(noise_multiplier * mechanism.column_norm / sensitivity))
  return accountant.get_epsilon(delta)


@pytest.mark.parametrize("strategy", ["blt", "banded", "toeplitz", "identity"])
def test_matrix_factorization_runs_in_fixed_cyclic_groups_with_their_ledger(strategy, planned, tiny_model):
  """12 clients, 4 a round: 3 fixed groups visited in turn (each client once every 3 rounds, the same cohort 3
  rounds later); the strategy planned for the run's rounds and that separation; the ledger's epsilon after r
  rounds is dp_accounting's for the sensitivity of every participation pattern enumerated in NumPy."""
  if strategy != "identity":
    _jax_privacy()
  z, delta, n = 1.3, 1e-4, 8
  recipe = dp_ftrl(tiny_model, noise_multiplier=z, num_clients=12, clients_per_round=4, clip=1.0, delta=delta,
                   client_learning_rate=0.1, strategy=strategy, num_rounds=n, seed=3)
  assert planned == [(strategy, n, 3)]
  sampler = recipe.sampler
  assert isinstance(sampler, CyclicSampler) and sampler.min_separation == 3 and sampler.sampling_probability == 1
  epoch = [sampler(t) for t in range(3)]
  assert sorted(np.concatenate(epoch).tolist()) == list(range(12))
  for t in range(3, 9):
    np.testing.assert_array_equal(sampler(t), epoch[t % 3])
  mechanism = recipes.matrix_factorization(strategy, num_rounds=n, min_separation=3)
  for rounds in (1, 4, 8):
    assert math.isclose(recipe.ledger.epsilon_after(rounds), _reference_epsilon(z, mechanism, rounds, 3, delta),
                        rel_tol=1e-6)


@pytest.mark.parametrize("strategy", ["blt", "banded"])
def test_each_strategy_trains_with_its_sampler_and_ledger(strategy, planned, tiny_model, tiny_params):
  _jax_privacy()
  data = make_population(num_clients=12)
  recipe = dp_ftrl(tiny_model, noise_multiplier=1.0, num_clients=12, clients_per_round=4, clip=1.0, delta=1e-3,
                   client_learning_rate=0.1, strategy=strategy, num_rounds=6)
  result = run_training(recipe.process, data, tiny_params, client_spec=ClientSpec(batch_size=4), num_rounds=6,
                        sampler=recipe.sampler, privacy=recipe.ledger, progress=False)
  assert len(result.history) == 6
  chex.assert_tree_all_finite(result.state.params)
  epsilons = [record["privacy/epsilon"] for record in result.history]
  assert all(b >= a for a, b in zip(epsilons, epsilons[1:])) and epsilons[0] > 0
  # A client takes part again every 3 rounds: the epsilon grows at rounds 1, 4 (the second participation) ...
  assert epsilons[3] > epsilons[2]


def test_tree_keeps_shuffled_epochs_and_tree_events(tiny_model):
  recipe = dp_ftrl(tiny_model, noise_multiplier=1.0, num_clients=12, clients_per_round=4, clip=1.0, delta=1e-3,
                   client_learning_rate=0.1, num_rounds=50)
  assert isinstance(recipe.sampler, ShuffledCyclicSampler)
  assert recipe.ledger.epsilon_after(7) == privacy.PrivacyLedger(privacy.tree_run_events(1.0, 3),
                                                                 1e-3).epsilon_after(7)


def test_adaptive_clipping_accounts_the_count_release(tiny_model):
  """The identity strategy with adaptive clipping, 400 clients, 40 a round (10 groups): the value noise z_v and the
  count noise sigma_b = 0.05 m split z (z_v^-2 + (2 sigma_b)^-2 = z^-2), so k participations merge back to
  GaussianDpEvent(z / sqrt(k)), k = ceil(r / 10)."""
  z, delta = 1.0, 1e-5
  recipe = dp_ftrl(tiny_model, noise_multiplier=z, num_clients=400, clients_per_round=40, clip=None, delta=delta,
                   client_learning_rate=0.1, strategy="identity", num_rounds=30)
  for rounds in (1, 11, 30):
    participations = -(-rounds // 10)
    expected = privacy.epsilon_of(dp_accounting.GaussianDpEvent(z / math.sqrt(participations)), delta,
                                  neighboring_relation=NeighboringRelation.REPLACE_SPECIAL)
    assert math.isclose(recipe.ledger.epsilon_after(rounds), expected, rel_tol=1e-9)


def test_amplified_bandmf_samples_inside_the_groups_and_accounts_with_jax_privacy(planned, tiny_model):
  _jax_privacy()
  from jax_privacy.experimental.accounting import amplified_bandmf_event

  z, q, delta = 1.1, 0.5, 1e-5
  recipe = dp_ftrl(tiny_model, noise_multiplier=z, num_clients=24, clients_per_round=4, clip=1.0, delta=delta,
                   client_learning_rate=0.1, strategy="banded", num_rounds=12, sampling_probability=q)
  assert planned == [("banded", 12, 3)]  # floor(24 * 0.5 / 4) groups
  assert recipe.sampler.sampling_probability == q and recipe.sampler.min_separation == 3
  for rounds in (1, 5, 12):
    reference = dp_accounting.rdp.RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_SPECIAL)
    reference.compose(amplified_bandmf_event(z, rounds, num_bands=3, sampling_prob=q))
    assert recipe.ledger.epsilon_after(rounds) == reference.get_epsilon(delta)
  with pytest.raises(ValueError, match="banded strategy"):
    dp_ftrl(tiny_model, noise_multiplier=z, num_clients=24, clients_per_round=4, clip=1.0, delta=delta,
            client_learning_rate=0.1, strategy="blt", num_rounds=12, sampling_probability=q)


def test_a_planned_strategy_is_taken_as_is(tiny_model):
  mechanism = privacy.matrix_factorization("identity", num_rounds=5)
  recipe = dp_ftrl(tiny_model, noise_multiplier=2.0, num_clients=10, clients_per_round=5, clip=1.0, delta=1e-3,
                   client_learning_rate=0.1, strategy=mechanism)
  assert recipe.sampler.min_separation == 2
  assert math.isclose(recipe.ledger.epsilon_after(5), _reference_epsilon(2.0, mechanism, 5, 2, 1e-3), rel_tol=1e-9)


@pytest.mark.parametrize("overrides, match", [
    ({"strategy": "tree", "clip": None}, "fixed clip"),
    ({"strategy": "tree", "sampling_probability": 0.5}, "sampling_probability=1"),
    ({"strategy": "identity"}, "num_rounds is required"),
    ({"strategy": "identity", "num_rounds": 5, "sampling_probability": 0.1}, "at least clients_per_round"),
    ({"strategy": "identity", "num_rounds": 5, "clip": None, "sampling_probability": 0.5}, "adaptive clipping"),
    ({"strategy": "lattice", "num_rounds": 5}, "strategy"),
    ({"strategy": "identity", "num_rounds": 0}, "num_rounds"),
    ({"clients_per_round": 13}, "clients_per_round"),
])
def test_bad_arguments(overrides, match, tiny_model):
  arguments = dict(noise_multiplier=1.0, num_clients=12, clients_per_round=4, clip=1.0, delta=1e-3,
                   client_learning_rate=0.1)
  with pytest.raises((ValueError, TypeError), match=match):
    dp_ftrl(tiny_model, **{**arguments, **overrides})
  with pytest.raises(ValueError, match="already planned"):
    dp_ftrl(tiny_model, **arguments, strategy=privacy.matrix_factorization("identity", num_rounds=5), num_rounds=5)
