"""Recurrent language models of the field: the Shakespeare character LSTM and the StackOverflow next-word LSTM.

Where this sits: experiments build a model here and hand the :class:`fedjax_lite.core.model.Model` to an algorithm;
local training runs the model inside the client's rolled step loop (``algorithms.train_locally``), so the LSTM is
written for that: the input projection of all time steps is one matmul outside the time loop, the time loop is a
``lax.scan`` over a time-major ``[T, B, 4U]`` array (one canonical ``[B, U] x [U, 4U]`` matmul per step; optional
partial unrolling), and no host work happens per step.

Architectures (TFF ``simulation/baselines``, Keras semantics):

* Shakespeare (``shakespeare/char_prediction_models.py``; McMahan et al., AISTATS 2017): embedding 8, two LSTM
  layers of 256 (``he_normal`` input kernels), dense to the vocabulary (86 characters + pad/OOV/BOS/EOS = 90).
* StackOverflow next-word prediction (``stackoverflow/word_prediction_models.py``; Reddi et al., ICLR 2021):
  embedding 96, LSTM 670, dense 96, dense to the vocabulary (10,000 words + 1 OOV bucket + pad/BOS/EOS = 10,004).

The LSTM is Keras' (``units`` U, gates ordered input, forget, cell, output; one bias per gate; forget-gate bias
initialized to 1; ``tanh``/``sigmoid``; orthogonal recurrent kernel), so parameter counts match Keras':
``4 U (D + U + 1)`` for input width D. Keras' ``mask_zero`` masking is not reproduced: in the reference's data
padding only trails a sequence, so no counted target follows a padded input and masking changes no counted
prediction (the state after trailing pads is never used).

Losses and metrics: :mod:`fedjax_lite.models.sequence` (pad and EOS never counted; a variant without OOV).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_lite.core.model import Model
from fedjax_lite.models.adapter import from_flax
from fedjax_lite.models.sequence import SpecialTokens, sequence_loss, sequence_metrics

_GLOROT = nn.initializers.glorot_uniform()
_ZEROS = nn.initializers.zeros_init()


def _keras_embedding_init(key, shape, dtype=jnp.float32):
  """Keras' ``Embedding`` default: uniform in [-0.05, 0.05)."""
  return jax.random.uniform(key, shape, dtype, -0.05, 0.05)


def _keras_lstm_bias_init(key, shape, dtype=jnp.float32):
  """Keras' ``unit_forget_bias``: zeros, except 1 for the forget gate (the second quarter)."""
  del key
  units = shape[0] // 4
  return jnp.zeros(shape, dtype).at[units : 2 * units].set(1.0)


def _check_positive_int(name: str, value) -> int:
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}.")
  return value


class LSTM(nn.Module):
  """One Keras-style LSTM layer over a time-major sequence ``[T, B, D] -> [T, B, U]`` (zero initial state).

  ``z_t = x_t W + h_{t-1} R + b``; ``i, f, g, o = split(z_t)``; ``c_t = sigmoid(f) c_{t-1} + sigmoid(i) tanh(g)``;
  ``h_t = sigmoid(o) tanh(c_t)`` (Hochreiter & Schmidhuber 1997, with the forget gate of Gers et al. 2000).

  Attributes:
    features: U, the number of units.
    kernel_init: initializer of the input kernel ``W [D, 4U]`` (Keras default Glorot-uniform).
    unroll: time steps per iteration of the rolled ``lax.scan`` (1 = fully rolled; T = fully unrolled).
  """

  features: int
  kernel_init: nn.initializers.Initializer = _GLOROT
  unroll: int = 1

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    units = self.features
    kernel = self.param("kernel", self.kernel_init, (inputs.shape[-1], 4 * units), jnp.float32)
    recurrent_kernel = self.param("recurrent_kernel", nn.initializers.orthogonal(), (units, 4 * units), jnp.float32)
    bias = self.param("bias", _keras_lstm_bias_init, (4 * units,), jnp.float32)
    projected = jnp.einsum("tbd,dg->tbg", inputs, kernel) + bias  # all time steps at once, outside the loop
    batch = inputs.shape[1]

    def step(carry, z_in):
      h, c = carry
      z = z_in + h @ recurrent_kernel
      i, f, g, o = jnp.split(z, 4, axis=-1)
      c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
      h = jax.nn.sigmoid(o) * jnp.tanh(c)
      return (h, c), h

    zeros = jnp.zeros((batch, units), projected.dtype)
    _, outputs = jax.lax.scan(step, (zeros, zeros), projected, unroll=self.unroll)
    return outputs


