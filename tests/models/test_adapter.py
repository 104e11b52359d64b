"""Tests for fedjax_lite.models.adapter with non-trainable collections (BatchNorm's batch statistics).

Checked against NumPy: the statistics a training step writes are the momentum average of the batch's mean and
(fast) variance over its REAL examples only; local training carries them from step to step whatever the optimizer
does to them; evaluation normalizes with the stored running averages. Models without other collections keep the
exact params and functions they had.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lite.algorithms.local_training import train_locally
from fedjax_lite.core import param_partition as pp
from fedjax_lite.core.model import (
    masked_loss_and_metric_sums,
    masked_loss_metric_sums_and_state,
    split_model_state,
    with_model_state,
)
from fedjax_lite.models.adapter import from_flax
from fedjax_lite.models.zoo import mlp
from tests.tolerances import float_atol

MOMENTUM = 0.9
EPSILON = 1e-5


class NormFirst(nn.Module):
  """BatchNorm on the raw input (its statistics do not depend on trained weights), then a dense layer."""

  @nn.compact
  def __call__(self, x, train: bool = False, mask=None):
    x = nn.BatchNorm(use_running_average=not train, momentum=MOMENTUM, epsilon=EPSILON, name="norm")(
        x, mask=None if mask is None else mask[:, None])
    return nn.Dense(3, name="dense")(x)


class NoMask(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Dense(3)(nn.BatchNorm(use_running_average=not train)(x))


class NoTrain(nn.Module):

  @nn.compact
  def __call__(self, x, mask=None):
    return nn.Dense(3)(nn.BatchNorm(use_running_average=False)(x, mask=mask))


def bn_model():
  return from_flax(NormFirst(), jnp.zeros((1, 4)))


def data(num_steps=3, batch=6, seed=0):
  rng = np.random.default_rng(seed)
  mask = np.ones((num_steps, batch), bool)
  mask[-1, 4:] = False
  x = (rng.normal(size=(num_steps, batch, 4)) * [1.0, 2.0, 0.5, 3.0] + [0.0, 1.0, -2.0, 5.0]).astype(np.float32)
  x[~mask] = 1e6  # garbage in the padded slots: must not reach the statistics
  return {"x": x, "y": rng.integers(0, 3, (num_steps, batch)).astype(np.int32), "mask": mask,
          "num_examples": np.int32(mask.sum())}


def numpy_stats(x, mask, mean, var):
  """One step of flax's BatchNorm statistics (fast variance E[x^2] - E[x]^2) over the real examples."""
  real = np.asarray(x, np.float64)[np.asarray(mask)]
  batch_mean = real.mean(0)
  batch_var = np.maximum((real ** 2).mean(0) - batch_mean ** 2, 0.0)
  return MOMENTUM * mean + (1 - MOMENTUM) * batch_mean, MOMENTUM * var + (1 - MOMENTUM) * batch_var


def test_batchnorm_module_becomes_a_model_with_state():
  model = bn_model()
  params = model.init(jax.random.key(0))
  assert model.state_collections == ("batch_stats",)
  assert set(params) == {"params", "batch_stats"}
  chex.assert_trees_all_equal(params["batch_stats"], {"norm": {"mean": np.zeros(4, np.float32),
                                                               "var": np.ones(4, np.float32)}})
  trainable, state = split_model_state(model, params)
  assert set(trainable) == {"params"} and set(state) == {"batch_stats"}
  chex.assert_trees_all_equal(with_model_state(model, trainable | {"batch_stats": state["batch_stats"]}, state),
                              params)


def test_existing_models_keep_their_params_and_have_no_state():
  model = mlp(num_classes=3, input_shape=(4,), hidden=(5,))
  params = model.init(jax.random.key(0))
  assert model.state_collections == () and model.train_apply is None
  assert set(params) == {"Dense_0", "Dense_1"}
  assert split_model_state(model, params) == (params, {})
  assert with_model_state(model, params, {}) is params


def test_training_forward_pass_counts_only_real_examples_in_the_statistics():
  model = bn_model()
  params = model.init(jax.random.key(0))
  batch = data()
  x, mask = batch["x"][-1], batch["mask"][-1]
  _, (_, state) = jax.jit(lambda p: masked_loss_metric_sums_and_state(model, p, {"x": x, "y": batch["y"][-1]},
                                                                        mask, None))(params)
  mean, var = numpy_stats(x, mask, np.zeros(4), np.ones(4))
  atol = float_atol(2 * 4, float(np.max(np.abs(x[mask]))) ** 2, ulps=4)
  np.testing.assert_allclose(state["batch_stats"]["norm"]["mean"], mean, rtol=0, atol=atol)
  np.testing.assert_allclose(state["batch_stats"]["norm"]["var"], var, rtol=0, atol=atol)


