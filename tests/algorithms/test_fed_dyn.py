"""FedDyn against a float64 NumPy re-derivation of the paper's Algorithm 1 (Acar et al. 2021), with full and partial
participation, on ragged clients over three rounds (the clients' g_k carried in a ClientStateStore).

The model is the family's softmax regression written in NumPy in ``reference_impl``; the data are
``family_setup``'s ragged clients. Tolerance: ``family_setup.RTOL`` (its derivation: float32 against float64 over
at most 3 x 4 sequential SGD steps; FedDyn's correction adds two terms per step, and the server step divides by
``alpha`` -- ``h / alpha`` is a sum of the same deltas scaled by ``1/m``, no cancellation beyond the deltas').
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lite import algorithms
from fedjax_lite.core.client_state import ClientStateStore
from fedjax_lite.core.packing import max_num_steps, pack_clients
from tests.algorithms import reference_impl as ref
from tests.algorithms.family_setup import (
    BATCH_SIZE,
    CLIENT_LR,
    COHORTS,
    assert_close_to_reference,
    make_setup,
    to_reference,
)

ALPHA = 0.3


@pytest.fixture(scope="module")
def setup():
  return make_setup()


def fed_dyn_round(theta, h, gradients, cohort, round_data, num_clients):
  """One round of Algorithm 1 in NumPy; ``gradients`` maps client -> g_k (updated in place). Returns
  ``(theta^t, h^t)``."""
  finals = []
  for slot in ref.client_slots(round_data):
    client = cohort[slot]
    g = gradients[client]
    correction = lambda v, t, g=g: ref.tree_map(lambda a, gk, w: -gk + ALPHA * (a - w), v, g, theta)
    final = ref.local_sgd(theta, round_data, slot, CLIENT_LR, correction)
    gradients[client] = ref.tree_map(lambda gk, f, w: gk - ALPHA * (f - w), g, final, theta)
    finals.append(final)
  h = ref.tree_map(lambda h0, w, *fs: h0 - ALPHA / num_clients * sum(f - w for f in fs), h, theta, *finals)
  theta = ref.tree_map(lambda hh, *fs: sum(fs) / len(fs) - hh / ALPHA, h, *finals)
  return theta, h


def check_rounds(process, params, schedule, num_clients):
  step = jax.jit(process.next)
  state = process.init(params)
  store = ClientStateStore(process.client_state(params), num_clients)
  theta, h = to_reference(params), ref.zeros_like(to_reference(params))
  gradients = {client: ref.zeros_like(theta) for client in range(num_clients)}
  for r, (cohort, round_data) in enumerate(schedule):
    num_slots = round_data["num_examples"].shape[0]
    state, metrics, new_states = step(state, round_data, jax.random.key(r), store.gather(cohort, num_slots))
    store.scatter(cohort, new_states, round_data["num_examples"])
    theta, h = fed_dyn_round(theta, h, gradients, cohort, round_data, num_clients)
    assert_close_to_reference(state.params, theta, what=f"round {r} theta")
    assert_close_to_reference(to_reference(state.finalizer_state.h), h, what=f"round {r} h")
    for client in range(num_clients):
      actual = to_reference(jax.tree.map(lambda a: a[client], store.arrays))
      if np.max(np.abs(gradients[client]["W"])) == 0:  # never sampled: still exactly zero
        chex.assert_trees_all_equal(actual, gradients[client])
      else:
        assert_close_to_reference(actual, gradients[client], what=f"round {r} g of client {client}")
    assert int(metrics["client_work"]["num_non_finite_clients"]) == 0
  return state, store


def test_partial_participation_three_rounds_equal_numpy(setup):
  population, model, params, rounds = setup
  process = algorithms.fed_dyn(model, alpha=ALPHA, num_clients=population.num_clients,
                               client_learning_rate=CLIENT_LR)
  schedule = [(COHORTS[0], rounds[0]), (COHORTS[1], rounds[1]), (COHORTS[0], rounds[0])]
  check_rounds(process, params, schedule, population.num_clients)


def test_full_participation_three_rounds_equal_numpy(setup):
  population, model, params, _ = setup
  n = population.num_clients
  num_steps = max_num_steps(population, batch_size=BATCH_SIZE)
  everyone = list(range(n))
  rounds = [pack_clients(population, everyone, batch_size=BATCH_SIZE, num_steps=num_steps, seed=7, round_num=r)
            for r in range(3)]
  process = algorithms.fed_dyn(model, alpha=ALPHA, num_clients=n, client_learning_rate=CLIENT_LR)
  state, store = check_rounds(process, params, [(everyone, round_data) for round_data in rounds], n)
  # With full participation h^t = -(alpha/m) sum_t sum_k (theta_k^t - theta^{t-1}) = mean_k g_k (Acar et al. 2021,
  # Appendix: the server state is the mean of the clients' gradient states); a sum of 6 float32 terms.
  mean_g = jax.tree.map(lambda a: np.mean(np.asarray(a, np.float64), axis=0), store.arrays)
  assert_close_to_reference(to_reference(state.finalizer_state.h), to_reference(mean_g), what="h vs mean g_k")


def test_a_round_with_only_rejected_clients_changes_nothing(setup):
  """A NaN in every client's data: all rejected (count 0), theta, h and every g_k unchanged."""
  population, model, params, rounds = setup
  process = algorithms.fed_dyn(model, alpha=ALPHA, num_clients=population.num_clients,
                               client_learning_rate=CLIENT_LR)
  round_data = dict(rounds[0], x=jnp.full_like(rounds[0]["x"], jnp.nan))
  state = process.init(params)
  states = jax.tree.map(lambda a: jnp.stack([a + 1.0] * 4), process.client_state(params))
  new_state, metrics, new_states = jax.jit(process.next)(state, round_data, jax.random.key(0), states)
  chex.assert_trees_all_equal(new_state.params, state.params)
  chex.assert_trees_all_equal(new_state.finalizer_state, state.finalizer_state)
  chex.assert_trees_all_equal(new_states, states)
  assert int(metrics["client_work"]["num_non_finite_clients"]) == 3
  assert int(metrics["finalizer"]["update_non_finite"]) == 1