class LSTMLanguageModel(nn.Module):
  """Embedding, LSTM layers (each optionally followed by a dense projection), dense to the vocabulary.

  ``ids [B, T] -> logits [B, T, vocab_size]`` (no softmax: the loss works on logits).

  Attributes:
    vocab_size: the number of token ids, special tokens included.
    embedding_size: the embedding width.
    lstm_sizes: units of each LSTM layer.
    projection_size: if set, a dense layer of this width (linear) after each LSTM, as the StackOverflow model has.
    lstm_kernel_init: initializer of the LSTMs' input kernels.
    unroll: time steps per iteration of each LSTM's scan.
  """

  vocab_size: int
  embedding_size: int
  lstm_sizes: Sequence[int]
  projection_size: int | None = None
  lstm_kernel_init: nn.initializers.Initializer = _GLOROT
  unroll: int = 1

  @nn.compact
  def __call__(self, ids: jax.Array, train: bool = False) -> jax.Array:
    del train  # no randomness
    ids = jnp.asarray(ids)
    if ids.ndim != 2:
      raise ValueError(f"ids must be token ids [B, T], got shape {ids.shape}.")
    embedding = self.param("embedding", _keras_embedding_init, (self.vocab_size, self.embedding_size), jnp.float32)
    hidden = jnp.take(embedding, ids.T.astype(jnp.int32), axis=0)  # time-major [T, B, E]
    for layer, units in enumerate(self.lstm_sizes):
      hidden = LSTM(units, kernel_init=self.lstm_kernel_init, unroll=self.unroll, name=f"lstm_{layer}")(hidden)
      if self.projection_size is not None:
        hidden = nn.Dense(self.projection_size, kernel_init=_GLOROT, bias_init=_ZEROS, name=f"projection_{layer}")(
            hidden
        )
    logits = nn.Dense(self.vocab_size, kernel_init=_GLOROT, bias_init=_ZEROS, name="logits")(hidden)
    return jnp.swapaxes(logits, 0, 1)  # [B, T, V]


def special_tokens(
    vocab_size: int,
    num_oov_buckets: int,
    pad_id: int,
    oov_ids: Sequence[int] | None,
    bos_id: int | None,
    eos_id: int | None,
) -> tuple[SpecialTokens, int]:
  """The special tokens (defaults: the reference's layout after ``vocab_size`` regular ids) and the total number of
  ids ``vocab_size + num_oov_buckets + 3``; every id must lie below that total."""
  vocab_size = _check_positive_int("vocab_size", vocab_size)
  num_oov_buckets = _check_positive_int("num_oov_buckets", num_oov_buckets)
  default = SpecialTokens.for_vocabulary(vocab_size, num_oov_buckets)
  tokens = SpecialTokens(
      pad=pad_id,
      oov=default.oov if oov_ids is None else tuple(oov_ids),
      bos=default.bos if bos_id is None else bos_id,
      eos=default.eos if eos_id is None else eos_id,
  )
  total = vocab_size + num_oov_buckets + 3
  if tokens.num_ids > total:
    raise ValueError(
        f"special token ids {tokens} must be below the vocabulary's {total} ids (vocab_size {vocab_size} + "
        f"num_oov_buckets {num_oov_buckets} + pad/BOS/EOS)."
    )
  return tokens, total


def language_model(module: nn.Module, sequence_length: int, tokens: SpecialTokens, name: str) -> Model:
  """A language-model module ``ids [B, T] -> logits [B, T, V]`` as a :class:`Model` with the sequence loss and
  token metrics of :mod:`fedjax_lite.models.sequence` (``sequence_length``: T of the sample input)."""
  sample = jnp.zeros((1, sequence_length), jnp.int32)
  return from_flax(module, sample, loss=sequence_loss(tokens), metrics=sequence_metrics(tokens), name=name)


