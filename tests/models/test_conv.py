"""Tests for fedjax_lite.models.conv (and the HLO guard of fedjax_lite.models.hlo).

Numerical tolerance: relative 1e-5, i.e. ``|actual - expected| <= 1e-5 * (|expected| + max|expected|)`` elementwise
(the max term keeps entries near zero from demanding more than float32 can give). In practice the canonical
backward is bit-identical to JAX's autodiff on XLA:CPU.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fedjax_lite.models import Conv, conv2d_canonical, convolution_instructions, max_pool_2x2, non_canonical_convolutions

RTOL = 1e-5


def assert_close(actual, expected, rtol=RTOL):
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape
  scale = float(np.max(np.abs(expected))) if expected.size else 0.0
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def assert_trees_close(actual, expected, rtol=RTOL):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert_close(a, e, rtol)


def plain_conv(inputs, kernel, padding):
  return lax.conv_general_dilated(inputs, kernel, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


PADDINGS = ["SAME", "VALID", ((1, 2), (0, 3)), ((-1, 2), (2, -1))]
KERNELS = [(3, 3), (4, 4), (2, 5)]


def value_and_input_kernel_grads(conv, padding):
  """A jitted ``(x, w) -> (conv(x, w), d/dx, d/dw of sum(sin(conv(x, w))))``: one compile per check, not per op."""

  def run(inputs, kernel):
    objective = lambda x, w: jnp.sum(jnp.sin(conv(x, w, padding)))
    return conv(inputs, kernel, padding), jax.grad(objective, argnums=(0, 1))(inputs, kernel)

  return jax.jit(run)


@pytest.mark.parametrize("padding", PADDINGS, ids=["same", "valid", "explicit", "negative"])
@pytest.mark.parametrize("kernel_hw", KERNELS, ids=["3x3", "4x4", "2x5"])
def test_conv2d_canonical_value_and_gradients_match_lax(padding, kernel_hw):
  inputs = jax.random.normal(jax.random.key(0), (2, 9, 8, 3))
  kernel = jax.random.normal(jax.random.key(1), kernel_hw + (3, 5))
  actual = value_and_input_kernel_grads(conv2d_canonical, padding)(inputs, kernel)
  expected = value_and_input_kernel_grads(plain_conv, padding)(inputs, kernel)
  assert_trees_close(actual, expected)


def test_conv2d_canonical_second_order_reverse_mode_matches_lax():
  inputs = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))

  def grad_norm(conv):
    inner = jax.grad(lambda x, w: jnp.sum(jnp.tanh(conv(x, w, "SAME"))), argnums=1)
    return jax.jit(jax.grad(lambda x, w: jnp.sum(inner(x, w) ** 2), argnums=(0, 1)))(inputs, kernel)

  assert_trees_close(grad_norm(conv2d_canonical), grad_norm(plain_conv))


def test_conv2d_canonical_under_jit_and_vmap():
  inputs = jax.random.normal(jax.random.key(0), (3, 2, 7, 7, 2))
  kernels = jax.random.normal(jax.random.key(1), (3, 3, 3, 2, 4))
  actual = jax.jit(jax.vmap(lambda x, w: conv2d_canonical(x, w, "SAME")))(inputs, kernels)
  expected = jax.jit(lambda xs, ws: jnp.stack([plain_conv(x, w, "SAME") for x, w in zip(xs, ws)]))(inputs, kernels)
  assert_close(actual, expected)


def module_value_and_grads(module):
  """A jitted ``(params, x) -> (module(x), d/dparams, d/dx of sum(sin(module(x))))``."""

  def run(params, inputs):
    objective = lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))
    return module.apply(params, inputs), jax.grad(objective, argnums=(0, 1))(params, inputs)

  return jax.jit(run)


@pytest.mark.parametrize("padding", ["SAME", "VALID", ((2, 0), (1, 1))], ids=["same", "valid", "explicit"])
@pytest.mark.parametrize("kernel_size", [(3, 3), (4, 4), (5, 2)], ids=["3x3", "4x4", "5x2"])
@pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "nobias"])
def test_conv_module_matches_flax_conv(padding, kernel_size, use_bias):
  inputs = jax.random.normal(jax.random.key(0), (2, 8, 9, 3))
  reference = nn.Conv(6, kernel_size, padding=padding, use_bias=use_bias)
  ours = Conv(6, kernel_size, padding=padding, use_bias=use_bias)
  params = reference.init(jax.random.key(1), inputs)
  if use_bias:  # a non-zero bias, so that adding it is checked too
    params = jax.tree.map(lambda p: p + 0.1, params)
  assert jax.tree.map(jnp.shape, jax.eval_shape(ours.init, jax.random.key(1), inputs)) == jax.tree.map(
      jnp.shape, params
  )
  assert_trees_close(module_value_and_grads(ours)(params, inputs), module_value_and_grads(reference)(params, inputs))


def test_conv_module_default_initializers_match_flax():
  inputs = jnp.ones((1, 6, 6, 2))
  ours = jax.jit(Conv(4, (3, 3)).init)(jax.random.key(7), inputs)
  theirs = jax.jit(nn.Conv(4, (3, 3)).init)(jax.random.key(7), inputs)
  assert_trees_close(ours, theirs, rtol=0.0)


@pytest.mark.parametrize(
    "kwargs, input_shape",
    [
        (dict(features=4, kernel_size=(3, 3), strides=2), (2, 9, 9, 3)),
        (dict(features=4, kernel_size=(3, 3), kernel_dilation=2), (2, 9, 9, 3)),
        (dict(features=4, kernel_size=(3, 3), input_dilation=(2, 1), padding=((1, 1), (2, 0))), (2, 5, 5, 3)),
        (dict(features=4, kernel_size=(3, 3), feature_group_count=2), (2, 7, 7, 4)),
        (dict(features=4, kernel_size=(3,)), (2, 9, 3)),
        (dict(features=4, kernel_size=(3,), padding="CAUSAL"), (2, 9, 3)),
        (dict(features=4, kernel_size=(3, 3), padding="CIRCULAR"), (2, 6, 6, 3)),
        (dict(features=4, kernel_size=(4, 4), padding="REFLECT"), (2, 6, 6, 3)),
        (dict(features=4, kernel_size=(3, 3)), (6, 6, 3)),  # no batch dim
        (dict(features=4, kernel_size=(3, 3)), (2, 3, 6, 6, 3)),  # two batch dims
    ],
    ids=["strided", "kernel-dilated", "input-dilated", "grouped", "1d", "causal", "circular", "reflect",
         "unbatched", "two-batch-dims"],
)
def test_conv_module_other_cases_match_flax_conv(kwargs, input_shape):
  inputs = jax.random.normal(jax.random.key(0), input_shape)
  reference, ours = nn.Conv(**kwargs), Conv(**kwargs)
  params = jax.tree.map(lambda p: p + 0.1, jax.jit(reference.init)(jax.random.key(1), inputs))
  assert_trees_close(module_value_and_grads(ours)(params, inputs), module_value_and_grads(reference)(params, inputs))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(strides=2), "strides"),
        (dict(strides=(1, 2)), "strides"),
        (dict(dilation=2), "dilation"),
        (dict(feature_group_count=3), "feature_group_count"),
        (dict(padding="CIRCULAR"), "padding"),
        (dict(padding=((1, 1),)), "padding"),
        (dict(padding=((1, 1), (1, 1, 1))), "padding"),
    ],
)
def test_conv2d_canonical_rejects_unsupported_arguments(kwargs, match):
  inputs, kernel = jnp.ones((1, 6, 6, 3)), jnp.ones((3, 3, 3, 3))
  with pytest.raises(ValueError, match=match):
    conv2d_canonical(inputs, kernel, **kwargs)


def test_conv2d_canonical_rejects_bad_shapes():
  with pytest.raises(ValueError, match="inputs"):
    conv2d_canonical(jnp.ones((6, 6, 3)), jnp.ones((3, 3, 3, 3)))
  with pytest.raises(ValueError, match="kernel"):
    conv2d_canonical(jnp.ones((1, 6, 6, 3)), jnp.ones((3, 3, 3)))
  with pytest.raises(ValueError, match="kernel"):
    conv2d_canonical(jnp.ones((1, 6, 6, 3)), jnp.ones((3, 3, 2, 3)))
  with pytest.raises(ValueError, match="padding"):
    conv2d_canonical(jnp.ones((1, 2, 2, 3)), jnp.ones((3, 3, 3, 3)), "VALID")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(features=0, kernel_size=(3, 3)), "features"),
        (dict(features=4, kernel_size=(0, 3)), "kernel_size"),
        (dict(features=4, kernel_size=None), "kernel_size"),
        (dict(features=4, kernel_size=(3, 3), strides=(1,)), "strides"),
        (dict(features=4, kernel_size=(3, 3), kernel_dilation=0), "kernel_dilation"),
        (dict(features=4, kernel_size=(3, 3), feature_group_count=3), "feature_group_count"),
        (dict(features=4, kernel_size=(3, 3), padding="FULL"), "padding"),
    ],
)
def test_conv_module_rejects_bad_arguments(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    Conv(**kwargs)


def test_conv_module_rejects_causal_padding_in_2d():
  with pytest.raises(ValueError, match="CAUSAL"):
    jax.eval_shape(Conv(4, (3, 3), padding="CAUSAL").init, jax.random.key(0), jnp.ones((1, 6, 6, 2)))


# ---------------------------------------------------------------------------------------------------------------
# HLO guard: inside a rolled lax.scan every convolution must stay in XLA:CPU's canonical layout.


class _SmallCNN(nn.Module):
  conv: type

  @nn.compact
  def __call__(self, inputs):
    hidden = nn.relu(self.conv(4, (3, 3), padding="SAME")(inputs))
    hidden = nn.relu(self.conv(6, (3, 3), padding="VALID")(hidden))
    hidden = max_pool_2x2(hidden)
    return nn.Dense(3)(hidden.reshape(hidden.shape[0], -1))


def _compiled_scan_of_sgd_steps(conv_cls) -> str:
  """Optimized HLO of 3 SGD steps of a small CNN in a rolled ``lax.scan``."""
  model = _SmallCNN(conv_cls)
  images = jax.random.normal(jax.random.key(0), (3, 4, 10, 10, 1))  # [steps, batch, H, W, C]
  labels = jnp.zeros((3, 4), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(1), images[0])

  def loss(params, batch):
    logits = model.apply(params, batch[0])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch[1][:, None], axis=1))

  def train(params, images, labels):
    def step(params, batch):
      grads = jax.grad(loss)(params, batch)
      return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), None

    return jax.lax.scan(step, params, (images, labels))[0]

  return jax.jit(train).lower(params, images, labels).compile().as_text()


def test_hlo_guard_all_convolutions_canonical_with_our_conv():
  hlo_text = _compiled_scan_of_sgd_steps(Conv)
  assert "while" in hlo_text  # the scan stayed rolled
  # 2 forward convs + 2 kernel-gradient convs + 1 input-gradient conv (layer 2) per step.
  assert len(convolution_instructions(hlo_text)) >= 5
  assert non_canonical_convolutions(hlo_text) == []


def test_hlo_guard_fails_for_flax_conv():
  hlo_text = _compiled_scan_of_sgd_steps(nn.Conv)
  assert "while" in hlo_text
  assert len(non_canonical_convolutions(hlo_text)) >= 1


def test_non_canonical_convolutions_parses_instruction_lines():
  hlo_text = "\n".join([
      "ENTRY %main {",
      '  %a = f32[2,8,8,4]{3,2,1,0} convolution(%x, %w), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, '
      'metadata={op_name="jit(f)/conv_general_dilated"}',
      "  %b = f32[3,3,2,4]{3,2,1,0} convolution(%x, %dy), window={size=8x8}, dim_labels=f01b_i01o->01bf",
      '  %c = f32[2,8,8,4]{3,2,1,0} add(%a, %a), metadata={op_name="convolution(x)"}',
      "  %d = f32[2,8,8,2]{3,2,1,0} convolution(%dy, %w), window={size=3x3}",
      "}",
  ])
  assert len(convolution_instructions(hlo_text)) == 3
  offending = non_canonical_convolutions(hlo_text)
  assert [line.split(" ")[0] for line in offending] == ["%b", "%d"]
  with pytest.raises(TypeError, match="compiled_hlo_text"):
    non_canonical_convolutions(b"bytes")
