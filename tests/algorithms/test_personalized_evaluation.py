"""Personalized evaluation: each client with its own local parameters (from the client-state store) next to the
global model, per client, example-weighted and as a distribution over clients (mean client, worst 10%), against
a float64 NumPy evaluation of the same packed data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedjax_lite import algorithms
from fedjax_lite.core.packing import pack_clients
from tests.algorithms import partition_reference as ref
from tests.algorithms.partition_setup import (
    CLIENT_LR,
    NUM_CLIENTS,
    head_is_local,
    make_setup,
    run_rounds,
    to_reference,
)

EVAL_SLOTS = 8  # six clients and two padding slots


def reference_client_metrics(params, round_data, slot):
  """``(mean loss, accuracy, examples)`` of one client's real examples, in float64."""
  losses, correct, count = [], 0, 0
  for t in range(round_data["mask"].shape[1]):
    real = round_data["mask"][slot, t].astype(bool)
    if not real.any():
      continue
    x = np.asarray(round_data["x"][slot, t], np.float64)[real]
    y = np.asarray(round_data["y"][slot, t])[real]
    z = np.tanh(x @ params["W1"] + params["b1"]) @ params["W2"] + params["b2"]
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    losses.extend(-log_p[np.arange(len(y)), y])
    correct += int(np.sum(np.argmax(z, axis=1) == y))
    count += int(real.sum())
  return float(np.sum(losses)) / count, correct / count, count


@pytest.fixture(scope="module")
def trained():
  population, model, params, rounds = make_setup()
  process = algorithms.fed_per(model, head_is_local, client_learning_rate=CLIENT_LR)
  state, store, _ = run_rounds(process, params, rounds)
  eval_data = pack_clients(population, np.arange(NUM_CLIENTS), batch_size=4, cohort_size=EVAL_SLOTS, shuffle=False)
  return model, state, store, eval_data


def test_each_client_is_evaluated_with_its_own_head_next_to_the_global_model(trained):
  model, state, store, eval_data = trained
  evaluate = algorithms.personalized_evaluation(model)
  result = evaluate(state.params, store.gather(np.arange(NUM_CLIENTS), EVAL_SLOTS), eval_data)
  server = ref.as_float64(to_reference(state.params))
  heads = store.arrays["head"]
  expected = {"global": [], "personalized": []}
  for client in range(NUM_CLIENTS):
    own = {**server, "W2": np.float64(heads["kernel"][client]), "b2": np.float64(heads["bias"][client])}
    expected["global"].append(reference_client_metrics(server, eval_data, client))
    expected["personalized"].append(reference_client_metrics(own, eval_data, client))
  # float32 evaluation of a 4-4-4 perceptron: a few tens of roundings per loss term, relative 1e-5 with margin.
  for name, rows in expected.items():
    loss, accuracy, count = (np.array(column) for column in zip(*rows))
    per_client = result[name]["per_client"]
    np.testing.assert_allclose(per_client["loss"][:NUM_CLIENTS], loss, rtol=1e-5)
    np.testing.assert_array_equal(per_client["accuracy"][:NUM_CLIENTS], accuracy.astype(np.float32))
    assert np.all(np.isnan(per_client["loss"][NUM_CLIENTS:]))  # padding slots
    aggregate = result[name]["aggregate"]
    np.testing.assert_allclose(aggregate["loss"], np.sum(loss * count) / np.sum(count), rtol=1e-5)
    np.testing.assert_allclose(aggregate["accuracy"], np.sum(accuracy * count) / np.sum(count), rtol=1e-6)
    distribution = result[name]["distribution"]
    worst = math.ceil(0.1 * NUM_CLIENTS)  # one client of six
    assert int(distribution["num_clients"]) == NUM_CLIENTS
    np.testing.assert_allclose(distribution["loss"]["client_mean"], np.mean(loss), rtol=1e-5)
    np.testing.assert_allclose(distribution["loss"]["worst_10_percent"], np.sort(loss)[-worst:].mean(), rtol=1e-5)
    np.testing.assert_allclose(distribution["accuracy"]["client_mean"], np.mean(accuracy), rtol=1e-6)
    np.testing.assert_allclose(distribution["accuracy"]["worst_10_percent"], np.sort(accuracy)[:worst].mean(),
                               rtol=1e-6)
  # The clients' own heads fit their data better than the initial head the global model carries.
  assert result["personalized"]["aggregate"]["loss"] < result["global"]["aggregate"]["loss"]


def test_client_distribution_counts_real_clients_and_the_worst_share_exactly():
  per_client = {"num_examples": np.array([5, 0, 3, 2, 7, 1, 1, 1, 1, 1, 1, 0]),
                "accuracy": np.array([0.5, np.nan, 0.1, 0.9, 0.3, 0.2, 1.0, 1.0, 1.0, 0.0, 0.4, np.nan]),
                "loss": np.array([1.0, np.nan, 3.0, 0.5, 2.0, 4.0, 0.1, 0.1, 0.1, 9.0, 1.5, np.nan])}
  out = algorithms.client_distribution(per_client)
  real = per_client["num_examples"] > 0  # 10 real clients: ceil(10%) = 1 worst client
  assert int(out["num_clients"]) == 10
  np.testing.assert_allclose(out["accuracy"]["client_mean"], np.mean(per_client["accuracy"][real]), rtol=1e-6)
  assert float(out["accuracy"]["worst_10_percent"]) == 0.0
  assert float(out["loss"]["worst_10_percent"]) == 9.0
  out = algorithms.client_distribution(per_client, worst_percent=25)  # ceil(2.5) = 3 clients
  np.testing.assert_allclose(out["accuracy"]["worst_25_percent"], (0.0 + 0.1 + 0.2) / 3, rtol=1e-6)
  np.testing.assert_allclose(out["loss"]["worst_25_percent"], (9.0 + 4.0 + 3.0) / 3, rtol=1e-6)
  empty = algorithms.client_distribution({"num_examples": np.zeros(3), "loss": np.full(3, np.nan)})
  assert int(empty["num_clients"]) == 0 and np.isnan(empty["loss"]["client_mean"])
  with pytest.raises(ValueError, match="worst_percent"):
    algorithms.client_distribution(per_client, worst_percent=0)


def test_personalized_evaluation_checks_its_arguments(trained):
  model, state, store, eval_data = trained
  with pytest.raises(TypeError, match="personal_params"):
    algorithms.personalized_evaluation(model, personal_params=3)
  with pytest.raises(ValueError, match="one state per slot"):
    algorithms.personalized_evaluation(model)(state.params, store.gather(np.arange(3), 3), eval_data)
