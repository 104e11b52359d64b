"""A small decoder-only transformer language model, with LoRA adapters on its projections.

Where this sits: :func:`transformer_lm` returns a :class:`fedjax_lite.core.model.Model` for next-token prediction
(character or word level) with the same batches, loss and token metrics as the recurrent language models
(:mod:`fedjax_lite.models.sequence`: ``x`` ids ``[B, T]``, ``y`` the next ids, pad and EOS never counted). It is the
model of LoRA federated fine-tuning: pretrain it centrally (``experiments/pretrain_transformer.py``), load the
weights (:func:`fedjax_lite.models.load_params`), then train only its adapters (:func:`fedjax_lite.models.lora_labels`).

Architecture (GPT-2 style, Radford et al. 2019): token and learned position embeddings; ``num_layers`` pre-norm
blocks ``h += Attention(LayerNorm(h))``, ``h += MLP(LayerNorm(h))`` with causal multi-head self-attention
(``jax.nn.dot_product_attention``, ``is_causal=True``: position t attends to positions <= t only) and a GELU MLP;
a final LayerNorm; logits from the transposed token embedding (tied, Press & Wolf 2017) or an output layer.
Padding only trails a sequence in the reference's data, so causal attention needs no padding mask: no counted
target is predicted from a padded position.

Every projection (``query``, ``key``, ``value``, ``out`` of the attention; ``mlp_in``, ``mlp_out``) is a
:class:`~fedjax_lite.models.lora.LoRADense`; ``lora_targets`` chooses which carry an adapter of rank ``lora_rank``.
The default targets, query and value (Hu et al. 2022, Table 5: the best use of a fixed budget), give an adapter of
1.0% of the default character-level model at rank 8 (32,768 beside its 3,203,072 parameters).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_lite.core import validation
from fedjax_lite.core.model import Model
from fedjax_lite.models.lora import LoRADense
from fedjax_lite.models.recurrent import language_model, special_tokens

LORA_TARGETS: tuple[str, ...] = ("query", "key", "value", "out", "mlp_in", "mlp_out")
_INIT = nn.initializers.normal(0.02)


class CausalSelfAttention(nn.Module):
  """Multi-head causal self-attention ``[B, T, D] -> [B, T, D]`` with LoRA-capable projections."""

  num_heads: int
  lora_rank: int = 0
  lora_alpha: float | None = None
  lora_targets: tuple[str, ...] = ()
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, inputs: jax.Array, train: bool = False) -> jax.Array:
    batch, length, width = inputs.shape
    head_width = width // self.num_heads

    def projection(name: str) -> LoRADense:
      rank = self.lora_rank if name in self.lora_targets else 0
      return LoRADense(width, rank=rank, alpha=self.lora_alpha, name=name)

    def heads(name: str) -> jax.Array:
      return projection(name)(inputs).reshape(batch, length, self.num_heads, head_width)

    attended = jax.nn.dot_product_attention(heads("query"), heads("key"), heads("value"), is_causal=True)
    attended = nn.Dropout(self.dropout_rate, deterministic=not train)(attended)
    return projection("out")(attended.reshape(batch, length, width))


class TransformerBlock(nn.Module):
  """One pre-norm block: ``h + Attention(LN(h))``, then ``h + MLP(LN(h))`` (GELU)."""

  num_heads: int
  mlp_width: int
  lora_rank: int = 0
  lora_alpha: float | None = None
  lora_targets: tuple[str, ...] = ()
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, hidden: jax.Array, train: bool = False) -> jax.Array:
    width = hidden.shape[-1]
    dropout = nn.Dropout(self.dropout_rate, deterministic=not train)
    attention = CausalSelfAttention(self.num_heads, self.lora_rank, self.lora_alpha, self.lora_targets,
                                    self.dropout_rate, name="attention")
    hidden = hidden + dropout(attention(nn.LayerNorm(name="attention_norm")(hidden), train))

    def rank(name: str) -> int:
      return self.lora_rank if name in self.lora_targets else 0

    mlp = nn.LayerNorm(name="mlp_norm")(hidden)
    mlp = nn.gelu(LoRADense(self.mlp_width, rank=rank("mlp_in"), alpha=self.lora_alpha, name="mlp_in")(mlp))
    mlp = LoRADense(width, rank=rank("mlp_out"), alpha=self.lora_alpha, name="mlp_out")(mlp)
    return hidden + dropout(mlp)


class TransformerLM(nn.Module):
  """Decoder-only transformer language model: ``ids [B, T] -> logits [B, T, vocab_size]`` (no softmax).

  Attributes:
    vocab_size: the number of token ids, special tokens included.
    context_length: the longest sequence (the position embedding's size); inputs may be shorter.
    num_layers: transformer blocks.
    num_heads: attention heads; must divide ``width``.
    width: the model width D.
    mlp_width: the MLP's hidden width (default ``4 D``).
    dropout_rate: dropout on the embeddings, the attention output and the residual branches in training
      (default 0: none).
    tie_embeddings: logits from the transposed token embedding (default) instead of an output layer.
    lora_rank: the adapters' rank (0: no adapters).
    lora_alpha: the adapters' scale numerator (default the rank: scale 1).
    lora_targets: the projections with an adapter, from :data:`LORA_TARGETS`.
  """

  vocab_size: int
  context_length: int = 128
  num_layers: int = 4
  num_heads: int = 4
  width: int = 256
  mlp_width: int | None = None
  dropout_rate: float = 0.0
  tie_embeddings: bool = True
  lora_rank: int = 0
  lora_alpha: float | None = None
  lora_targets: tuple[str, ...] = ("query", "value")

  @nn.compact
  def __call__(self, ids: jax.Array, train: bool = False) -> jax.Array:
    ids = jnp.asarray(ids)
    if ids.ndim != 2:
      raise ValueError(f"ids must be token ids [B, T], got shape {ids.shape}.")
    if ids.shape[1] > self.context_length:
      raise ValueError(f"sequences of length {ids.shape[1]} exceed the model's context_length "
                       f"{self.context_length}.")
    embedding = self.param("token_embedding", _INIT, (self.vocab_size, self.width), jnp.float32)
    positions = self.param("position_embedding", _INIT, (self.context_length, self.width), jnp.float32)
    hidden = jnp.take(embedding, ids.astype(jnp.int32), axis=0) + positions[: ids.shape[1]]
    hidden = nn.Dropout(self.dropout_rate, deterministic=not train)(hidden)
    for layer in range(self.num_layers):
      hidden = TransformerBlock(self.num_heads, self.mlp_width or 4 * self.width, self.lora_rank, self.lora_alpha,
                                tuple(self.lora_targets), self.dropout_rate, name=f"block_{layer}")(hidden, train)
    hidden = nn.LayerNorm(name="final_norm")(hidden)
    if self.tie_embeddings:
      return hidden @ embedding.T
    return LoRADense(self.vocab_size, name="logits")(hidden)


def transformer_lm(
    vocab_size: int = 86,
    sequence_length: int = 80,
    *,
    num_oov_buckets: int = 1,
    pad_id: int = 0,
    oov_ids: Sequence[int] | None = None,
    bos_id: int | None = None,
    eos_id: int | None = None,
    context_length: int | None = None,
    num_layers: int = 4,
    num_heads: int = 4,
    width: int = 256,
    mlp_width: int | None = None,
    dropout_rate: float = 0.0,
    tie_embeddings: bool = True,
    lora_rank: int = 0,
    lora_alpha: float | None = None,
    lora_targets: Sequence[str] = ("query", "value"),
) -> Model:
  """:class:`TransformerLM` as a :class:`Model` for next-token prediction, with optional LoRA adapters.

  Batches, special tokens, loss and metrics are the recurrent language models' (:func:`shakespeare_lstm`): ``x``
  input ids ``[B, T]``, ``y`` target ids ``[B, T]``; ``token_metrics`` of the metric sums gives ``loss``,
  ``accuracy`` (pad and EOS excluded) and ``accuracy_without_out_of_vocab``. The defaults are character level
  (86 characters, 90 ids with pad/OOV/BOS/EOS; 3,203,072 parameters at T = 80); ``vocab_size=10_000`` is
  StackOverflow's word level (10,004 ids; 5,725,696 parameters at T = 20, 45% of them in the tied embedding).

  Args:
    vocab_size: regular tokens (characters or words).
    sequence_length: T of the sample input used by ``init``.
    num_oov_buckets, pad_id, oov_ids, bos_id, eos_id: the special ids (default the reference's layout after the
      regular tokens, as :func:`shakespeare_lstm`).
    context_length: the longest sequence the model takes (default ``sequence_length``).
    num_layers, num_heads, width, mlp_width: the architecture (width divisible by num_heads; mlp_width default
      ``4 width``).
    dropout_rate: dropout in training, in [0, 1).
    tie_embeddings: logits from the transposed token embedding (default True).
    lora_rank: adapter rank (0: none). The base parameters have the same paths at every rank, so a base
      checkpoint loads into an adapted model (``load_params(..., missing_ok=is_lora_path)``).
    lora_alpha: adapter scale numerator, positive (default ``lora_rank``: scale 1).
    lora_targets: projections to adapt, a non-empty subset of ``('query', 'key', 'value', 'out', 'mlp_in',
      'mlp_out')``.
  """
  tokens, total = special_tokens(vocab_size, num_oov_buckets, pad_id, oov_ids, bos_id, eos_id)
  validation.check_int("sequence_length", sequence_length, minimum=1)
  if context_length is None:
    context_length = sequence_length
  validation.check_int("context_length", context_length, minimum=1)
  if context_length < sequence_length:
    raise ValueError(f"context_length ({context_length}) must be >= sequence_length ({sequence_length}).")
  validation.check_int("num_layers", num_layers, minimum=1)
  validation.check_int("num_heads", num_heads, minimum=1)
  validation.check_int("width", width, minimum=1)
  if width % num_heads:
    raise ValueError(f"width ({width}) must be divisible by num_heads ({num_heads}).")
  if mlp_width is not None:
    validation.check_int("mlp_width", mlp_width, minimum=1)
  if isinstance(dropout_rate, bool) or not isinstance(dropout_rate, (int, float)) or not 0 <= dropout_rate < 1:
    raise ValueError(f"dropout_rate must be a number in [0, 1), got {dropout_rate!r}.")
  validation.check_int("lora_rank", lora_rank, minimum=0)
  if lora_alpha is not None and (isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float))
                                 or not lora_alpha > 0):
    raise ValueError(f"lora_alpha must be a positive number or None, got {lora_alpha!r}.")
  targets = (lora_targets,) if isinstance(lora_targets, str) else tuple(lora_targets)
  unknown = [target for target in targets if target not in LORA_TARGETS]
  if unknown or not targets or len(set(targets)) != len(targets):
    raise ValueError(f"lora_targets must be distinct names from {list(LORA_TARGETS)}, got {list(targets)}.")
  module = TransformerLM(vocab_size=total, context_length=context_length, num_layers=num_layers,
                         num_heads=num_heads, width=width, mlp_width=mlp_width, dropout_rate=float(dropout_rate),
                         tie_embeddings=bool(tie_embeddings), lora_rank=lora_rank,
                         lora_alpha=None if lora_alpha is None else float(lora_alpha), lora_targets=targets)
  name = "transformer_lm" if not lora_rank else f"transformer_lm_lora{lora_rank}"
  return language_model(module, sequence_length, tokens, name)
