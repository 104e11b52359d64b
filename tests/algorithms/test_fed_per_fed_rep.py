"""FedPer and FedRep against their float64 NumPy re-derivations (``partition_reference.py``): three rounds of
ragged clients, client 2 in every round (its head carries over), the server body and every client's head compared.
"""

from __future__ import annotations

import chex
import numpy as np
import pytest

from fedjax_lite import algorithms
from tests.algorithms import partition_reference as ref
from tests.algorithms.partition_setup import (
    CLIENT_LR,
    COHORTS,
    NUM_CLIENTS,
    assert_close,
    head_is_local,
    make_setup,
    run_rounds,
    to_reference,
)


@pytest.fixture(scope="module")
def setup():
  return make_setup()


def reference_rounds(params, rounds, **kwargs):
  server = ref.as_float64(to_reference(params))
  heads = {c: {key: server[key] for key in ref.HEAD} for c in range(NUM_CLIENTS)}
  for cohort, round_data in zip(COHORTS, rounds):
    server = ref.partitioned_round(server, heads, {k: np.asarray(v) for k, v in round_data.items()}, cohort,
                                   learning_rate=CLIENT_LR, **kwargs)
  return server, heads


def check_against_reference(state, store, expected_server, expected_heads, params):
  assert_close(to_reference(state.params), expected_server, "server")
  chex.assert_trees_all_equal(state.params["head"], params["head"])  # the server's head never moves
  stored = store.arrays["head"]
  for client, head in expected_heads.items():
    assert_close({"W2": stored["kernel"][client], "b2": stored["bias"][client]}, head, f"head of client {client}")


def test_fed_per_equals_its_numpy_rederivation(setup):
  _, model, params, rounds = setup
  process = algorithms.fed_per(model, head_is_local, client_learning_rate=CLIENT_LR)
  state, store, _ = run_rounds(process, params, rounds)
  check_against_reference(state, store, *reference_rounds(params, rounds), params)


def test_fed_rep_equals_its_numpy_rederivation(setup):
  _, model, params, rounds = setup
  process = algorithms.fed_rep(model, head_is_local, head_epochs=2, body_epochs=1, client_learning_rate=CLIENT_LR)
  state, store, metrics = run_rounds(process, params, rounds)
  check_against_reference(state, store, *reference_rounds(params, rounds, head_epochs=2, body_epochs=1), params)
  # The weight and metrics are the body passes': one pass over each client's examples.
  assert int(metrics[0]["client_work"]["train"]["num_examples"]) == int(np.sum(rounds[0]["num_examples"]))


def test_fed_rep_two_body_epochs(setup):
  _, model, params, rounds = setup
  process = algorithms.fed_rep(model, head_is_local, head_epochs=1, body_epochs=2, client_learning_rate=CLIENT_LR)
  state, store, _ = run_rounds(process, params, rounds[:2])
  expected = reference_rounds(params, rounds[:2], head_epochs=1, body_epochs=2)
  assert_close(to_reference(state.params), expected[0], "server")


def test_fed_per_and_fed_rep_refuse_the_options_they_set(setup):
  _, model, _, _ = setup
  with pytest.raises(TypeError, match="labels"):
    algorithms.fed_per(model, head_is_local, client_learning_rate=CLIENT_LR, local_state=False)
  with pytest.raises(TypeError, match="local_phases"):
    algorithms.fed_rep(model, head_is_local, client_learning_rate=CLIENT_LR, local_phases=(("local", 1),))
  with pytest.raises(ValueError, match="head_epochs"):
    algorithms.fed_rep(model, head_is_local, head_epochs=0, client_learning_rate=CLIENT_LR)
  with pytest.raises(ValueError, match="needs labels"):
    algorithms.fed_avg(model, client_learning_rate=CLIENT_LR, local_phases=(("local", 1),))
  with pytest.raises(ValueError, match="'global' and/or 'local'"):
    algorithms.fed_avg(model, client_learning_rate=CLIENT_LR, labels=head_is_local, local_state=True,
                       local_phases=(("frozen", 1),))
