"""FedBN against its float64 NumPy re-derivation (``partition_reference.fed_bn_round``): a perceptron with a
batch-norm layer (masked batch statistics, running averages), three rounds of ragged clients; the server's non-BN
parameters and every client's BN layer (affine parameters and running statistics) compared. Exact checks: the BN
layers never leave the clients (bits, server copy unchanged).
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lite import algorithms
from fedjax_lite.core.packing import pack_clients
from fedjax_lite.models.adapter import from_flax
from tests.algorithms import partition_reference as ref
from tests.algorithms.partition_setup import (
    CLIENT_LR,
    COHORTS,
    HIDDEN,
    NUM_CLASSES,
    NUM_CLIENTS,
    NUM_FEATURES,
    assert_close,
    make_setup,
    run_rounds,
)


class BatchNormNet(nn.Module):
  """``logits = head(tanh(norm(body(x))))``, the norm's statistics over the real examples (``mask``)."""

  @nn.compact
  def __call__(self, x, train: bool = False, mask=None):
    h = nn.Dense(HIDDEN, name="body")(x)
    h = nn.BatchNorm(use_running_average=not train, momentum=ref.BN_MOMENTUM, epsilon=ref.BN_EPSILON,
                     name="norm")(h, mask=None if mask is None else mask[:, None])
    return nn.Dense(NUM_CLASSES, name="head")(jnp.tanh(h))


@pytest.fixture(scope="module")
def setup():
  population, _, _, rounds = make_setup()
  model = from_flax(BatchNormNet(), np.zeros((1, NUM_FEATURES), np.float32))
  rng = np.random.default_rng(11)

  def normal(scale, *shape):
    return (scale * rng.normal(size=shape)).astype(np.float32)

  params = {"params": {"body": {"kernel": normal(0.5, NUM_FEATURES, HIDDEN), "bias": normal(0.1, HIDDEN)},
                       "norm": {"scale": 1.0 + normal(0.1, HIDDEN), "bias": normal(0.1, HIDDEN)},
                       "head": {"kernel": normal(0.5, HIDDEN, NUM_CLASSES), "bias": normal(0.1, NUM_CLASSES)}},
            "batch_stats": {"norm": {"mean": normal(0.1, HIDDEN), "var": 1.0 + np.abs(normal(0.1, HIDDEN))}}}
  return model, params, rounds


def global_part(params):
  p = params["params"]
  return {"W1": p["body"]["kernel"], "b1": p["body"]["bias"], "W2": p["head"]["kernel"], "b2": p["head"]["bias"]}


def local_part(params, index=None):
  pick = (lambda x: x) if index is None else (lambda x: x[index])
  return {"gamma": pick(params["params"]["norm"]["scale"]), "beta": pick(params["params"]["norm"]["bias"]),
          "mean": pick(params["batch_stats"]["norm"]["mean"]), "var": pick(params["batch_stats"]["norm"]["var"])}


def test_batch_norm_labels_make_the_norm_layer_local(setup):
  model, params, _ = setup
  labels = algorithms.batch_norm_labels(model)
  assert labels["batch_stats"] == {"norm": {"mean": "local", "var": "local"}}
  assert labels["params"]["norm"] == {"scale": "local", "bias": "local"}
  assert labels["params"]["body"] == {"kernel": "global", "bias": "global"}
  with pytest.raises(ValueError, match="no state collections"):
    algorithms.fed_bn(make_setup()[1], client_learning_rate=CLIENT_LR)


def test_fed_bn_equals_its_numpy_rederivation(setup):
  model, params, rounds = setup
  process = algorithms.fed_bn(model, client_learning_rate=CLIENT_LR)
  state, store, _ = run_rounds(process, params, rounds)
  server = ref.as_float64(global_part(params))
  local = {c: ref.as_float64(local_part(params)) for c in range(NUM_CLIENTS)}
  for cohort, round_data in zip(COHORTS, rounds):
    server = ref.fed_bn_round(server, local, {k: np.asarray(v) for k, v in round_data.items()}, cohort,
                              learning_rate=CLIENT_LR)
  assert_close(global_part(state.params), server, "server")
  for client in range(NUM_CLIENTS):
    assert_close(local_part(store.arrays, client), local[client], f"BN layer of client {client}")


def test_the_batch_norm_layers_never_leave_the_clients(setup):
  model, params, rounds = setup
  process = algorithms.fed_bn(model, client_learning_rate=CLIENT_LR)
  state, store, metrics = run_rounds(process, params, rounds)
  # The server's copy of the BN layer is the initial one, bit for bit; only the non-BN parameters travel.
  chex.assert_trees_all_equal(local_part(state.params), local_part(params))
  global_size = sum(np.size(v) for v in global_part(params).values())
  for r, cohort in enumerate(COHORTS):
    assert int(metrics[r]["broadcasted_bits"]) == len(cohort) * (32 * global_size + 32)  # and the learning rate
    assert int(metrics[r]["aggregated_bits"]) == len(cohort) * (32 * global_size + 32)  # and the weight
  # Clients that trained hold their own statistics; client 0 and client 4 differ.
  means = store.arrays["batch_stats"]["norm"]["mean"]
  assert not np.allclose(means[0], means[4])


def test_personalized_evaluation_reads_each_clients_own_statistics(setup):
  """In evaluation the BN layer uses the client's running averages and affine parameters (the paper's setting)."""
  model, params, rounds = setup
  process = algorithms.fed_bn(model, client_learning_rate=CLIENT_LR)
  state, store, _ = run_rounds(process, params, rounds)
  population = make_setup()[0]
  eval_data = pack_clients(population, np.arange(NUM_CLIENTS), batch_size=4, cohort_size=8, shuffle=False)
  result = algorithms.personalized_evaluation(model)(state.params, store.gather(np.arange(NUM_CLIENTS), 8), eval_data)
  server = ref.as_float64(global_part(state.params))
  for client in range(NUM_CLIENTS):
    for name, bn in (("personalized", local_part(store.arrays, client)), ("global", local_part(state.params))):
      p = {**server, **ref.as_float64(bn)}
      real = eval_data["mask"][client].astype(bool)
      x = np.asarray(eval_data["x"][client], np.float64)[real]
      y = np.asarray(eval_data["y"][client])[real]
      u = p["gamma"] * (x @ p["W1"] + p["b1"] - p["mean"]) / np.sqrt(p["var"] + ref.BN_EPSILON) + p["beta"]
      z = np.tanh(u) @ p["W2"] + p["b2"]
      z = z - z.max(axis=1, keepdims=True)
      loss = np.mean(-(z - np.log(np.exp(z).sum(axis=1, keepdims=True)))[np.arange(len(y)), y])
      # float32 inference of a 4-4-4 network: tens of roundings per term; 1e-5 relative holds with margin.
      np.testing.assert_allclose(result[name]["per_client"]["loss"][client], loss, rtol=1e-5,
                                 err_msg=f"{name} loss of client {client}")
