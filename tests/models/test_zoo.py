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



def random_uniform(seed: int, shape) -> np.ndarray:
  """Uniform [0, 1) test data from NumPy (each new shape through eager ``jax.random`` would cost a compile)."""
  return np.random.default_rng(seed).random(shape, dtype=np.float32)


def random_params(model: Model, seed: int = 0, scale: float = 0.1):
  """Random params of the model's shapes, made with NumPy: no init program to compile."""
  leaves, treedef = jax.tree.flatten(jax.eval_shape(model.init, jax.random.key(0)))
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(treedef, [scale * rng.standard_normal(leaf.shape).astype(np.float32) for leaf in leaves])


BUILDERS = {
    "dense_softmax": dense_softmax,
    "mlp": mlp,
    "original_fedavg_cnn": original_fedavg_cnn,
    "cnn_dropout": cnn_dropout,
}


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
    logits = jax.eval_shape(lambda p, x: model.apply(p, {"x": x}, None, False), params, images)
    assert logits.shape == (5, 7)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_digits_shape_forward_input_forms_and_gradient(name):
  """On 8x8x1 (sklearn digits): [B,H,W,C], [B,H,W] and integer inputs agree; a masked training loss has finite
  gradients. One compiled program per model."""
  model = BUILDERS[name](num_classes=10, input_shape=(8, 8, 1))
  params = random_params(model)
  pixels = np.random.default_rng(1).integers(0, 16, (4, 8, 8, 1)).astype(np.int32)
  labels = np.array([0, 1, 2, 3], np.int32)
  mask = np.array([True, True, True, False])

  @jax.jit
  def run(params, pixels):
    images = pixels.astype(jnp.float32)
    logits = model.apply(params, {"x": images}, None, False)
    logits_no_channel = model.apply(params, {"x": images[..., 0]}, None, False)
    logits_from_ints = model.apply(params, {"x": pixels}, None, False)
    loss = lambda p: masked_loss_and_metric_sums(model, p, {"x": images, "y": labels}, mask, jax.random.key(2), True)[0]
    return logits, logits_no_channel, logits_from_ints, jax.value_and_grad(loss)(params)

  logits, logits_no_channel, logits_from_ints, (loss, grads) = run(params, pixels)
  assert logits.shape == (4, 10)
  np.testing.assert_allclose(logits_no_channel, logits, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(logits_from_ints, logits, rtol=1e-6, atol=1e-6)
  assert np.isfinite(float(loss))
  assert all(bool(np.all(np.isfinite(g))) for g in jax.tree.leaves(grads))
  assert any(float(np.max(np.abs(g))) > 0 for g in jax.tree.leaves(grads))


def test_cnn_dropout_is_random_in_training_and_deterministic_in_eval():
  model = cnn_dropout(num_classes=10, input_shape=(8, 8, 1))
  params = random_params(model)
  batch = {"x": random_uniform(1, (3, 8, 8, 1))}

  @jax.jit
  def run(params, batch):
    key_a, key_b = jax.random.key(10), jax.random.key(11)
    return (
        model.apply(params, batch, key_a, True),
        model.apply(params, batch, key_b, True),
        model.apply(params, batch, key_a, True),
        model.apply(params, batch, key_a, False),
        model.apply(params, batch, None, False),
    )

  train_a, train_b, train_a_again, eval_a, eval_b = run(params, batch)
  assert not np.allclose(train_a, train_b)
  np.testing.assert_array_equal(train_a, train_a_again)
  np.testing.assert_array_equal(eval_a, eval_b)
  assert not np.allclose(eval_a, train_a)


def test_dense_softmax_starts_uniform():
  model = dense_softmax()
  logits = jax.jit(lambda key: model.apply(model.init(key), {"x": jnp.ones((2, 28, 28, 1))}, None, False))(
      jax.random.key(0)
  )
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
    jax.eval_shape(lambda p: model.apply(p, {"x": jnp.ones((2, 64))}, None, False), params)
