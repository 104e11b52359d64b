"""Tests for fedjax_lite.models.zoo: parameter counts, shapes, input forms, dropout, argument checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lite.core.model import Model, masked_loss_and_metric_sums
from fedjax_lite.models import (
    MLP,
    CNNDropout,
    DenseSoftmax,
    OriginalFedAvgCNN,
    cnn_dropout,
    dense_softmax,
    mlp,
    original_fedavg_cnn,
)

BUILDERS = {
    "dense_softmax": dense_softmax,
    "mlp": mlp,
    "original_fedavg_cnn": original_fedavg_cnn,
    "cnn_dropout": cnn_dropout,
}


def jitted_apply(model: Model):
  """``model.apply`` under one jit (``train`` static), so a check compiles one program instead of every op."""
  return jax.jit(model.apply, static_argnums=3)


def num_params(model: Model) -> int:
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))


@pytest.mark.parametrize(
    "builder, num_classes, expected",
    [
        (original_fedavg_cnn, 10, 1_663_370),
        (original_fedavg_cnn, 62, 1_690_046),
        (cnn_dropout, 10, 1_199_882),
        (dense_softmax, 10, 7_850),
        (mlp, 10, 199_210),  # McMahan et al.'s 2NN on MNIST
    ],
)
def test_parameter_counts(builder, num_classes, expected):
  assert num_params(builder(num_classes=num_classes)) == expected


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("input_shape", [(28, 28, 1), (28, 28), (8, 8, 1), (8, 8)])
def test_output_shapes(name, input_shape):
  model = BUILDERS[name](num_classes=7, input_shape=input_shape)
  params = jax.eval_shape(model.init, jax.random.key(0))
  for images_shape in [(5, 28, 28, 1), (5, 28, 28)] if input_shape[0] == 28 else [(5, 8, 8, 1), (5, 8, 8)]:
    images = jax.ShapeDtypeStruct(images_shape, jnp.float32)
    logits = jax.eval_shape(model.apply, params, {"x": images}, None, False)
    assert logits.shape == (5, 7)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_channel_axis_is_optional_on_digits_shape(name):
  model = BUILDERS[name](num_classes=7, input_shape=(8, 8, 1))
  params = jax.jit(model.init)(jax.random.key(0))
  images = jax.random.uniform(jax.random.key(1), (5, 8, 8, 1))
  with_channel, without_channel = jax.jit(
      lambda p, x: (model.apply(p, {"x": x}, None, False), model.apply(p, {"x": x[..., 0]}, None, False))
  )(params, images)
  assert with_channel.shape == (5, 7)
  np.testing.assert_allclose(with_channel, without_channel, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_gradient_step_on_digits_shape(name):
  model = BUILDERS[name](num_classes=10, input_shape=(8, 8))
  params = jax.jit(model.init)(jax.random.key(0))
  batch = {"x": jax.random.uniform(jax.random.key(1), (4, 8, 8)), "y": jnp.array([0, 1, 2, 3])}
  mask = jnp.array([True, True, True, False])

  def loss(p):
    return masked_loss_and_metric_sums(model, p, batch, mask, jax.random.key(2), True)[0]

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  assert np.isfinite(float(value))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_integer_inputs_are_cast():
  model = original_fedavg_cnn(input_shape=(8, 8, 1))
  params = jax.jit(model.init)(jax.random.key(0))
  pixels = jax.random.randint(jax.random.key(1), (2, 8, 8, 1), 0, 16)
  apply = jitted_apply(model)
  np.testing.assert_allclose(
      apply(params, {"x": pixels}, None, False), apply(params, {"x": pixels.astype(jnp.float32)}, None, False)
  )


def test_cnn_dropout_is_random_in_training_and_deterministic_in_eval():
  model = cnn_dropout(num_classes=10, input_shape=(8, 8, 1))
  params = jax.jit(model.init)(jax.random.key(0))
  batch = {"x": jax.random.uniform(jax.random.key(1), (3, 8, 8, 1))}
  apply = jitted_apply(model)
  train_a = apply(params, batch, jax.random.key(10), True)
  train_b = apply(params, batch, jax.random.key(11), True)
  train_a_again = apply(params, batch, jax.random.key(10), True)
  assert not np.allclose(train_a, train_b)
  np.testing.assert_array_equal(train_a, train_a_again)
  eval_a = apply(params, batch, jax.random.key(10), False)
  eval_b = apply(params, batch, None, False)
  np.testing.assert_array_equal(eval_a, eval_b)
  assert not np.allclose(eval_a, train_a)


def test_dense_softmax_starts_uniform():
  model = dense_softmax()
  params = jax.jit(model.init)(jax.random.key(0))
  logits = jitted_apply(model)(params, {"x": jnp.ones((2, 28, 28, 1))}, None, False)
  np.testing.assert_array_equal(logits, jnp.zeros((2, 10)))


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_classes=1), "num_classes"),
        (dict(num_classes=10.0), "num_classes"),
        (dict(num_classes=True), "num_classes"),
        (dict(input_shape=(28, 0, 1)), "input_shape"),
        (dict(input_shape=()), "input_shape"),
        (dict(input_shape=28), "input_shape"),
    ],
)
def test_builders_reject_bad_arguments(name, kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    BUILDERS[name](**kwargs)


@pytest.mark.parametrize(
    "builder, input_shape",
    [(original_fedavg_cnn, (3, 8, 1)), (original_fedavg_cnn, (28, 28, 1, 1)), (cnn_dropout, (5, 5)),
     (cnn_dropout, (784,))],
)
def test_image_builders_reject_unusable_input_shapes(builder, input_shape):
  with pytest.raises(ValueError, match="input_shape"):
    builder(input_shape=input_shape)


@pytest.mark.parametrize("hidden", [(), (200, 0), 200, (2.5,)])
def test_mlp_rejects_bad_hidden(hidden):
  with pytest.raises((ValueError, TypeError), match="hidden"):
    mlp(hidden=hidden)


@pytest.mark.parametrize("module_cls", [DenseSoftmax, MLP, OriginalFedAvgCNN, CNNDropout])
def test_modules_reject_bad_num_classes(module_cls):
  with pytest.raises(ValueError, match="num_classes"):
    module_cls(num_classes=0)


def test_mlp_module_rejects_bad_hidden():
  with pytest.raises(ValueError, match="hidden"):
    MLP(hidden=(0,))


def test_image_models_reject_flat_inputs():
  model = original_fedavg_cnn(input_shape=(8, 8, 1))
  params = jax.eval_shape(model.init, jax.random.key(0))
  with pytest.raises(ValueError, match="inputs"):
    jax.eval_shape(model.apply, params, {"x": jnp.ones((2, 64))}, None, False)
