"""Tests for fedjax_lite.models.sequence: the masked token loss and metrics, exact on a hand-made batch."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lite.core.model import Model, finalize_metric_sums, masked_loss_and_metric_sums
from fedjax_lite.models import SpecialTokens, finalize_ratio_metrics, sequence_loss, sequence_metrics, token_metrics

# 3 regular ids (1..3), then OOV 4, BOS 5, EOS 6: 7 ids.
TOKENS = SpecialTokens.for_vocabulary(3, 1)
VOCAB = 7
SCALE = 10.0  # logits = SCALE * one_hot(prediction)


def logits_model() -> Model:
  """A 'model' whose predictions are the batch's own ``logits`` entry (so the test picks every prediction)."""
  return Model(init=lambda rng: {}, apply=lambda params, batch, rng, train: batch["logits"],
               loss=sequence_loss(TOKENS), metrics=sequence_metrics(TOKENS))


def hand_made_batch():
  targets = np.array([[1, 4, 6, 0],    # word, OOV, EOS, pad
                      [2, 3, 4, 1],    # word, word, OOV, word
                      [5, 5, 5, 5]],   # a padded slot
                     np.int32)
  predictions = np.array([[1, 4, 6, 0],  # right, right (OOV), right (EOS: not counted), "right" on pad (not counted)
                          [2, 1, 1, 1],  # right, wrong, wrong (OOV target), right
                          [5, 5, 5, 5]], np.int32)
  logits = SCALE * np.eye(VOCAB, dtype=np.float32)[predictions]
  logits[2] = np.nan  # the padded slot's stored values must never reach a sum
  mask = np.array([True, True, False])
  return {"x": targets, "y": targets, "logits": logits}, mask, predictions


def test_special_tokens_reference_layouts():
  shakespeare = SpecialTokens.for_vocabulary(86, 1)
  assert (shakespeare.pad, shakespeare.oov, shakespeare.bos, shakespeare.eos) == (0, (87,), 88, 89)
  assert shakespeare.num_ids == 90
  stackoverflow = SpecialTokens.for_vocabulary(10_000, 1)
  assert (stackoverflow.oov, stackoverflow.bos, stackoverflow.eos, stackoverflow.num_ids) == ((10_001,), 10_002,
                                                                                              10_003, 10_004)


def test_special_tokens_argument_checks():
  with pytest.raises(ValueError, match="distinct"):
    SpecialTokens(pad=0, oov=(3,), bos=3, eos=4)
  with pytest.raises(ValueError, match="pad must be a non-negative int"):
    SpecialTokens(pad=-1)
  with pytest.raises(ValueError, match="vocab_size must be a positive int"):
    SpecialTokens.for_vocabulary(0)
  with pytest.raises(ValueError, match="num_oov_buckets must be a positive int"):
    SpecialTokens.for_vocabulary(5, 0)


def test_metric_sums_exclude_pad_eos_and_oov_exactly():
  batch, mask, _ = hand_made_batch()
  mean_loss, sums = masked_loss_and_metric_sums(logits_model(), {}, batch, mask, None, False)
  # Counted (pad and EOS excluded): seq 0 t0, t1; seq 1 all 4 -> 6 tokens, 4 right (seq 0: 2; seq 1: t0, t3).
  assert float(sums["counted_tokens"]) == 6.0
  assert float(sums["correct_tokens"]) == 4.0
  # Also without OOV: seq 0 t0; seq 1 t0, t1, t3 -> 4 tokens, 3 right.
  assert float(sums["counted_tokens_without_oov"]) == 4.0
  assert float(sums["correct_tokens_without_oov"]) == 3.0
  assert int(sums["num_examples"]) == 2
  # Cross-entropy of SCALE * one_hot against a target: log(1 + 6 e^-S) if predicted, S + log(1 + 6 e^-S) if not.
  right = math.log1p((VOCAB - 1) * math.exp(-SCALE))
  wrong = SCALE + right
  token_loss = 4 * right + 2 * wrong  # the 6 counted tokens: 4 right, 2 wrong
  # float32 sums of <= 8 terms of size <= 11: a few ulps of 11 (2^-20 relative) is far below 1e-5.
  assert float(sums["token_loss"]) == pytest.approx(token_loss, rel=1e-5)
  # Training loss: per sequence sum / T, mean over the 2 real sequences.
  assert float(sums["loss"]) == pytest.approx(token_loss / 4, rel=1e-5)
  assert float(mean_loss) == pytest.approx(token_loss / 4 / 2, rel=1e-5)
  assert all(np.isfinite(float(value)) for value in sums.values())

  reported = token_metrics(sums)
  assert float(reported["accuracy"]) == float(np.float32(4) / np.float32(6))
  assert float(reported["accuracy_without_out_of_vocab"]) == 0.75
  assert float(reported["loss"]) == pytest.approx(token_loss / 6, rel=1e-5)
  # The same ratios from the finalized means (num_examples cancels).
  from_means = token_metrics(finalize_metric_sums(sums))
  assert float(from_means["accuracy"]) == float(reported["accuracy"])
  assert float(from_means["accuracy_without_out_of_vocab"]) == 0.75


def test_ratios_of_nothing_counted_are_nan_and_keep_client_axis():
  sums = {"correct_tokens": jnp.array([1.0, 0.0]), "counted_tokens": jnp.array([2.0, 0.0])}
  out = finalize_ratio_metrics(sums, {"accuracy": ("correct_tokens", "counted_tokens")})
  assert float(out["accuracy"][0]) == 0.5
  assert math.isnan(float(out["accuracy"][1]))


def test_ratio_argument_checks():
  with pytest.raises(KeyError, match="counted_tokens"):
    finalize_ratio_metrics({"correct_tokens": 1.0}, {"accuracy": ("correct_tokens", "counted_tokens")})
  with pytest.raises(ValueError, match="pair"):
    finalize_ratio_metrics({"a": 1.0}, {"accuracy": "a"})


def test_shape_mismatch_is_a_clear_error():
  with pytest.raises(ValueError, match=r"targets \[B, T\] and logits \[B, T, V\]"):
    sequence_loss(TOKENS)({"y": np.zeros((2, 3), np.int32)}, jnp.zeros((2, 4, VOCAB)))
