"""Ditto against a float64 NumPy re-derivation of the paper's Algorithm 1, on ragged clients over three rounds
(the personal models carried between rounds in a ClientStateStore), and its evaluation of both models.

The model is the family's softmax regression written in NumPy in ``reference_impl`` (``logits = x W + b``, mean
cross-entropy of a batch's real examples); the data are ``family_setup``'s ragged clients (1 to 4 local steps,
partial batches, a padding slot every round). Tolerances: ``family_setup.RTOL`` (float32 against float64 over at
most 3 x 4 sequential SGD steps; its derivation covers the personal steps, which have the same form plus the
proximal term, two more roundings per step).
"""

from __future__ import annotations

import chex
import jax
import numpy as np
import pytest

from fedjax_lite import algorithms
from fedjax_lite.core.client_state import ClientStateStore
from tests.algorithms import reference_impl as ref
from tests.algorithms.family_setup import (
    CLIENT_LR,
    COHORTS,
    RTOL,
    assert_close_to_reference,
    compiled,
    make_setup,
    to_reference,
)

LAMBDA, PERSONAL_LR = 0.5, 0.05
SCHEDULE = (COHORTS[0], COHORTS[1], COHORTS[0])  # client 2 in every round, 0 and 5 twice: v_k carried over


@pytest.fixture(scope="module")
def setup():
  return make_setup()


@pytest.fixture(scope="module")
def ditto_step(setup):
  _, model, _, _ = setup
  process = algorithms.ditto(model, proximal_strength=LAMBDA, client_learning_rate=CLIENT_LR,
                             personal_learning_rate=PERSONAL_LR)
  return process, jax.jit(process.next)


def ditto_round(params, personal, cohort, round_data):
  """The paper's Algorithm 1 in NumPy: FedAvg's local SGD and example-weighted mean for ``w``; for each real slot
  ``k`` the personal steps ``v <- v - eta_p (grad F_k(v; b) + lambda (v - w))`` with ``w`` this round's broadcast,
  over the same batches. ``personal`` maps client id -> ``v_k`` and is updated in place."""
  deltas, weights = [], []
  for slot in ref.client_slots(round_data):
    final = ref.local_sgd(params, round_data, slot, CLIENT_LR)
    deltas.append(ref.tree_map(np.subtract, params, final))
    weights.append(ref.client_weight(round_data, slot, "num_examples"))
    client = cohort[slot]
    personal[client] = ref.local_sgd(personal[client], round_data, slot, PERSONAL_LR,
                                      lambda v, t: ref.tree_map(lambda a, w: LAMBDA * (a - w), v, params))
  delta = ref.weighted_mean(deltas, weights)
  return ref.tree_map(lambda p, d: p - d, params, delta)


def run(setup, ditto_step):
  population, _, params, rounds = setup
  process, step = ditto_step
  state = process.init(params)
  store = ClientStateStore(process.client_state(params), population.num_clients)
  history = []
  for r, cohort in enumerate(SCHEDULE):
    round_data = rounds[r % 2]
    num_slots = round_data["num_examples"].shape[0]
    state, metrics, new_states = step(state, round_data, jax.random.key(r), store.gather(cohort, num_slots))
    store.scatter(cohort, new_states, round_data["num_examples"])
    history.append((state, metrics, jax.tree.map(np.array, store.arrays)))
  return history


def test_three_rounds_equal_the_numpy_algorithm(setup, ditto_step):
  population, _, params, rounds = setup
  history = run(setup, ditto_step)
  expected = to_reference(params)
  personal = {client: to_reference(params) for client in range(population.num_clients)}  # v_k^0 = w^0
  for r, cohort in enumerate(SCHEDULE):
    expected = ditto_round(expected, personal, cohort, rounds[r % 2])
    state, metrics, store_arrays = history[r]
    assert_close_to_reference(state.params, expected, what=f"round {r} global params")
    for client in range(population.num_clients):
      assert_close_to_reference(jax.tree.map(lambda a: a[client], store_arrays), personal[client],
                                what=f"round {r} personal model of client {client}")
    assert float(metrics["client_work"]["personal_learning_rate"]) == pytest.approx(PERSONAL_LR)
  # Client 4 is never sampled: its personal model is still the initial global model.
  chex.assert_trees_all_equal(jax.tree.map(lambda a: a[4], history[-1][2]), jax.tree.map(np.asarray, params))


