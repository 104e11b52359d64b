"""run_training with per-client state (SCAFFOLD): gather/scatter around each round, and exact resume."""

from __future__ import annotations

import chex
import jax
import numpy as np
import pytest

from fedjax_lite.algorithms import fed_avg, scaffold
from fedjax_lite.core.client_state import ClientStateStore
from fedjax_lite.core.packing import ClientSpec
from fedjax_lite.core.sampling import sample_clients
from fedjax_lite.training.loop import run_training
from tests.conftest import make_population
from tests.tolerances import assert_trees_close_to_rounding


def _train(tiny_model, tiny_params, data, num_rounds, **kwargs):
  process = scaffold(tiny_model, num_clients=data.num_clients, client_learning_rate=0.1)
  return run_training(process, data, tiny_params, client_spec=ClientSpec(batch_size=4), clients_per_round=3,
                      num_rounds=num_rounds, seed=3, progress=False, **kwargs)


def test_only_sampled_clients_get_state_and_the_server_variate_is_their_mean(tiny_model, tiny_params):
  data = make_population(num_clients=8)
  store = ClientStateStore(jax.tree.map(np.zeros_like, tiny_params), data.num_clients)
  result = _train(tiny_model, tiny_params, data, 3, client_states=store)
  sampled = set()
  for round_num in range(3):
    sampled |= set(sample_clients(data.num_clients, 3, seed=3, round_num=round_num).tolist())
  touched = {k for k in range(data.num_clients)
             if any(np.any(leaf[k] != 0) for leaf in jax.tree.leaves(store.arrays))}
  assert touched == sampled  # never-sampled clients keep their initial (zero) state
  # c = c + (1/N) sum_S (c_i+ - c_i) keeps c equal to the mean of all N clients' c_i.
  mean_of_clients = jax.tree.map(lambda leaf: leaf.mean(axis=0), store.arrays)
  # c accumulated 3 rounds of (1/N) sums of 3 clients' changes; the mean sums N = 8 rows: a few ulps x terms.
  assert_trees_close_to_rounding(result.state.finalizer_state.control_variate, mean_of_clients, num_terms=8 + 3 * 3)


def test_client_states_must_match_the_process(tiny_model, tiny_params):
  data = make_population(num_clients=4)
  with pytest.raises(ValueError, match="keeps no per-client state"):
    run_training(fed_avg(tiny_model, client_learning_rate=0.1), data, tiny_params,
                 client_spec=ClientSpec(batch_size=4), clients_per_round=2, num_rounds=1, progress=False,
                 client_states=ClientStateStore(np.zeros(3, np.float32), 4))
  with pytest.raises(ValueError, match="holds 5 clients"):
    _train(tiny_model, tiny_params, data, 1,
           client_states=ClientStateStore(jax.tree.map(np.zeros_like, tiny_params), 5))


def test_resume_restores_the_client_states_exactly(tiny_model, tiny_params, tmp_path):
  data = make_population(num_clients=6)
  full_store = ClientStateStore(jax.tree.map(np.zeros_like, tiny_params), data.num_clients)
  full = _train(tiny_model, tiny_params, data, 4, client_states=full_store)
  first = ClientStateStore(jax.tree.map(np.zeros_like, tiny_params), data.num_clients)
  _train(tiny_model, tiny_params, data, 2, client_states=first, checkpoint_dir=tmp_path / "ckpt",
         checkpoint_every=1)
  resumed_store = ClientStateStore(jax.tree.map(np.zeros_like, tiny_params), data.num_clients)  # fresh: zeros
  resumed = _train(tiny_model, tiny_params, data, 4, client_states=resumed_store, checkpoint_dir=tmp_path / "ckpt",
                   checkpoint_every=1, resume=True)
  chex.assert_trees_all_equal(resumed.state.params, full.state.params)
  chex.assert_trees_all_equal(resumed_store.arrays, full_store.arrays)