def test_local_training_carries_the_statistics_whatever_the_optimizer_does():
  model = bn_model()
  params = model.init(jax.random.key(0))
  batch = data()
  # Weight decay and a proximal-style pull would move the statistics if the optimizer's update were kept.
  optimizer = optax.chain(optax.add_decayed_weights(0.5), optax.sgd(0.1, momentum=0.9))
  final, sums = jax.jit(lambda p: train_locally(model, optimizer, p, batch, jax.random.key(1)))(params)
  mean, var = np.zeros(4), np.ones(4)
  for step in range(3):
    mean, var = numpy_stats(batch["x"][step], batch["mask"][step], mean, var)
  atol = float_atol(3 * 2 * 6, float(np.max(np.abs(batch["x"][batch["mask"]]))) ** 2, ulps=4)
  np.testing.assert_allclose(final["batch_stats"]["norm"]["mean"], mean, rtol=0, atol=atol)
  np.testing.assert_allclose(final["batch_stats"]["norm"]["var"], var, rtol=0, atol=atol)
  assert not np.allclose(final["params"]["dense"]["kernel"], params["params"]["dense"]["kernel"])
  assert int(sums["num_examples"]) == 16


def test_evaluation_normalizes_with_the_running_averages():
  model = bn_model()
  params = model.init(jax.random.key(0))
  stats = {"norm": {"mean": jnp.array([0.5, -1.0, 2.0, 0.0]), "var": jnp.array([4.0, 0.25, 1.0, 9.0])}}
  params = with_model_state(model, params, {"batch_stats": stats})
  x = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
  logits = model.apply(params, {"x": x}, None, False)
  dense = params["params"]["dense"]
  normalized = (x - np.asarray(stats["norm"]["mean"])) / np.sqrt(np.asarray(stats["norm"]["var"]) + EPSILON)
  normalized = normalized * np.asarray(params["params"]["norm"]["scale"]) + np.asarray(params["params"]["norm"]["bias"])
  expected = normalized @ np.asarray(dense["kernel"]) + np.asarray(dense["bias"])
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
  # Evaluation does not depend on the rest of the batch (no batch statistics).
  np.testing.assert_array_equal(model.apply(params, {"x": x[:2]}, None, False), logits[:2])


def test_gradients_in_training_use_the_masked_batch_statistics():
  model = bn_model()
  params = model.init(jax.random.key(0))
  batch = data()
  x, y, mask = batch["x"][-1], batch["y"][-1], batch["mask"][-1]
  loss, _ = masked_loss_and_metric_sums(model, params, {"x": x, "y": y}, mask, None, True)
  real_loss, _ = masked_loss_and_metric_sums(model, params, {"x": x[mask], "y": y[mask]}, np.ones(4, bool), None,
                                             True)
  np.testing.assert_allclose(loss, real_loss, rtol=1e-6)


def test_batch_statistics_are_labelled_like_any_parameter():
  model = bn_model()
  params = model.init(jax.random.key(0))
  fedbn = pp.label_params(params, lambda path: "local" if path[0] == "batch_stats" or path[1] == "norm"
                          else "global")
  parts = pp.split_params(params, fedbn)
  assert jax.tree.leaves(parts["global"]["batch_stats"]) == []
  assert set(jax.tree.leaves(pp.label_params(params, "global"))) == {"global"}  # aggregated with the rest
  _, global_stats = split_model_state(model, pp.split_params(params, "global")["global"])
  chex.assert_trees_all_equal(global_stats, {"batch_stats": params["batch_stats"]})


def test_partial_model_keeps_fixed_statistics_fixed():
  model = bn_model()
  params = model.init(jax.random.key(0))
  labels = pp.label_params(params, lambda path: "frozen" if path[0] == "batch_stats" else "global")
  parts = pp.split_params(params, labels)
  partial = pp.partial_model(model, labels, {"frozen": parts["frozen"]})
  final, _ = train_locally(partial, optax.sgd(0.1), parts["global"], data(), jax.random.key(1))
  assert jax.tree.leaves(final["batch_stats"]) == []
  merged = pp.merge_params({"global": final, "frozen": parts["frozen"]}, labels)
  chex.assert_trees_all_equal(merged["batch_stats"], params["batch_stats"])


def test_modules_with_statistics_must_take_train_and_mask():
  with pytest.raises(ValueError, match=r"batch_stats.*`mask`"):
    from_flax(NoMask(), jnp.zeros((1, 4)))
  assert from_flax(NoMask(), jnp.zeros((1, 4)), require_mask=False).state_collections == ("batch_stats",)
  with pytest.raises(ValueError, match="`train`"):
    from_flax(NoTrain(), jnp.zeros((1, 4)))
