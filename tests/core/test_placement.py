"""Tests for fedjax_lite.core.placement: broadcast, map over clients, federated sum and mean.

Sums and means are checked for exact values on small integer-valued floats (every partial sum is exactly
representable), and ``map_clients`` must give the same values whichever runner strategy executes it.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lite.core.placement import broadcast, federated_mean, federated_sum, map_clients
from fedjax_lite.core.runner import Runner


def client_tree():
  """Three clients' values: a vector leaf and a nested matrix leaf, integer-valued float32."""
  return {
      "w": jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]),
      "inner": {"b": jnp.array([[[1.0, 0.0, -2.0]], [[3.0, 4.0, 2.0]], [[-1.0, 8.0, 6.0]]])},
  }


def test_broadcast_shapes_and_values():
  value = {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.float32(7.0), "c": (jnp.ones(4, jnp.int32),)}
  placed = broadcast(value, 5)
  chex.assert_shape(placed["a"], (5, 2, 3))
  chex.assert_shape(placed["b"], (5,))
  chex.assert_shape(placed["c"][0], (5, 4))
  assert placed["c"][0].dtype == jnp.int32
  for k in range(5):
    chex.assert_trees_all_equal(jax.tree.map(lambda x: x[k], placed), value)


def test_broadcast_one_client():
  placed = broadcast(jnp.array([1.0, 2.0]), 1)
  np.testing.assert_array_equal(placed, [[1.0, 2.0]])


def test_broadcast_under_jit():
  placed = jax.jit(broadcast, static_argnums=1)(jnp.arange(3.0), 4)
  np.testing.assert_array_equal(placed, np.tile(np.arange(3.0), (4, 1)))


@pytest.mark.parametrize("num_clients", [0, -2, 2.0, True, None, "3"])
def test_broadcast_rejects_bad_num_clients(num_clients):
  with pytest.raises((ValueError, TypeError), match="num_clients"):
    broadcast(jnp.zeros(2), num_clients)


def test_broadcast_accepts_numpy_integer():
  assert broadcast(jnp.zeros(2), np.int64(3)).shape == (3, 2)


def test_federated_sum_exact():
  total = federated_sum(client_tree())
  chex.assert_trees_all_equal(
      total, {"w": jnp.array([9.0, 12.0]), "inner": {"b": jnp.array([[3.0, 12.0, 6.0]])}}
  )


def test_federated_mean_unweighted_exact():
  mean = federated_mean(client_tree())
  chex.assert_trees_all_equal(mean, {"w": jnp.array([3.0, 4.0]), "inner": {"b": jnp.array([[1.0, 4.0, 2.0]])}})


def test_federated_mean_weighted_exact():
  # weights 1, 1, 2 (total 4): w -> [1 + 3 + 10, 2 + 4 + 12] / 4 = [3.5, 4.5];
  # b -> [1 + 3 - 2, 0 + 4 + 16, -2 + 2 + 12] / 4 = [0.5, 5.0, 3.0].
  mean = federated_mean(client_tree(), jnp.array([1.0, 1.0, 2.0]))
  chex.assert_trees_all_equal(mean, {"w": jnp.array([3.5, 4.5]), "inner": {"b": jnp.array([[0.5, 5.0, 3.0]])}})


def test_federated_mean_integer_weights_and_zero_weight_client():
  # A zero-weight client does not count at all, even with a huge value.
  values = jnp.array([[2.0], [1e30], [6.0]])
  mean = federated_mean(values, jnp.array([1, 0, 3], jnp.int32))
  np.testing.assert_array_equal(mean, [5.0])  # (2 + 18) / 4


def test_federated_mean_equal_weights_is_unweighted_mean():
  tree = client_tree()
  chex.assert_trees_all_close(federated_mean(tree, jnp.full(3, 2.5)), federated_mean(tree), rtol=1e-6)


def test_federated_mean_keeps_dtype():
  values = {"h": jnp.array([[1.0, 3.0], [3.0, 5.0]], jnp.bfloat16)}
  mean = federated_mean(values, jnp.array([1.0, 1.0]))
  assert mean["h"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(mean["h"], np.float32), [2.0, 4.0])


def test_federated_ops_under_jit():
  tree = client_tree()
  weights = jnp.array([1.0, 1.0, 2.0])
  chex.assert_trees_all_equal(jax.jit(federated_sum)(tree), federated_sum(tree))
  chex.assert_trees_all_equal(jax.jit(federated_mean)(tree, weights), federated_mean(tree, weights))


def client_fn(params, data):
  """A toy client computation with a nonlinearity and a reduction, returning a pytree."""
  prediction = jnp.tanh(data["x"] @ params["w"] + params["b"])
  return {"loss": jnp.mean((prediction - data["y"]) ** 2), "grad_b": jnp.sum(prediction - data["y"])}


@pytest.mark.parametrize("num_clients", [1, 5])
def test_map_clients_strategies_agree(num_clients):
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=3).astype(np.float32), "b": np.float32(0.5)}
  data = {"x": rng.normal(size=(num_clients, 4, 3)).astype(np.float32),
          "y": rng.normal(size=(num_clients, 4)).astype(np.float32)}
  client_params = broadcast(params, num_clients)
  expected = jax.vmap(client_fn)(client_params, data)
  chex.assert_shape(expected["loss"], (num_clients,))
  # chunk_size 2 does not divide 5 clients: the remainder chunk must be handled too.
  for runner in (Runner("vmap"), Runner("sequential"), Runner("chunked", chunk_size=2), Runner("auto"), None):
    actual = jax.jit(lambda p, d, runner=runner: map_clients(client_fn, p, d, runner=runner))(client_params, data)
    chex.assert_trees_all_close(actual, expected, rtol=1e-6, atol=1e-6)
  # And each slot is the function applied to that client alone.
  one_client = jax.jit(client_fn)
  alone = [one_client(params, jax.tree.map(lambda x, k=k: x[k], data)) for k in range(num_clients)]
  chex.assert_trees_all_close(expected, jax.tree.map(lambda *xs: jnp.stack(xs), *alone), rtol=1e-6, atol=1e-6)


def test_map_clients_four_part_round():
  # broadcast -> map -> mean: the placement helpers compose into a hand-written round.
  params = jnp.array([1.0, -1.0])
  client_data = jnp.array([[1.0, 1.0], [2.0, 0.0], [0.0, 4.0]])
  client_params = broadcast(params, 3)
  deltas = map_clients(lambda p, x: x - p, client_params, client_data, runner=Runner("sequential"))
  np.testing.assert_array_equal(deltas, [[0.0, 2.0], [1.0, 1.0], [-1.0, 5.0]])
  np.testing.assert_array_equal(federated_mean(deltas, jnp.array([2.0, 1.0, 1.0])), [0.0, 2.5])
