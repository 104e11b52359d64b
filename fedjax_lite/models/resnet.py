"""ResNet-18 with GroupNorm for CIFAR-100, as the reference's baseline builds it.

Where this sits: :func:`cifar100_resnet18` returns a :class:`fedjax_lite.core.model.Model` for an algorithm, like
:mod:`fedjax_lite.models.zoo`. Batch normalization's running statistics do not fit federated averaging, so the
normalization is GroupNorm (Hsieh, Phanishayee, Mutlu, Gibbons, "The Non-IID Data Quagmire of Decentralized
Machine Learning", ICML 2020; used by Reddi et al., ICLR 2021, on 24x24 crops of CIFAR-100).

The architecture is TFF's ``simulation/baselines/cifar100/resnet_models.py`` ``create_resnet18`` (ResNet v2,
pre-activation, basic blocks [2, 2, 2, 2]), with its particulars kept so that parameter counts and learning curves
are comparable:

* stem: 7x7/2 conv (64, no bias, ``he_normal``), GroupNorm, ReLU, 3x3/2 'same' max-pool;
* every stage runs at stride 1 (the reference never passes a stride to its stages), so a 24x24 crop is 6x6 from
  the stem to the end; a stage's first block widens the channels, with a 1x1 conv + GroupNorm shortcut;
* GroupNorm is the reference's own layer: 2 groups, epsilon 1e-3, and no scale or offset (no parameters);
* head: GroupNorm, ReLU, global average pool, dense ``num_classes`` (kernel ``N(0, 0.01^2)``, zero bias). The
  reference puts a softmax in the model; here the loss works on logits (same function).

11,218,212 parameters for 100 classes. Not reproduced: the reference's L2 kernel regularizer (1e-4 on every conv
and dense kernel, added to the loss); use ``optax.add_decayed_weights(2e-4)`` in the client optimizer for the
same gradient.

Speed on XLA:CPU inside rolled loops: every convolution goes through :class:`fedjax_lite.models.conv.Conv`'s
canonical path (stride 1; the stem's stride-2 conv is computed as a stride-1 conv with the stride-2 'same' padding,
subsampled), and the 3x3/2 max-pool is written with reshapes and elementwise maxima (no ``reduce_window``, whose
gradient is slow there; ``docs/xla_cpu.md``).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_lite.core.model import Model
from fedjax_lite.models.adapter import from_flax
from fedjax_lite.models.conv import Conv
from fedjax_lite.models.zoo import _check_input_shape, _check_num_classes

_HE_NORMAL = nn.initializers.he_normal()


def group_norm(x: jax.Array, groups: int = 2, epsilon: float = 1e-3) -> jax.Array:
  """The reference's GroupNorm without parameters on ``[B, H, W, C]``.

  Channels are split into ``groups`` contiguous groups; each example's group is normalized by its own mean and
  (biased) variance over ``H, W`` and the group's channels: ``(x - mean) / sqrt(var + epsilon)`` (Wu & He, ECCV
  2018). No statistics across the batch, so padded examples cannot affect real ones.
  """
  batch, height, width, channels = x.shape
  if channels % groups:
    raise ValueError(f"the number of channels ({channels}) must be a multiple of groups ({groups}).")
  grouped = x.reshape(batch, height, width, groups, channels // groups)
  mean = jnp.mean(grouped, axis=(1, 2, 4), keepdims=True)
  variance = jnp.mean(jnp.square(grouped - mean), axis=(1, 2, 4), keepdims=True)
  return ((grouped - mean) * jax.lax.rsqrt(variance + epsilon)).reshape(x.shape)


def _same_padding_stride2(size: int, window: int) -> tuple[int, int, int]:
  """TF/XLA 'SAME' for stride 2: output ``ceil(size / 2)``, total padding split ``lo = total // 2``."""
  out = -(-size // 2)
  total = max((out - 1) * 2 + window - size, 0)
  return out, total // 2, total - total // 2


def max_pool_3x3_stride2_same(x: jax.Array) -> jax.Array:
  """``nn.max_pool(x, (3, 3), (2, 2), 'SAME')`` on ``[B, H, W, C]``, without ``reduce_window``.

  The max is separable, so rows then columns: along an axis padded (with the dtype's lowest value) to
  ``2 out + 1``, window ``j`` covers entries ``2j, 2j+1, 2j+2``: the max of a stride-2 pair (a reshape) and the
  next pair's first entry (a strided slice). Gradients are elementwise; ties split the gradient equally (see
  :mod:`fedjax_lite.models.pooling`).
  """

  def pool_axis(values, axis):
    size = values.shape[axis]
    out, lo, _ = _same_padding_stride2(size, 3)
    hi = 2 * out + 1 - size - lo
    pads = [(0, 0)] * values.ndim
    pads[axis] = (lo, hi)
    padded = jnp.pad(values, pads, constant_values=jnp.finfo(values.dtype).min)
    pairs = jax.lax.slice_in_dim(padded, 0, 2 * out, axis=axis)
    pairs = pairs.reshape(values.shape[:axis] + (out, 2) + values.shape[axis + 1 :])
    pair_max = jnp.max(pairs, axis=axis + 1)
    following = jax.lax.slice_in_dim(padded, 2, 2 * out + 1, stride=2, axis=axis)
    return jnp.maximum(pair_max, following)

  return pool_axis(pool_axis(x, 1), 2)


class BasicBlock(nn.Module):
  """Pre-activation basic block: ``[GN, ReLU,] conv3x3, GN, ReLU, conv3x3`` plus the shortcut (identity, or 1x1
  conv + GN when the width changes)."""

  features: int
  normalize_first: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    residual = nn.relu(group_norm(x)) if self.normalize_first else x
    residual = Conv(self.features, (3, 3), padding="SAME", use_bias=False, kernel_init=_HE_NORMAL)(residual)
    residual = Conv(self.features, (3, 3), padding="SAME", use_bias=False, kernel_init=_HE_NORMAL)(
        nn.relu(group_norm(residual))
    )
    shortcut = x
    if x.shape[-1] != self.features:
      shortcut = group_norm(Conv(self.features, (1, 1), padding="VALID", use_bias=False, kernel_init=_HE_NORMAL)(x))
    return shortcut + residual


class ResNetGN(nn.Module):
  """TFF's GroupNorm ResNet v2 with basic blocks (see the module docstring); ``[B, H, W, C] -> [B, classes]``.

  Attributes:
    num_classes: output classes.
    repetitions: blocks per stage ((2, 2, 2, 2) for ResNet-18).
    initial_filters: stem width (64); stage ``s`` has ``initial_filters * 2**s`` channels.
  """

  num_classes: int = 100
  repetitions: Sequence[int] = (2, 2, 2, 2)
  initial_filters: int = 64

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    del train  # no randomness, no batch statistics
    x = jnp.asarray(images)
    if x.ndim != 4:
      raise ValueError(f"images must be [B, H, W, C], got shape {x.shape}.")
    x = x.astype(jnp.float32) if not jnp.issubdtype(x.dtype, jnp.floating) else x
    # Stem: 7x7 stride-2 'same' conv = stride-1 conv with the stride-2 padding, every other output kept.
    (_, lo_h, hi_h), (_, lo_w, hi_w) = (_same_padding_stride2(x.shape[1], 7), _same_padding_stride2(x.shape[2], 7))
    x = Conv(self.initial_filters, (7, 7), padding=((lo_h, hi_h), (lo_w, hi_w)), use_bias=False,
             kernel_init=_HE_NORMAL)(x)
    x = x[:, ::2, ::2, :]
    x = max_pool_3x3_stride2_same(nn.relu(group_norm(x)))
    features = self.initial_filters
    for stage, blocks in enumerate(self.repetitions):
      for block in range(blocks):
        x = BasicBlock(features, normalize_first=not (stage == 0 and block == 0))(x)
      features *= 2
    x = jnp.mean(nn.relu(group_norm(x)), axis=(1, 2))
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01),
                    bias_init=nn.initializers.zeros_init())(x)


