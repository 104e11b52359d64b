"""Linear models of the field: EMNIST logistic regression and StackOverflow tag prediction.

Where this sits: builders return a :class:`fedjax_lite.core.model.Model` for an algorithm, like
:mod:`fedjax_lite.models.zoo`.

* :func:`logistic_regression`: multinomial logistic regression on the flattened input, ``logits = W x + b`` with
  softmax cross-entropy (EMNIST: 28x28 -> 62 classes, 48,670 parameters; FedJAX's ``emnist.create_logistic_model``).
* :func:`stackoverflow_tag_logistic_regression`: one-vs-rest logistic regression from a bag of words to tags, as the
  reference's tag prediction task (TFF ``stackoverflow/tag_prediction_tasks.py``: ``Dense(tags, 'sigmoid')`` on a
  10,000-word bag of words, 500 tags, 5,000,500 parameters; Reddi et al., ICLR 2021, "SO LR"). Loss: binary
  cross-entropy averaged over tags (Keras ``BinaryCrossentropy``; computed from logits, without Keras' clipping of
  probabilities to ``[1e-7, 1 - 1e-7]``). The reference sums it over the batch (``Reduction.SUM``); here, as for
  every model of the library, a step differentiates the mean over the batch's real examples, so the reference's
  client learning rate corresponds to ``batch_size`` times ours. Metrics: ``precision`` (threshold 0.5) and
  ``recall_at_5`` (Keras ``Precision()`` and ``Recall(top_k=5)``), each reported as a numerator and a denominator
  sum (see :mod:`fedjax_lite.models.sequence` for why) and turned into the ratios by :func:`tag_metrics`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fedjax_lite.core.model import Batch, Model
from fedjax_lite.models.adapter import from_flax
from fedjax_lite.models.sequence import finalize_ratio_metrics
from fedjax_lite.models.zoo import DenseSoftmax, _check_input_shape, _check_num_classes, _sample_input

TAG_RATIOS: dict[str, tuple[str, str]] = {
    "precision": ("true_positives", "predicted_positives"),
    "recall_at_5": ("true_positives_at_5", "label_positives"),
}


def logistic_regression(num_classes: int = 62, input_shape: Sequence[int] = (28, 28, 1)) -> Model:
  """Multinomial logistic regression on the flattened input (zero-initialized, as the problem is convex).

  ``p(y | x) = softmax(W flatten(x) + b)``; ``(prod(input_shape) + 1) * num_classes`` parameters: 48,670 for
  EMNIST-62, 7,850 for digits.

  Args:
    num_classes: number of classes, an int >= 2 (62 for EMNIST, 10 for its digits).
    input_shape: shape of one example (any non-empty tuple of positive ints; it is flattened).
  """
  num_classes = _check_num_classes(num_classes)
  shape = _check_input_shape(input_shape, image=False)
  return from_flax(DenseSoftmax(num_classes=num_classes), _sample_input(shape), name="logistic_regression")


class MultiLabelLinear(nn.Module):
  """``logits = W x + b`` on a flat feature vector ``x [B, D]`` (Glorot-uniform kernel, zero bias, as Keras)."""

  num_labels: int

  @nn.compact
  def __call__(self, inputs: jax.Array, train: bool = False) -> jax.Array:
    del train
    inputs = jnp.asarray(inputs)
    if inputs.ndim != 2:
      raise ValueError(f"inputs must be bag-of-words vectors [B, D], got shape {inputs.shape}.")
    return nn.Dense(self.num_labels, kernel_init=nn.initializers.glorot_uniform(),
                    bias_init=nn.initializers.zeros_init())(inputs.astype(jnp.float32))


def _labels(batch: Batch, logits: jax.Array, label_key: str) -> jax.Array:
  labels = jnp.asarray(batch[label_key]).astype(jnp.float32)
  if labels.shape != logits.shape:
    raise ValueError(f"multi-hot labels must have the logits' shape {logits.shape}, got {labels.shape}.")
  return labels


def multi_label_loss(label_key: str = "y"):
  """Per-example binary cross-entropy averaged over labels: ``mean_k BCE(y_k, sigmoid(logit_k))``."""

  def loss(batch: Batch, logits: jax.Array) -> jax.Array:
    logits = logits.astype(jnp.float32)
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, _labels(batch, logits, label_key)), axis=-1)

  return loss


def multi_label_metrics(label_key: str = "y"):
  """Per-example sums for ``precision`` (threshold 0.5, i.e. logit > 0) and ``recall_at_5``.

  ``true_positives`` = labels predicted positive; ``predicted_positives``; ``true_positives_at_5`` = labels among
  the 5 highest logits (exactly 5, ties broken by index); ``label_positives``. Ratios: :data:`TAG_RATIOS`.
  """

  def predicted(logits):
    return logits > 0.0  # sigmoid(logit) > 0.5


  def true_positives(batch, logits):
    return jnp.sum(predicted(logits) * _labels(batch, logits, label_key), axis=-1)

  def predicted_positives(batch, logits):
    return jnp.sum(predicted(logits), axis=-1).astype(jnp.float32)

  def true_positives_at_k(batch, logits):
    top = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]  # exactly k indices, as Keras' top-k filter
    return jnp.sum(jnp.take_along_axis(_labels(batch, logits, label_key), top, axis=-1), axis=-1)

  def label_positives(batch, logits):
    return jnp.sum(_labels(batch, logits, label_key), axis=-1)

  return {
      "true_positives": true_positives,
      "predicted_positives": predicted_positives,
      "true_positives_at_5": true_positives_at_k,
      "label_positives": label_positives,
  }


def stackoverflow_tag_logistic_regression(vocab_size: int = 10_000, num_tags: int = 500) -> Model:
  """The reference's StackOverflow tag prediction model (bag of words -> independent sigmoid per tag).

  Batches: ``x`` bag-of-words ``[B, vocab_size]`` float, ``y`` multi-hot tags ``[B, num_tags]``. See the module
  docstring for the loss and metrics; :func:`tag_metrics` turns the sums into ``precision`` and ``recall_at_5``.

  Args:
    vocab_size: words in the bag of words (10,000).
    num_tags: tags (500).
  """
  for name, value in (("vocab_size", vocab_size), ("num_tags", num_tags)):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}.")
  return from_flax(
      MultiLabelLinear(num_labels=num_tags),
      jnp.zeros((1, vocab_size), jnp.float32),
      loss=multi_label_loss(),
      metrics=multi_label_metrics(),
      name="stackoverflow_tag_logistic_regression",
  )


def tag_metrics(sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """``precision`` and ``recall_at_5`` from the tag model's metric sums (raw or finalized)."""
  return finalize_ratio_metrics(sums, TAG_RATIOS)
