"""Token-level losses and metrics for sequence models (next-character / next-word prediction).

Where this sits: the loss and metrics of the recurrent models in :mod:`fedjax_lite.models.recurrent`, evaluated by
the library's masked-loss / metric-sums machinery (:func:`fedjax_lite.core.model.masked_loss_and_metric_sums`).

A batch holds input ids ``x`` ``[B, T]`` and target ids ``y`` ``[B, T]``; the model predicts logits
``[B, T, V]``. Targets that are padding or end-of-sentence (and, in the second accuracy, out-of-vocabulary) are not
counted, as the reference's baselines report them (TFF ``simulation/baselines/keras_metrics.py``:
``MaskedCategoricalAccuracy(masked_tokens=...)``; Reddi et al., "Adaptive Federated Optimization", ICLR 2021).

How token metrics fit the library's sums (padding never counts, sums are finalized on the server): the core
machinery reports every metric as ``sum over real examples / num_examples``. A token accuracy is a ratio of two
token counts, so each is reported as two per-sequence sums, a numerator and a denominator, whose ratio is exact
whatever they are divided by (``num_examples`` cancels)::

  token_loss                    sum over counted tokens of cross-entropy
  correct_tokens / counted_tokens                          -> accuracy (pad and EOS excluded)
  correct_tokens_without_oov / counted_tokens_without_oov  -> accuracy_without_out_of_vocab (pad, EOS, OOV excl.)

:func:`finalize_ratio_metrics` (or :func:`token_metrics`) turns either the raw sums or the finalized means into
``loss`` (the exact token-mean cross-entropy), ``accuracy`` and ``accuracy_without_out_of_vocab``.

Names against the reference: TFF's StackOverflow task reports ``accuracy`` (only pad masked),
``accuracy_without_out_of_vocab`` (pad and OOV) and ``accuracy_without_out_of_vocab_or_end_of_sentence`` (pad,
OOV, EOS); its Shakespeare task only the pad-masked ``accuracy``. Ours: ``accuracy`` masks pad and EOS, and
``accuracy_without_out_of_vocab`` equals TFF's ``accuracy_without_out_of_vocab_or_end_of_sentence`` (the figure
Reddi et al. report for StackOverflow). BOS never occurs as a target in the reference's data and is not masked.

The training loss of one sequence is ``sum_t m_t CE_t / T`` (``m_t`` = target counted, ``T`` = sequence length):
the batch's mean over real sequences is then ``sum_{b,t} m_bt CE_bt / (B_real T)``, Keras' weighted
``SUM_OVER_BATCH_SIZE`` reduction, and its gradient weights every counted token of the batch equally (a per-sequence
mean would weight tokens of short sequences more). It differs from the exact token mean
``sum m CE / sum m`` by the batch's fraction of counted tokens; the exact mean needs the core change described in
:func:`finalize_ratio_metrics`.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from fedjax_lite.core.model import Batch, PerExampleFn

# Ratio metrics of the sequence models: name -> (numerator sum, denominator sum).
TOKEN_RATIOS: dict[str, tuple[str, str]] = {
    "loss": ("token_loss", "counted_tokens"),
    "accuracy": ("correct_tokens", "counted_tokens"),
    "accuracy_without_out_of_vocab": ("correct_tokens_without_oov", "counted_tokens_without_oov"),
}


def _check_token_id(name: str, value) -> int:
  if not isinstance(value, int) or isinstance(value, bool) or value < 0:
    raise ValueError(f"{name} must be a non-negative int token id, got {value!r}.")
  return value


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
  """The special token ids of a tokenized vocabulary.

  The reference's conventions (TFF ``simulation/baselines``): ``pad = 0``, words/characters ``1..V``, then the
  out-of-vocabulary bucket(s), beginning- and end-of-sentence. For Shakespeare's 86 characters: pad 0, OOV 87,
  BOS 88, EOS 89 (vocabulary 90); for StackOverflow's 10,000 words and 1 OOV bucket: pad 0, OOV 10001, BOS 10002,
  EOS 10003 (vocabulary 10,004). See :meth:`for_vocabulary`.

  Attributes:
    pad: the padding id (never counted).
    oov: the out-of-vocabulary ids (a tuple; excluded from ``accuracy_without_out_of_vocab``).
    bos: the beginning-of-sentence id (never a target in the reference's data; not masked).
    eos: the end-of-sentence id (excluded from the loss and both accuracies).
  """

  pad: int = 0
  oov: tuple[int, ...] = ()
  bos: int | None = None
  eos: int | None = None

  def __post_init__(self):
    _check_token_id("pad", self.pad)
    try:
      oov = tuple(self.oov)
    except TypeError:
      raise TypeError(f"oov must be a sequence of token ids, got {self.oov!r}.") from None
    for token in oov:
      _check_token_id("oov", token)
    object.__setattr__(self, "oov", oov)
    if self.bos is not None:
      _check_token_id("bos", self.bos)
    if self.eos is not None:
      _check_token_id("eos", self.eos)
    named = [("pad", self.pad)] + [("oov", t) for t in oov] + [("bos", self.bos), ("eos", self.eos)]
    ids = [t for _, t in named if t is not None]
    if len(set(ids)) != len(ids):
      raise ValueError(f"special token ids must be distinct, got {dict((n, t) for n, t in named)}.")

  @classmethod
  def for_vocabulary(cls, vocab_size: int, num_oov_buckets: int = 1) -> "SpecialTokens":
    """The reference's layout for ``vocab_size`` regular tokens: pad 0, regular ``1..vocab_size``, then
    ``num_oov_buckets`` OOV ids, BOS, EOS (TFF ``get_special_tokens``). Total ids: ``vocab_size + num_oov_buckets
    + 3``."""
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1:
      raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}.")
    if not isinstance(num_oov_buckets, int) or isinstance(num_oov_buckets, bool) or num_oov_buckets < 1:
      raise ValueError(f"num_oov_buckets must be a positive int, got {num_oov_buckets!r}.")
    oov = tuple(vocab_size + 1 + k for k in range(num_oov_buckets))
    return cls(pad=0, oov=oov, bos=vocab_size + num_oov_buckets + 1, eos=vocab_size + num_oov_buckets + 2)

  @property
  def num_ids(self) -> int:
    """One more than the largest special id: the smallest vocabulary that holds every special token."""
    return 1 + max(t for t in (self.pad, *self.oov, self.bos, self.eos) if t is not None)


def token_mask(targets: jax.Array, excluded: Sequence[int]) -> jax.Array:
  """``m[b, t] = targets[b, t] not in excluded`` (bool, same shape as ``targets``)."""
  targets = jnp.asarray(targets)
  mask = jnp.ones(targets.shape, bool)
  for token in excluded:
    mask = mask & (targets != token)
  return mask


def _targets_and_logits(batch: Batch, logits: jax.Array, label_key: str) -> tuple[jax.Array, jax.Array]:
  targets = jnp.asarray(batch[label_key]).astype(jnp.int32)
  if targets.ndim != 2 or logits.ndim != 3 or logits.shape[:2] != targets.shape:
    raise ValueError(
        f"sequence metrics need targets [B, T] and logits [B, T, V]; got targets {targets.shape} and logits "
        f"{logits.shape}."
    )
  return targets, logits.astype(jnp.float32)


def sequence_loss(tokens: SpecialTokens, label_key: str = "y") -> PerExampleFn:
  """Per-sequence training loss ``sum_t m_t CE(logits_t, y_t) / T``, ``m_t`` = target neither pad nor EOS.

  See the module docstring for why the sum is divided by the static length ``T``.
  """
  excluded = (tokens.pad,) + ((tokens.eos,) if tokens.eos is not None else ())

  def loss(batch: Batch, logits: jax.Array) -> jax.Array:
    targets, logits = _targets_and_logits(batch, logits, label_key)
    mask = token_mask(targets, excluded)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(jnp.where(mask, ce, 0.0), axis=-1) / targets.shape[-1]

  return loss


def sequence_metrics(tokens: SpecialTokens, label_key: str = "y") -> dict[str, PerExampleFn]:
  """Per-sequence sums whose ratios are the reference's masked token metrics (see the module docstring).

  Returns ``{token_loss, correct_tokens, counted_tokens, correct_tokens_without_oov, counted_tokens_without_oov}``,
  each ``(batch, logits) -> [B]`` float32: the sum over the sequence's counted targets of the cross-entropy, of
  ``argmax(logits) == y``, and of 1. "Counted" excludes pad and EOS, and in the ``_without_oov`` pair also every
  OOV id. Turn them into ``loss``/``accuracy``/``accuracy_without_out_of_vocab`` with :func:`token_metrics`.
  """
  base = (tokens.pad,) + ((tokens.eos,) if tokens.eos is not None else ())
  without_oov = base + tokens.oov

  def parts(batch, logits):
    targets, logits = _targets_and_logits(batch, logits, label_key)
    correct = jnp.argmax(logits, axis=-1) == targets
    return targets, logits, correct

  def token_loss(batch, logits):
    targets, logits, _ = parts(batch, logits)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(jnp.where(token_mask(targets, base), ce, 0.0), axis=-1)

  def correct_counter(excluded):
    def fn(batch, logits):
      targets, _, correct = parts(batch, logits)
      return jnp.sum(correct & token_mask(targets, excluded), axis=-1).astype(jnp.float32)

    return fn

  def counter(excluded):
    def fn(batch, logits):
      targets = jnp.asarray(batch[label_key]).astype(jnp.int32)
      return jnp.sum(token_mask(targets, excluded), axis=-1).astype(jnp.float32)

    return fn

  return {
      "token_loss": token_loss,
      "correct_tokens": correct_counter(base),
      "counted_tokens": counter(base),
      "correct_tokens_without_oov": correct_counter(without_oov),
      "counted_tokens_without_oov": counter(without_oov),
  }


def finalize_ratio_metrics(
    sums: Mapping[str, jax.Array], ratios: Mapping[str, tuple[str, str]]
) -> dict[str, jax.Array]:
  """``{name: sums[numerator] / sums[denominator]}`` for each ``name -> (numerator, denominator)`` in ``ratios``.

  Works on raw metric sums and on their ``finalize_metric_sums`` means alike (both parts are divided by the same
  ``num_examples``). A zero denominator gives NaN (nothing was counted), as the core's finalization does for
  ``num_examples == 0``. Leading axes (e.g. per-client sums ``[clients]``) are kept.

  Core change this stands in for (for the lead, ``core/model.py``): let a model declare ratio metrics, e.g.
  ``Model.metrics[name]`` returning ``(numerator [B], denominator [B])``, with ``masked_loss_and_metric_sums``
  summing both (``sums[name]``, ``sums[name + '_count']``) and ``finalize_metric_sums`` dividing each by its own
  count; and a loss returning ``(loss_sum [B], weight [B])`` so that the differentiated mean is
  ``sum loss / sum weight`` (the exact token mean) instead of ``sum loss / num_examples``.
  """
  out = {}
  for name, pair in ratios.items():
    try:
      numerator, denominator = pair
    except (TypeError, ValueError):
      raise ValueError(f"ratios[{name!r}] must be a (numerator, denominator) pair of keys, got {pair!r}.") from None
    for key in (numerator, denominator):
      if key not in sums:
        raise KeyError(f"ratios[{name!r}] needs sums[{key!r}]; available: {sorted(sums)}.")
    num = jnp.asarray(sums[numerator], jnp.float32)
    den = jnp.asarray(sums[denominator], jnp.float32)
    out[name] = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), jnp.nan)
  return out


def token_metrics(sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """The sequence models' reported metrics from their sums: ``loss`` (exact token-mean cross-entropy over counted
  targets), ``accuracy`` (pad and EOS excluded), ``accuracy_without_out_of_vocab`` (pad, EOS and OOV excluded)."""
  return finalize_ratio_metrics(sums, TOKEN_RATIOS)
