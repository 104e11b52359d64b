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

from fedjax_lite.models import (
    Conv,
    conv2d_canonical,
    convolution_instructions,
    max_pool_2x2,
    non_canonical_convolutions,
)

RTOL = 1e-5


def random_normal(seed: int, shape) -> np.ndarray:
  """Test data from NumPy (each new shape through eager ``jax.random`` would cost a compile of its own)."""
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def random_like(seed: int, tree):
  """A pytree of random float32 arrays with the shapes of ``tree`` (e.g. params from ``jax.eval_shape``)."""
  leaves, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(treedef, [random_normal(seed + i, leaf.shape) for i, leaf in enumerate(leaves)])


def assert_close(actual, expected, rtol=RTOL, context=""):
  """``|actual - expected| <= rtol * (|expected| + max|expected|)`` elementwise."""
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape, context
  scale = float(np.max(np.abs(expected))) if expected.size else 0.0
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale, err_msg=str(context))


def assert_trees_close(actual, expected, rtol=RTOL, context=""):
  assert jax.tree.structure(actual) == jax.tree.structure(expected), context
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert_close(a, e, rtol, context)


def plain_conv(inputs, kernel, padding):
  return lax.conv_general_dilated(inputs, kernel, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def value_and_grads(fn, *args):
  """``(fn(*args), d/d(args) of sum(sin(fn(*args))))``, traced (call it inside a jit)."""
  objective = lambda *a: jnp.sum(jnp.sin(fn(*a)))
  return fn(*args), jax.grad(objective, argnums=tuple(range(len(args))))(*args)


PADDINGS = ["SAME", "VALID", ((1, 2), (0, 3)), ((-1, 2), (2, -1))]  # the last one crops


@pytest.mark.parametrize("kernel_hw", [(3, 3), (4, 4), (2, 5)], ids=["3x3", "4x4", "2x5"])
def test_conv2d_canonical_value_and_gradients_match_lax(kernel_hw):
  inputs = random_normal(0, (2, 9, 8, 3))
  kernel = random_normal(1, kernel_hw + (3, 5))

  @jax.jit
  def both(x, w):  # one compile covers every padding and both implementations
    return [
        (value_and_grads(lambda a, b: conv2d_canonical(a, b, padding), x, w),
         value_and_grads(lambda a, b: plain_conv(a, b, padding), x, w))
        for padding in PADDINGS
    ]

  for padding, (actual, expected) in zip(PADDINGS, both(inputs, kernel)):
    assert_trees_close(actual, expected, context=padding)


def test_conv2d_canonical_second_order_reverse_mode_matches_lax():
  inputs = random_normal(0, (2, 6, 6, 3))
  kernel = random_normal(1, (3, 3, 3, 4))

  def grad_norm_grads(conv, x, w):
    inner = jax.grad(lambda a, b: jnp.sum(jnp.tanh(conv(a, b, "SAME"))), argnums=1)
    return jax.grad(lambda a, b: jnp.sum(inner(a, b) ** 2), argnums=(0, 1))(x, w)

  actual, expected = jax.jit(
      lambda x, w: (grad_norm_grads(conv2d_canonical, x, w), grad_norm_grads(plain_conv, x, w))
  )(inputs, kernel)
  assert_trees_close(actual, expected)


def test_conv2d_canonical_under_vmap():
  inputs = random_normal(0, (3, 2, 7, 7, 2))
  kernels = random_normal(1, (3, 3, 3, 2, 4))
  actual, expected = jax.jit(
      lambda xs, ws: (
          jax.vmap(lambda x, w: conv2d_canonical(x, w, "SAME"))(xs, ws),
          jnp.stack([plain_conv(x, w, "SAME") for x, w in zip(xs, ws)]),
      )
  )(inputs, kernels)
  assert_close(actual, expected)


def test_vmap_with_mapped_kernels_keeps_one_canonical_conv_per_client():
  # vmap over clients, each with its own kernel: values and gradients equal the per-client plain conv, and on CPU
  # the compiled program has no grouped convolution (JAX's own rule would emit feature_group_count=3).
  inputs = random_normal(0, (3, 2, 7, 7, 2))
  kernels = random_normal(1, (3, 3, 3, 2, 4))
  mapped = jax.vmap(lambda x, w: value_and_grads(lambda a, b: conv2d_canonical(a, b, "SAME"), x, w))
  per_client = lambda xs, ws: [value_and_grads(lambda a, b: plain_conv(a, b, "SAME"), x, w) for x, w in zip(xs, ws)]
  actual = jax.jit(mapped)(inputs, kernels)
  expected = jax.jit(per_client)(inputs, kernels)
  assert_trees_close(actual, jax.tree.map(lambda *xs: jnp.stack(xs), *expected))
  hlo_text = jax.jit(mapped).lower(inputs, kernels).compile().as_text()
  assert "feature_group_count" not in hlo_text
  assert len(convolution_instructions(hlo_text)) == 3 * 3  # forward, input- and kernel-gradient, per client
  assert non_canonical_convolutions(hlo_text) == []


def test_vmap_with_shared_kernel_and_nested_vmap():
  inputs = random_normal(2, (2, 3, 1, 6, 6, 2))
  kernel = random_normal(3, (3, 3, 2, 5))
  kernels = random_normal(4, (2, 3, 3, 2, 5))
  shared = jax.jit(jax.vmap(jax.vmap(lambda x: conv2d_canonical(x, kernel, "VALID"))))(inputs)
  assert_close(shared, jnp.stack([jnp.stack([plain_conv(x, kernel, "VALID") for x in row]) for row in inputs]))
  nested = jax.jit(jax.vmap(jax.vmap(lambda x, w: conv2d_canonical(x, w, "SAME"), in_axes=(0, None))))(
      inputs, kernels)
  assert_close(nested, jnp.stack([jnp.stack([plain_conv(x, w, "SAME") for x in row])
                                  for row, w in zip(inputs, kernels)]))


@pytest.mark.parametrize("kernel_size", [(3, 3), (4, 4), (5, 2)], ids=["3x3", "4x4", "5x2"])
def test_conv_module_matches_flax_conv(kernel_size):
  """SAME, VALID and explicit padding, with and without bias: same params, same values, same gradients."""
  inputs = random_normal(0, (2, 8, 9, 3))
  cases = [
      dict(padding=padding, use_bias=use_bias)
      for padding in ("SAME", "VALID", ((2, 0), (1, 1)))
      for use_bias in (True, False)
  ]
  pairs = [(Conv(6, kernel_size, **case), nn.Conv(6, kernel_size, **case)) for case in cases]
  params = []
  for seed, (ours, reference) in enumerate(pairs):
    shapes = jax.eval_shape(reference.init, jax.random.key(0), inputs)
    assert jax.tree.map(jnp.shape, jax.eval_shape(ours.init, jax.random.key(0), inputs)) == jax.tree.map(
        jnp.shape, shapes
    )
    params.append(random_like(10 * seed, shapes))  # random bias too, so that adding it is checked

  @jax.jit
  def both(all_params, x):
    return [
        (value_and_grads(ours.apply, p, x), value_and_grads(reference.apply, p, x))
        for (ours, reference), p in zip(pairs, all_params)
    ]

  for case, (actual, expected) in zip(cases, both(params, inputs)):
    assert_trees_close(actual, expected, context=case)


def test_conv_module_default_initializers_match_flax():
  inputs = jnp.ones((1, 6, 6, 2))
  ours, theirs = jax.jit(lambda key: (Conv(4, (3, 3)).init(key, inputs), nn.Conv(4, (3, 3)).init(key, inputs)))(
      jax.random.key(7)
  )
  assert_trees_close(ours, theirs, rtol=0.0)


FALLBACK_AND_SPECIAL_CASES = [
    (dict(features=4, kernel_size=(3, 3), strides=2), (2, 9, 9, 3)),
    (dict(features=4, kernel_size=(3, 3), kernel_dilation=2), (2, 9, 9, 3)),
    (dict(features=4, kernel_size=(3, 3), input_dilation=(2, 1), padding=((1, 1), (2, 0))), (2, 5, 5, 3)),
    (dict(features=4, kernel_size=(3, 3), feature_group_count=2), (2, 7, 7, 4)),
    (dict(features=4, kernel_size=(3,)), (2, 9, 3)),
    (dict(features=4, kernel_size=(3,), padding="CAUSAL"), (2, 9, 3)),
    (dict(features=4, kernel_size=(3, 3), padding="CIRCULAR"), (2, 6, 6, 3)),
    (dict(features=4, kernel_size=(4, 4), padding="REFLECT"), (2, 6, 6, 3)),
    (dict(features=4, kernel_size=(3, 3), padding=1), (6, 6, 3)),  # no batch dim
    (dict(features=4, kernel_size=(3, 3)), (2, 3, 6, 6, 3)),  # two batch dims
]


def test_conv_module_fallback_and_special_cases_match_flax_conv():
  """Strided, dilated, grouped, 1-D, CAUSAL/CIRCULAR/REFLECT padding, unbatched and 2-batch-dim inputs."""
  pairs = [(Conv(**kwargs), nn.Conv(**kwargs)) for kwargs, _ in FALLBACK_AND_SPECIAL_CASES]
  inputs = [random_normal(seed, shape) for seed, (_, shape) in enumerate(FALLBACK_AND_SPECIAL_CASES)]
  params = [
      random_like(10 * seed, jax.eval_shape(reference.init, jax.random.key(0), x))
      for seed, ((_, reference), x) in enumerate(zip(pairs, inputs))
  ]

  @jax.jit
  def both(all_params, all_inputs):
    return [
        (value_and_grads(ours.apply, p, x), value_and_grads(reference.apply, p, x))
        for (ours, reference), p, x in zip(pairs, all_params, all_inputs)
    ]

  for (kwargs, _), (actual, expected) in zip(FALLBACK_AND_SPECIAL_CASES, both(params, inputs)):
    assert_trees_close(actual, expected, context=kwargs)


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
        (dict(features=4, kernel_size=(3, 3), padding=((1, 1),)), "padding"),
        (dict(features=4, kernel_size=(3, 3), padding=((1, 1), (1, 2, 3))), "padding"),
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
  images = random_normal(0, (3, 4, 10, 10, 1))  # [steps, batch, H, W, C]
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
  assert " while(" in hlo_text  # the scan stayed a rolled while loop
  # 2 forward convs + 2 kernel-gradient convs + 1 input-gradient conv (layer 2) per step.
  assert len(convolution_instructions(hlo_text)) >= 5
  assert non_canonical_convolutions(hlo_text) == []


def test_hlo_guard_fails_for_flax_conv():
  hlo_text = _compiled_scan_of_sgd_steps(nn.Conv)
  assert " while(" in hlo_text
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


@pytest.mark.parametrize("input_hw, kernel_hw, padding", [
    ((4, 4), (5, 5), "SAME"),  # the original FedAvg CNN's second conv on 8x8 digits
    ((2, 3), (5, 3), "SAME"),
    ((6, 6), (5, 5), ((1, 0), (2, 2))),
])
def test_small_outputs_use_patches_and_match_lax(input_hw, kernel_hw, padding):
  """Outputs smaller than the kernel take the im2col path; values and gradients still equal lax's conv."""
  inputs = random_normal(0, (3,) + input_hw + (2,))
  kernel = random_normal(1, kernel_hw + (2, 4))
  pads = padding if isinstance(padding, str) else padding
  ours = jax.jit(lambda x, k: value_and_grads(lambda a, b: conv2d_canonical(a, b, pads), x, k))(inputs, kernel)
  reference = jax.jit(lambda x, k: value_and_grads(lambda a, b: plain_conv(a, b, pads), x, k))(inputs, kernel)
  assert_trees_close(ours, reference)


def test_hlo_guard_tiny_feature_maps_stay_canonical():
  """A 5x5 SAME conv on a 4x4 map in a rolled loop: XLA would swap a plain conv's operands into a slow layout."""
  inputs = random_normal(0, (3, 2, 4, 4, 3))
  kernel = random_normal(1, (5, 5, 3, 4))

  def train(kernel, inputs):
    def step(kernel, batch):
      grad = jax.grad(lambda k: jnp.sum(conv2d_canonical(batch, k, "SAME") ** 2))(kernel)
      return kernel - 0.01 * grad, None

    return jax.lax.scan(step, kernel, inputs)[0]

  hlo_text = jax.jit(train).lower(kernel, inputs).compile().as_text()
  assert " while(" in hlo_text
  assert non_canonical_convolutions(hlo_text) == []