def test_global_model_is_fed_avg_bit_for_bit(setup, ditto_step):
  """The personal steps never touch the upload: Ditto's global model is FedAvg's, same keys, same roundings."""
  _, model, params, rounds = setup
  fed_avg, fed_avg_step = compiled("fed_avg", model, "num_examples")
  state = fed_avg.init(params)
  for r in range(len(SCHEDULE)):
    state, fed_avg_metrics, _ = fed_avg_step(state, rounds[r % 2], jax.random.key(r))
  final, metrics, _ = run(setup, ditto_step)[-1]
  chex.assert_trees_all_equal(final.params, state.params)
  assert float(metrics["client_work"]["train"]["loss"]) == float(fed_avg_metrics["client_work"]["train"]["loss"])


def test_personal_training_metrics_are_the_personal_steps_forward_passes(setup, ditto_step):
  """``personal_loss``: the example-weighted mean over the round's clients of each personal step's batch loss
  (before the step), as ``loss`` is for the global steps."""
  _, _, params, rounds = setup
  process, step = ditto_step
  round_data = rounds[0]
  personal = to_reference(params)
  total, count = 0.0, 0.0
  for slot in ref.client_slots(round_data):
    v = dict(personal)
    for t in ref.real_steps(round_data, slot):
      x, y, mask = ref.batch(round_data, slot, t)
      loss, grad = ref.batch_loss_and_grad(v, x, y, mask)
      total, count = total + loss * mask.sum(), count + mask.sum()
      v = ref.tree_map(lambda a, g, w: a - PERSONAL_LR * (g + LAMBDA * (a - w)), v, grad, personal)
  states = jax.tree.map(lambda a: np.stack([a] * round_data["num_examples"].shape[0]), params)
  _, metrics, _ = step(process.init(params), round_data, jax.random.key(0), states)
  np.testing.assert_allclose(float(metrics["client_work"]["train"]["personal_loss"]), total / count, rtol=RTOL)


def test_personalized_evaluation_reports_both_models_and_their_distribution(setup, ditto_step):
  """Ditto's state is the whole personal model, so algorithms.personalized_evaluation applies as is: per-client
  accuracy with the global and with each client's personal model, their mean over clients and the mean of the
  worst ceil(10% of n) = 1 client, against NumPy."""
  population, model, params, rounds = setup
  state, _, store_arrays = run(setup, ditto_step)[-1]
  test_data = rounds[1]  # clients 1, 3, 2 and a padding slot
  cohort = COHORTS[1]
  slots = test_data["num_examples"].shape[0]
  personal = jax.tree.map(lambda a: a[np.array(cohort + [0] * (slots - len(cohort)))], store_arrays)
  results = algorithms.personalized_evaluation(model)(state.params, personal, test_data)

  def accuracy(params, slot):
    w = to_reference(params)
    correct = total = 0
    for t in ref.real_steps(test_data, slot):
      x, y, mask = ref.batch(test_data, slot, t)
      predicted = np.argmax(ref.logits(w, x), axis=1)
      correct += int(np.sum((predicted == y) & mask))
      total += int(mask.sum())
    return correct / total

  for which, client_params in (("global", lambda slot: state.params),
                               ("personalized", lambda slot: jax.tree.map(lambda a: a[slot], personal))):
    expected = np.array([accuracy(client_params(slot), slot) for slot in range(len(cohort))])
    per_client = np.asarray(results[which]["per_client"]["accuracy"])
    np.testing.assert_allclose(per_client[:len(cohort)], expected, rtol=1e-6)  # a ratio of small integers
    assert np.isnan(per_client[len(cohort)])  # the padding slot
    distribution = results[which]["distribution"]["accuracy"]
    np.testing.assert_allclose(float(distribution["client_mean"]), expected.mean(), rtol=1e-6)
    np.testing.assert_allclose(float(distribution["worst_10_percent"]), expected.min(), rtol=1e-6)
    losses = np.asarray(results[which]["per_client"]["loss"])[:len(cohort)]
    np.testing.assert_allclose(float(results[which]["distribution"]["loss"]["worst_10_percent"]), losses.max(),
                               rtol=1e-6)


def test_arguments_are_checked(setup):
  _, model, params, rounds = setup
  with pytest.raises(ValueError, match="proximal_strength"):
    algorithms.ditto(model, proximal_strength=-0.1, client_learning_rate=0.1)
  with pytest.raises(ValueError, match="personal_learning_rate"):
    algorithms.ditto(model, proximal_strength=0.1, client_learning_rate=0.1, personal_learning_rate=0.0)
  with pytest.raises(ValueError, match="weighting"):
    algorithms.ditto(model, proximal_strength=0.1, client_learning_rate=0.1, weighting="median")