def test_arguments_are_checked(setup):
  _, model, _, _ = setup
  with pytest.raises(ValueError, match="alpha"):
    algorithms.fed_dyn(model, alpha=0.0, num_clients=6, client_learning_rate=0.1)
  with pytest.raises(ValueError, match="num_clients"):
    algorithms.fed_dyn(model, alpha=0.1, num_clients=0, client_learning_rate=0.1)
  with pytest.raises(ValueError, match="client_states"):  # a stateful algorithm: next needs the cohort's g_k
    process = algorithms.fed_dyn(model, alpha=0.1, num_clients=6, client_learning_rate=0.1)
    process.next(process.init(make_setup()[2]), make_setup()[3][0], jax.random.key(0))


def test_fed_dyn_reaches_the_global_optimum_where_fed_avg_is_biased():
  """The paper's claim (Acar et al. 2021, §3): FedDyn's fixed point is a stationary point of the GLOBAL loss even
  with inexact local solves. At a fixed point theta_k = theta, so the local steps make no progress: g_k =
  grad L_k(theta); h = mean_k g_k (full participation) and theta = mean theta_k - h/alpha force h = grad L(theta) =
  0. On SCAFFOLD's heterogeneous least-squares clients (``test_scaffold_heterogeneous``: FedAvg's fixed point is
  0.11 from the optimum, |w*| = 2.2), K = 10 local GD steps, alpha = 1."""
  from tests.algorithms import test_scaffold_heterogeneous as quadratic
  from fedjax_lite.core.federated_data import FederatedData

  clients = quadratic.heterogeneous_clients()
  data = FederatedData.from_clients(clients)
  optimum, fed_avg_point = quadratic.closed_form_points(clients)
  cohort = np.arange(quadratic.NUM_CLIENTS)
  rounds = [pack_clients(data, cohort, batch_size=quadratic.NUM_EXAMPLES, num_epochs=quadratic.LOCAL_STEPS, seed=0,
                         round_num=r) for r in range(2)]
  model = quadratic.linear_least_squares_model()
  params = model.init(jax.random.key(0))
  process = algorithms.fed_dyn(model, alpha=1.0, num_clients=quadratic.NUM_CLIENTS,
                               client_learning_rate=quadratic.LR)
  step = jax.jit(process.next)
  state = process.init(params)
  store = ClientStateStore(process.client_state(params), quadratic.NUM_CLIENTS)
  for r in range(40):
    state, _, new_states = step(state, rounds[r % 2], jax.random.key(r), store.gather(cohort))
    store.scatter(cohort, new_states, rounds[r % 2]["num_examples"])
  distance = np.linalg.norm(np.asarray(state.params["w"], np.float64) - optimum)
  fed_avg_distance = np.linalg.norm(fed_avg_point - optimum)
  # Measured 3.3e-7 after 40 rounds (the contraction is geometric; ~1e-6 is float32 rounding at |w| ~ 2); the bound
  # 1e-3 x 0.11 = 1.1e-4 is ~450 float32 ulps at |w| ~ 2, far above rounding and far below FedAvg's bias.
  assert distance < 1e-3 * fed_avg_distance, (distance, fed_avg_distance)
  # ... and h = grad L(w*) = 0 there (a sum of 4 float32 terms of size |g_k| ~ 1).
  np.testing.assert_allclose(np.asarray(state.finalizer_state.h["w"]), 0.0, rtol=0, atol=1e-4)
