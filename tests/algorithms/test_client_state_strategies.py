"""Per-client state flows through every runner strategy alike, and padding slots never write it."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from fedjax_lite.algorithms import scaffold
from fedjax_lite.core.client_state import ClientStateStore
from fedjax_lite.core.packing import pack_clients
from fedjax_lite.core.runner import Runner, client_mesh
from tests.conftest import make_population
from tests.tolerances import assert_trees_close_to_rounding

# An explicit mesh, even of one device, deals the clients to its devices by size: states must still come back to
# their own slots.
RUNNERS = {"sequential": Runner("sequential"), "sequential_mesh1": Runner("sequential", mesh=client_mesh(1)),
           "vmap": Runner("vmap"), "chunked": Runner("chunked", chunk_size=2)}


def one_round(model, params, runner):
  population = make_population(num_clients=8)
  process = scaffold(model, num_clients=population.num_clients, client_learning_rate=0.1, runner=runner)
  store = ClientStateStore(jax.tree.map(np.zeros_like, params), population.num_clients)
  cohort = np.array([5, 1, 6])
  round_data = pack_clients(population, cohort, batch_size=4, cohort_size=5)  # two padding slots
  state, _, new_states = jax.jit(process.next)(process.init(params), round_data, jax.random.key(3),
                                               store.gather(cohort, 5))
  store.scatter(cohort, jax.device_get(new_states), round_data["num_examples"])
  return state, store


@pytest.fixture(scope="module")
def reference(tiny_model, tiny_params):
  return one_round(tiny_model, tiny_params, RUNNERS["sequential"])


@pytest.mark.parametrize("name", sorted(RUNNERS))
def test_every_strategy_gives_the_same_states(name, reference, tiny_model, tiny_params):
  state, store = one_round(tiny_model, tiny_params, RUNNERS[name])
  ref_state, ref_store = reference
  # Same client computations; only the order of the 3-client sums differs (a few ulps times the terms).
  assert_trees_close_to_rounding(state.params, ref_state.params, num_terms=3 + 2)
  assert_trees_close_to_rounding(store.arrays, ref_store.arrays, num_terms=3 + 2)
  touched = [k for k in range(8) if any(np.any(leaf[k] != 0) for leaf in jax.tree.leaves(store.arrays))]
  assert touched == [1, 5, 6]  # the cohort only; padding slots (which gathered client 0's state) never wrote
