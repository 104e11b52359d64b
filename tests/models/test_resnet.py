"""Tests for fedjax_lite.models.resnet: the reference's parameter count, GroupNorm and pooling against flax's,
the stride-2 stem, and a training step in a rolled loop with only canonical (fast on XLA:CPU) convolutions."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lite.core.model import masked_loss_and_metric_sums
from fedjax_lite.models.adapter import from_flax
from fedjax_lite.models import (
    ResNetGN,
    cifar100_resnet18,
    group_norm,
    max_pool_3x3_stride2_same,
    non_canonical_convolutions,
)
from fedjax_lite.models.resnet import _same_padding_stride2


def conv_params(kernel: int, inputs: int, outputs: int) -> int:
  return kernel * kernel * inputs * outputs  # no bias (use_bias=False in the reference)


def test_parameter_count_of_the_reference_resnet18():
  # Derived from TFF simulation/baselines/cifar100/resnet_models.py, create_resnet18(input_shape=(24, 24, 3),
  # num_classes=100): 7x7 stem conv (64); basic blocks [2, 2, 2, 2] of two 3x3 convs each; a 1x1 shortcut conv
  # where the width changes (64->128, 128->256, 256->512); GroupNormalization has no weights
  # (simulation/models/group_norm.py: no scale, no offset); Dense(100) with bias.
  expected = conv_params(7, 3, 64)
  width = 64
  for stage, out in enumerate((64, 128, 256, 512)):
    expected += conv_params(3, width, out) + conv_params(3, out, out)  # first block
    if out != width:
      expected += conv_params(1, width, out)
    expected += 2 * conv_params(3, out, out)  # second block
    width = out
  expected += 512 * 100 + 100
  assert expected == 11_218_212
  shapes = jax.eval_shape(cifar100_resnet18().init, jax.random.key(0))
  assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes)) == expected


def test_group_norm_matches_flax_without_scale_and_offset():
  x = np.random.default_rng(0).standard_normal((2, 3, 3, 6)).astype(np.float32) * 3 + 1
  reference = nn.GroupNorm(num_groups=2, epsilon=1e-3, use_scale=False, use_bias=False)
  expected = reference.apply({}, x)
  # Same math, different reduction order: float32 rounding of a mean over 27 terms, a few ulps of O(1) values.
  np.testing.assert_allclose(np.asarray(group_norm(x)), np.asarray(expected), atol=1e-5)
  with pytest.raises(ValueError, match="multiple of groups"):
    group_norm(np.zeros((1, 2, 2, 3), np.float32))


@pytest.mark.parametrize("height, width", [(12, 12), (13, 7), (6, 5), (1, 2)])
def test_max_pool_3x3_stride2_same_equals_reduce_window(height, width):
  x = np.random.default_rng(height).standard_normal((2, height, width, 3)).astype(np.float32)
  expected = nn.max_pool(jnp.asarray(x), (3, 3), strides=(2, 2), padding="SAME")
  np.testing.assert_array_equal(np.asarray(max_pool_3x3_stride2_same(x)), np.asarray(expected))


@pytest.mark.parametrize("height, width", [(24, 24), (23, 8)])
def test_stride2_same_conv_as_padded_stride1_conv(height, width):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, height, width, 3)).astype(np.float32)
  kernel = rng.standard_normal((7, 7, 3, 2)).astype(np.float32)
  numbers = ("NHWC", "HWIO", "NHWC")
  expected = jax.lax.conv_general_dilated(x, kernel, (2, 2), "SAME", dimension_numbers=numbers)
  (_, lo_h, hi_h), (_, lo_w, hi_w) = _same_padding_stride2(height, 7), _same_padding_stride2(width, 7)
  padded = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((lo_h, hi_h), (lo_w, hi_w)), dimension_numbers=numbers)
  # The same dot products of 7*7*3 = 147 terms, summed in another order: float32 error <= 147 eps sum|terms|.
  magnitude = jax.lax.conv_general_dilated(np.abs(x), np.abs(kernel), (2, 2), "SAME", dimension_numbers=numbers)
  bound = 147 * np.finfo(np.float32).eps * np.asarray(magnitude)
  assert np.all(np.abs(np.asarray(padded[:, ::2, ::2]) - np.asarray(expected)) <= bound)


def test_training_steps_in_a_rolled_loop_are_finite_and_use_canonical_convolutions():
  # The builder's blocks, one per stage in two stages (stem, 2 blocks, a widening shortcut): a short compile.
  model = from_flax(ResNetGN(num_classes=5, repetitions=(1, 1), initial_filters=4), np.zeros((1, 8, 8, 3), np.float32))
  params = jax.jit(model.init)(jax.random.key(0))
  rng = np.random.default_rng(0)
  batches = {"x": rng.random((3, 2, 8, 8, 3), dtype=np.float32), "y": rng.integers(0, 5, (3, 2)).astype(np.int32)}
  mask = np.array([True, False])  # a padded slot in every batch
  optimizer = optax.sgd(0.1)

  def train(params, batches):
    def body(step, params):
      batch = jax.tree.map(lambda v: v[step], batches)
      grads = jax.grad(lambda p: masked_loss_and_metric_sums(model, p, batch, mask, None, True)[0])(params)
      return optax.apply_updates(params, optimizer.update(grads, optimizer.init(params))[0])

    return jax.lax.fori_loop(0, 3, body, params)

  compiled = jax.jit(train).lower(params, batches).compile()
  assert non_canonical_convolutions(compiled.as_text()) == []
  final = compiled(params, batches)
  assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(final))
  assert any(float(jnp.max(jnp.abs(a - b))) > 0 for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(params)))


def test_output_shape():
  model = cifar100_resnet18(num_classes=7, input_shape=(24, 24, 3), initial_filters=4)
  params = jax.eval_shape(model.init, jax.random.key(0))
  logits = jax.eval_shape(lambda p: model.apply(p, {"x": jnp.zeros((3, 24, 24, 3))}, None, False), params)
  assert logits.shape == (3, 7)


def test_builder_argument_checks():
  with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
    cifar100_resnet18(num_classes=1)
  with pytest.raises(ValueError, match=r"\(H, W, C\) with H, W >= 4"):
    cifar100_resnet18(input_shape=(24, 24))
  with pytest.raises(ValueError, match="initial_filters must be a positive even int"):
    cifar100_resnet18(initial_filters=3)
