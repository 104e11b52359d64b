"""``algorithms.fed_nova`` equals a float64 NumPy re-derivation of Wang et al. 2020 (``reference_impl.fed_nova_round``)
on ragged clients whose local work is ALSO cut by per-client step budgets (``pack_clients(step_budget=...)``, a
deadline's stragglers), over three rounds, for vanilla SGD and for heavy-ball momentum (the paper's ``a_i``)."""

from __future__ import annotations

import functools

import jax
import numpy as np
import optax
import pytest

from fedjax_lite import algorithms
from fedjax_lite.core.packing import max_num_steps, pack_clients
from tests import tolerances
from tests.algorithms import reference_impl as ref
from tests.algorithms.family_setup import (BATCH_SIZE, CLIENT_LR, COHORT_SIZE, RTOL, assert_close_to_reference,
                                          make_setup, to_reference)

# Three rounds of 3 clients in 4 slots; each client's step budget (None: its full work). Round 2 cuts client 0
# (4 steps) to 2 and client 3 (2 steps) to 1; round 3 cuts client 1 (3 steps) to 1.
COHORTS = ([0, 2, 5], [0, 3, 2], [1, 3, 5])
BUDGETS = (None, [2, 1, 9], [1, 9, 9])


@functools.lru_cache(maxsize=None)
def budgeted_rounds():
  population, _, _, _ = make_setup()
  num_steps = max_num_steps(population, batch_size=BATCH_SIZE, num_epochs=2)
  return [pack_clients(population, cohort, batch_size=BATCH_SIZE, num_epochs=2, num_steps=num_steps,
                       cohort_size=COHORT_SIZE, seed=7, round_num=r, step_budget=budget)
          for r, (cohort, budget) in enumerate(zip(COHORTS, BUDGETS))]


def full_rounds():
  population, _, _, _ = make_setup()
  num_steps = max_num_steps(population, batch_size=BATCH_SIZE, num_epochs=2)
  return [pack_clients(population, cohort, batch_size=BATCH_SIZE, num_epochs=2, num_steps=num_steps,
                       cohort_size=COHORT_SIZE, seed=7, round_num=r) for r, cohort in enumerate(COHORTS)]


def test_the_budgets_cut_the_local_work_and_leave_it_ragged():
  for budgeted, full in zip(budgeted_rounds(), full_rounds()):
    steps = [len(ref.real_steps(budgeted, slot)) for slot in ref.client_slots(budgeted)]
    assert len(set(steps)) > 1, steps
  cut = [len(ref.real_steps(budgeted_rounds()[1], slot)) for slot in range(3)]
  whole = [len(ref.real_steps(full_rounds()[1], slot)) for slot in range(3)]
  assert cut[0] < whole[0] and cut[1] < whole[1], (cut, whole)


@pytest.mark.parametrize("momentum, weighting, server_lr", [(0.0, "num_examples", 1.0), (0.9, "uniform", 0.5)])
def test_fed_nova_equals_numpy_with_ragged_clients_and_step_budgets(momentum, weighting, server_lr):
  _, model, params, _ = make_setup()
  process = algorithms.fed_nova(model, client_learning_rate=CLIENT_LR, client_momentum=momentum,
                                weighting=weighting, server_optimizer=optax.sgd(server_lr))
  step = jax.jit(process.next)
  state = process.init(params)
  expected = to_reference(params)
  for r, round_data in enumerate(budgeted_rounds()):
    fed_avg = ref.fed_avg_round(expected, round_data, client_learning_rate=CLIENT_LR, server=ref.ServerSGD(1.0),
                                weighting=weighting)
    expected = ref.fed_nova_round(expected, round_data, client_learning_rate=CLIENT_LR, momentum=momentum,
                                  weighting=weighting, server_learning_rate=server_lr)
    state, metrics, _ = step(state, round_data, jax.random.key(r))
    # family_setup.RTOL (~170 float32 roundings of the parameters' scale: 2 rounds x 4 steps x ~20 each) covers
    # three rounds of at most 4 steps here too: the budgets shorten the work. FedNova adds two roundings (the
    # division by ||a_i||_1 and the product with tau_eff), momentum two per step (the buffer's fused update).
    assert_close_to_reference(state.params, expected, what=f"round {r + 1} params")
    tau = [ref.nova_a_vector(len(ref.real_steps(round_data, s)), momentum).sum() for s in ref.client_slots(round_data)]
    weights = np.array([ref.client_weight(round_data, s, weighting) for s in ref.client_slots(round_data)])
    np.testing.assert_allclose(float(metrics["finalizer"]["tau_eff"]), weights @ tau / weights.sum(), rtol=1e-6)
    assert int(metrics["client_work"]["train"]["num_batches"]) == sum(
        len(ref.real_steps(round_data, s)) for s in ref.client_slots(round_data))
    if momentum == 0.0 and server_lr == 1.0 and r == 0:  # not vacuous: FedNova moves differently from FedAvg
      gap = max(float(np.max(np.abs(expected[key] - fed_avg[key]))) for key in expected)
      assert gap > 1e2 * RTOL * max(float(np.max(np.abs(expected[key]))) for key in expected)


