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
from fedjax_lite.core.runner import Runner


@pytest.mark.parametrize("strategy, lanes", [("vmap", None), ("sequential", 1), ("sequential", 2)])
def test_handwritten_fed_avg_equals_library(population, tiny_model, tiny_params, strategy, lanes):
  round_data = pack_clients(population, [0, 1, 2, 3], batch_size=4, num_epochs=2)
  runner = Runner(strategy=strategy, lanes=lanes)
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
  state, _ = jax.jit(process.next)(process.init(tiny_params), round_data, jax.random.key(7))
  if strategy == "sequential" and lanes == 1:  # one scan sums in slot order, like federated_mean: bit for bit
    chex.assert_trees_all_equal(params, state.params)
  elif lanes == 2:  # two lanes' partial sums added at the end: a different float32 summation order
    chex.assert_trees_all_close(params, state.params, rtol=1e-6, atol=1e-7)
  else:
    # Same operations, but XLA fuses the masked sum of the library differently from the plain sum here
    # (multiply-add contraction), which can move the last bit of a float32.
    chex.assert_trees_all_close(params, state.params, rtol=2e-7, atol=0)