def shakespeare_lstm(
    vocab_size: int = 86,
    sequence_length: int = 80,
    *,
    num_oov_buckets: int = 1,
    pad_id: int = 0,
    oov_ids: Sequence[int] | None = None,
    bos_id: int | None = None,
    eos_id: int | None = None,
    embedding_size: int = 8,
    lstm_sizes: Sequence[int] = (256, 256),
    unroll: int = 1,
) -> Model:
  """The reference's Shakespeare character LSTM as a :class:`Model` (next-character prediction).

  Embedding 8, two LSTM layers of 256 (``he_normal`` input kernels), dense to the vocabulary; with the reference's
  86 characters the vocabulary has 90 ids (pad 0, characters 1..86, OOV 87, BOS 88, EOS 89) and the model 820,522
  parameters. Batches: ``x`` input ids ``[B, T]``, ``y`` target ids ``[B, T]`` (``x`` shifted by one). Loss and
  metrics: :mod:`fedjax_lite.models.sequence` (``token_metrics`` gives ``loss``, ``accuracy``,
  ``accuracy_without_out_of_vocab``). McMahan et al., AISTATS 2017; TFF ``create_recurrent_model``.

  Args:
    vocab_size: regular characters (86 in the reference).
    sequence_length: T (80 in the reference's baseline); only used to build the sample input.
    num_oov_buckets: OOV ids after the characters (1 in the reference).
    pad_id, oov_ids, bos_id, eos_id: special ids; default the reference's layout (see above).
    embedding_size: embedding width (8).
    lstm_sizes: LSTM widths (256, 256); smaller for tests.
    unroll: time steps per iteration of each LSTM's time loop (see ``benchmarks/model_speed.py``).
  """
  tokens, total = special_tokens(vocab_size, num_oov_buckets, pad_id, oov_ids, bos_id, eos_id)
  _check_positive_int("sequence_length", sequence_length)
  _check_positive_int("embedding_size", embedding_size)
  sizes = _check_sizes("lstm_sizes", lstm_sizes)
  _check_positive_int("unroll", unroll)
  module = LSTMLanguageModel(
      vocab_size=total,
      embedding_size=embedding_size,
      lstm_sizes=sizes,
      lstm_kernel_init=nn.initializers.he_normal(),
      unroll=unroll,
  )
  return language_model(module, sequence_length, tokens, "shakespeare_lstm")


def stackoverflow_lstm(
    vocab_size: int = 10_000,
    sequence_length: int = 20,
    *,
    num_oov_buckets: int = 1,
    pad_id: int = 0,
    oov_ids: Sequence[int] | None = None,
    bos_id: int | None = None,
    eos_id: int | None = None,
    embedding_size: int = 96,
    lstm_size: int = 670,
    unroll: int = 1,
) -> Model:
  """The reference's StackOverflow next-word prediction LSTM as a :class:`Model`.

  Embedding 96, LSTM 670, dense 96, dense to the vocabulary; with 10,000 words and one OOV bucket the vocabulary has
  10,004 ids (pad 0, words 1..10000, OOV 10001, BOS 10002, EOS 10003) and the model 4,050,748 parameters (Reddi et
  al., "Adaptive Federated Optimization", ICLR 2021; TFF ``word_prediction_models.create_recurrent_model``).
  Batches as :func:`shakespeare_lstm`'s; metrics the reference's masked accuracies (pad and EOS excluded; without
  OOV).

  Args:
    vocab_size: regular words (10,000 in the reference).
    sequence_length: T (20 in the reference).
    num_oov_buckets: OOV ids after the words (1).
    pad_id, oov_ids, bos_id, eos_id: special ids; default the reference's layout (see above).
    embedding_size: embedding and projection width (96).
    lstm_size: LSTM units (670).
    unroll: time steps per iteration of the LSTM's time loop.
  """
  tokens, total = special_tokens(vocab_size, num_oov_buckets, pad_id, oov_ids, bos_id, eos_id)
  _check_positive_int("sequence_length", sequence_length)
  _check_positive_int("embedding_size", embedding_size)
  _check_positive_int("lstm_size", lstm_size)
  _check_positive_int("unroll", unroll)
  module = LSTMLanguageModel(
      vocab_size=total,
      embedding_size=embedding_size,
      lstm_sizes=(lstm_size,),
      projection_size=embedding_size,
      unroll=unroll,
  )
  return language_model(module, sequence_length, tokens, "stackoverflow_lstm")


def _check_sizes(name: str, sizes) -> tuple[int, ...]:
  try:
    sizes = tuple(sizes)
  except TypeError:
    raise TypeError(f"{name} must be a tuple of positive ints, got {sizes!r}.") from None
  if not sizes or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes):
    raise ValueError(f"{name} must be a non-empty tuple of positive ints, got {sizes!r}.")
  return sizes
