"""LoRA: low-rank adapters on dense projections, and the labels that freeze the base and train the adapters.

Where this sits: the transformer's projections (:mod:`fedjax_lite.models.transformer`) are :class:`LoRADense`
layers; federated fine-tuning labels the adapters ``'global'`` and everything else ``'frozen'`` with
:func:`lora_labels` (one call), then trains and uploads only the adapters (:mod:`fedjax_lite.core.param_partition`:
``partial_model`` keeps one copy of the frozen base for the whole cohort).

Why a wrapper and not flax's own layer: flax 0.12 has LoRA only in ``flax.nnx`` (``nnx.LoRA``, ``nnx.LoRALinear``),
while the model adapter (:func:`fedjax_lite.models.from_flax`) and the zoo are ``flax.linen``; bridging an nnx
module into linen would put the adapters in a collection of their own (``LoRAParam``) that the adapter treats as
non-trainable state. :class:`LoRADense` is the same computation written in linen, with ``nnx.LoRA``'s parameter
names and shapes (``lora_a [in, rank]``, ``lora_b [rank, out]``, B initialized to zero) and the scale of Hu et al.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_lite.core.param_partition import FROZEN, GLOBAL, ParamPath, label_params
from fedjax_lite.core.tree import PyTree

LORA_PARAM_NAMES: tuple[str, ...] = ("lora_a", "lora_b")


class LoRADense(nn.Module):
  """A dense layer with an optional low-rank adapter: ``y = x W + b + (alpha / rank) (x A) B``.

  Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022: the pretrained ``W`` stays frozen and
  the update ``Delta W = A B`` of rank ``r`` is trained; ``B`` starts at zero, so the adapted layer starts as the
  base layer exactly, and ``alpha / r`` keeps the update's scale steady across ranks. ``rank = 0`` is the plain
  dense layer (the same ``kernel``/``bias`` names, so a base checkpoint loads into either).

  Attributes:
    features: output width.
    rank: the adapter's rank r (0: no adapter).
    alpha: the adapter's scale numerator; default ``rank`` (scale 1: Hu et al. "set alpha to the first r we try").
    use_bias: whether the base layer has a bias.
    kernel_init, bias_init: initializers of the base layer.
    lora_a_init: initializer of ``A`` (``nnx.LoRA``'s default, He-uniform); ``B`` is zero.
  """

  features: int
  rank: int = 0
  alpha: float | None = None
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.normal(0.02)
  bias_init: Callable = nn.initializers.zeros_init()
  lora_a_init: Callable = nn.initializers.he_uniform()

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (inputs.shape[-1], self.features), jnp.float32)
    outputs = inputs @ kernel
    if self.use_bias:
      outputs = outputs + self.param("bias", self.bias_init, (self.features,), jnp.float32)
    if self.rank:
      lora_a = self.param("lora_a", self.lora_a_init, (inputs.shape[-1], self.rank), jnp.float32)
      lora_b = self.param("lora_b", nn.initializers.zeros_init(), (self.rank, self.features), jnp.float32)
      scale = (self.rank if self.alpha is None else self.alpha) / self.rank
      outputs = outputs + ((inputs @ lora_a) @ lora_b) * scale
    return outputs


def is_lora_path(path: ParamPath) -> bool:
  """Whether a parameter path (a tuple of names) ends in one of the adapters' parameters (``lora_a``,
  ``lora_b``)."""
  return bool(path) and path[-1] in LORA_PARAM_NAMES


def lora_labels(params: PyTree) -> PyTree:
  """The label tree for LoRA fine-tuning: the adapters ``'global'`` (trained, uploaded, aggregated), every other
  parameter ``'frozen'`` (the pretrained base).

  >>> import jax
  >>> from fedjax_lite import models
  >>> model = models.transformer_lm(vocab_size=20, sequence_length=8, num_layers=1, num_heads=2, width=16,
  ...                               lora_rank=2)
  >>> labels = lora_labels(model.init(jax.random.key(0)))
  >>> labels['block_0']['attention']['query']
  {'bias': 'frozen', 'kernel': 'frozen', 'lora_a': 'global', 'lora_b': 'global'}
  """
  labels = label_params(params, lambda path: GLOBAL if is_lora_path(path) else FROZEN)
  if GLOBAL not in jax.tree.leaves(labels):
    raise ValueError("params have no LoRA adapters (no 'lora_a'/'lora_b' leaves): build the model with "
                     "lora_rank > 0.")
  return labels