def cifar100_resnet18(
    num_classes: int = 100,
    input_shape: Sequence[int] = (24, 24, 3),
    *,
    initial_filters: int = 64,
) -> Model:
  """The reference's CIFAR-100 ResNet-18 with GroupNorm, on 24x24x3 crops, as a :class:`Model` (softmax
  cross-entropy, accuracy). 11,218,212 parameters at 100 classes and 64 initial filters.

  Args:
    num_classes: classes, an int >= 2 (100 fine labels; 20 coarse).
    input_shape: ``(H, W, C)`` of one crop, ``H, W >= 4`` (24x24x3 in the reference's baseline).
    initial_filters: stem width, a positive even int (64 in the reference; smaller for tests). GroupNorm's 2
      groups need an even width.
  """
  num_classes = _check_num_classes(num_classes)
  shape = _check_input_shape(input_shape, image=True)
  if len(shape) != 3 or min(shape[:2]) < 4:
    raise ValueError(f"input_shape must be (H, W, C) with H, W >= 4, got {input_shape!r}.")
  if not isinstance(initial_filters, int) or isinstance(initial_filters, bool) or initial_filters < 2 or (
      initial_filters % 2
  ):
    raise ValueError(f"initial_filters must be a positive even int (2 GroupNorm groups), got {initial_filters!r}.")
  module = ResNetGN(num_classes=num_classes, initial_filters=initial_filters)
  return from_flax(module, jnp.zeros((1,) + shape, jnp.float32), name="cifar100_resnet18")