def test_nova_normalizer_is_the_l1_norm_of_the_papers_a_vector():
  for momentum in (0.0, 0.5, 0.9):
    taus = np.arange(0, 12)
    got = np.asarray(algorithms.nova_normalizer(taus, momentum))
    want = np.array([ref.nova_a_vector(int(tau), momentum).sum() for tau in taus])
    # The closed form vs the term-by-term sum: a few float32 roundings of values <= 12 / (1 - rho) = 120.
    np.testing.assert_allclose(got, want, rtol=0, atol=16 * np.finfo(np.float32).eps * want.max(initial=1.0))
  assert float(algorithms.nova_normalizer(7)) == 7.0


def test_fed_nova_refuses_the_options_it_sets_and_bad_momentum():
  _, model, _, _ = make_setup()
  with pytest.raises(TypeError, match="client_optimizer"):
    algorithms.fed_nova(model, client_learning_rate=0.1, client_optimizer=optax.adam)
  with pytest.raises(TypeError, match="gradient_correction"):
    algorithms.fed_nova(model, client_learning_rate=0.1, gradient_correction=lambda b, s: optax.identity())
  with pytest.raises(TypeError, match="labels"):  # parameter partitions: not supported, refused (never ignored)
    algorithms.fed_nova(model, client_learning_rate=0.1, labels=lambda params: params)
  with pytest.raises(ValueError, match="client_momentum"):
    algorithms.fed_nova(model, client_learning_rate=0.1, client_momentum=1.0)
  with pytest.raises(ValueError, match="learning rate is required"):
    algorithms.fed_nova(model)


@pytest.mark.parametrize("budget", [1, 2, 3])
def test_equal_local_steps_make_fed_nova_fed_avg(budget):
  """With every client taking the same ``tau`` SGD steps, ``tau_eff = tau`` and ``d_i = delta_i / tau``: FedNova's
  step is FedAvg's weighted mean delta exactly (Wang et al. 2020, Section 4), up to the two extra roundings."""
  population, model, params, _ = make_setup()
  num_steps = max_num_steps(population, batch_size=BATCH_SIZE, num_epochs=2)
  round_data = pack_clients(population, [0, 1, 2], batch_size=BATCH_SIZE, num_epochs=2, num_steps=num_steps,
                            cohort_size=COHORT_SIZE, seed=3, round_num=0, step_budget=[budget] * 3)
  assert {len(ref.real_steps(round_data, s)) for s in ref.client_slots(round_data)} == {budget}
  nova = algorithms.fed_nova(model, client_learning_rate=CLIENT_LR)
  avg = algorithms.fed_avg(model, client_learning_rate=CLIENT_LR)
  nova_params = jax.jit(nova.next)(nova.init(params), round_data, jax.random.key(0)).state.params
  avg_params = jax.jit(avg.next)(avg.init(params), round_data, jax.random.key(0)).state.params
  # float32: the division by tau and the product with tau_eff add two roundings of the update to FedAvg's sum.
  tolerances.assert_trees_close_to_rounding(nova_params, avg_params, num_terms=COHORT_SIZE, ulps=4.0)
