"""FedSGD: one gradient per client at the server weights, example-weighted, equals a centralized full-batch step."""

from __future__ import annotations

import chex
import jax
import numpy as np
import optax
import pytest

from fedjax_lite.algorithms.fed_sgd import fed_sgd
from fedjax_lite.core.model import masked_loss_and_metric_sums
from fedjax_lite.core.packing import pack_clients


def test_fed_sgd_round_equals_full_batch_gradient_step(population, tiny_model, tiny_params):
  """Weighting each client's mean-loss gradient by its examples gives the gradient of the mean loss over the
  union of the clients' examples, so one round with server SGD(lr) is one full-batch SGD step."""
  indices = [0, 1, 3]
  round_data = pack_clients(population, indices, batch_size=4)
  process = fed_sgd(tiny_model)  # server SGD(0.1), the reference default
  state, metrics, _ = jax.jit(process.next)(process.init(tiny_params), round_data, jax.random.key(0))
  union = {key: np.concatenate([population.client(k)[key] for k in indices]) for key in ("x", "y")}
  size = union["x"].shape[0]

  def loss(p):
    return masked_loss_and_metric_sums(tiny_model, p, union, np.ones(size, bool), None, True)[0]

  expected = jax.tree.map(lambda p, g: p - 0.1 * g, tiny_params, jax.grad(loss)(tiny_params))
  chex.assert_trees_all_close(state.params, expected, atol=1e-6)
  assert int(metrics["client_work"]["train"]["num_examples"]) == size
  assert float(metrics["client_work"]["train"]["loss"]) == pytest.approx(float(loss(tiny_params)), rel=1e-5)


def test_fed_sgd_rejects_nan_client(population, tiny_model, tiny_params):
  round_data = pack_clients(population, [0, 1], batch_size=4)
  poisoned = dict(round_data)
  x = round_data["x"].copy()
  x[0, 0, 0, 0] = np.inf
  poisoned["x"] = x
  process = fed_sgd(tiny_model)
  state, metrics, _ = jax.jit(process.next)(process.init(tiny_params), poisoned, jax.random.key(0))
  only_second = jax.tree.map(lambda a: a[1:], round_data)
  expected, _, _ = jax.jit(process.next)(process.init(tiny_params), only_second, jax.random.key(0))
  assert int(metrics["client_work"]["num_non_finite_clients"]) == 1
  chex.assert_trees_all_close(state.params, expected.params, atol=1e-7)


def test_fed_sgd_bad_arguments(tiny_model):
  with pytest.raises(TypeError, match="server_optimizer"):
    fed_sgd(tiny_model, server_optimizer=0.1)
  with pytest.raises(TypeError, match="model"):
    fed_sgd("model")
  with pytest.raises(TypeError, match="aggregator"):
    fed_sgd(tiny_model, aggregator=optax.sgd(0.1))
