"""FedAvg written by hand with the placement helpers, in the tutorial's four parts, equals the library's."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

from fedjax_lite.algorithms.fed_avg import fed_avg
from fedjax_lite.algorithms.local_training import train_locally
from fedjax_lite.core.packing import pack_clients
from fedjax_lite.core.placement import broadcast, federated_mean, map_clients
from fedjax_lite.core.runner import Runner, client_mesh
from tests.tolerances import assert_trees_close_to_rounding


@pytest.mark.parametrize("strategy, mesh_devices", [("vmap", None), ("sequential", None), ("sequential", 1)],
                         ids=["vmap", "sequential", "sequential_mesh1"])
def test_handwritten_fed_avg_equals_library(population, tiny_model, tiny_params, strategy, mesh_devices):
  round_data = pack_clients(population, [0, 1, 2, 3], batch_size=4, num_epochs=2)
  # An explicit mesh, even of one device, deals the clients to its devices by size: another summation order.
  runner = Runner(strategy=strategy, mesh=None if mesh_devices is None else client_mesh(mesh_devices))
  num_clients = 4
  client_optimizer, server_optimizer = optax.sgd(0.1), optax.sgd(1.0)

  def client_update(params, client_data, rng):
    final, sums = train_locally(tiny_model, client_optimizer, params, client_data, rng)
    return jax.tree.map(jnp.subtract, params, final), sums["num_examples"].astype(jnp.float32)

  @jax.jit
  def handwritten_round(params, opt_state, round_data, rng):
    train_rng = jax.random.split(rng)[0]  # the library splits the round key into (train, aggregator)
    client_rngs = jax.vmap(lambda k: jax.random.fold_in(train_rng, k))(jnp.arange(num_clients))
    client_params = broadcast(params, num_clients)                                          # 1. broadcast
    deltas, weights = map_clients(client_update, client_params, round_data, client_rngs,    # 2. client work
                                  runner=runner)
    delta = federated_mean(deltas, weights)                                                 # 3. aggregation
    updates, opt_state = server_optimizer.update(delta, opt_state, params)                  # 4. server update
    return optax.apply_updates(params, updates), opt_state

  params, _ = handwritten_round(tiny_params, server_optimizer.init(tiny_params), round_data, jax.random.key(7))
  process = fed_avg(tiny_model, client_optimizer=client_optimizer, server_optimizer=server_optimizer,
                    runner=runner)
  state, _, _ = jax.jit(process.next)(process.init(tiny_params), round_data, jax.random.key(7))
  if strategy == "sequential" and runner.resolved_mesh() is None:
    # One scan on one device sums in slot order, like federated_mean: bit for bit. (With several host devices
    # the default runner adds the devices' partial sums: the rounding bound below.)
    chex.assert_trees_all_equal(params, state.params)
  else:
    # A mesh sums the clients in its by-size order (and adds the devices' partial sums), and under vmap XLA may fuse
    # the library's masked sum
    # differently (multiply-add contraction): a different float32 summation order of the 4 clients' weighted
    # deltas, then a division and the server step. Bound: a few ulps times the terms, at the parameters' scale.
    assert_trees_close_to_rounding(state.params, params, num_terms=num_clients + 2)
