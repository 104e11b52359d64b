"""Tests for fedjax_lite.models.linear: parameter counts, and the tag model's loss, precision and recall@5 exactly
on a hand-made batch."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lite.core.model import finalize_metric_sums, masked_loss_and_metric_sums
from fedjax_lite.models import logistic_regression, stackoverflow_tag_logistic_regression, tag_metrics


def num_params(model) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(jax.eval_shape(model.init, jax.random.key(0))))


def test_parameter_counts():
  # EMNIST-62 logistic regression (FedJAX emnist.create_logistic_model: Flatten, Linear(62)): 784 * 62 + 62.
  assert num_params(logistic_regression()) == 784 * 62 + 62 == 48_670
  assert num_params(logistic_regression(num_classes=10)) == 7_850
  # TFF simulation/baselines/stackoverflow/tag_prediction_tasks.py: Dense(500, sigmoid) on a 10,000-word bag of
  # words (constants.DEFAULT_WORD_VOCAB_SIZE / DEFAULT_TAG_VOCAB_SIZE): 10,000 * 500 + 500.
  assert num_params(stackoverflow_tag_logistic_regression()) == 5_000_500


def test_logistic_regression_output_shape():
  model = logistic_regression(num_classes=62, input_shape=(28, 28))
  params = model.init(jax.random.key(0))
  assert model.apply(params, {"x": np.zeros((3, 28, 28), np.float32)}, None, False).shape == (3, 62)


def test_tag_loss_precision_and_recall_at_5_exactly():
  model = stackoverflow_tag_logistic_regression(vocab_size=3, num_tags=7)
  # Zero kernel, chosen biases: every example's logits are the bias.
  bias = np.array([4.0, 3.0, 2.0, 1.0, 0.5, -1.0, -2.0], np.float32)  # positives (> 0): tags 0..4; top 5: tags 0..4
  params = {"Dense_0": {"kernel": np.zeros((3, 7), np.float32), "bias": bias}}
  labels = np.array([[1, 0, 0, 0, 0, 1, 0],   # TP 1 (tag 0), label positives 2, top-5 hits 1
                     [0, 1, 1, 0, 0, 0, 1],   # TP 2, label positives 3, top-5 hits 2
                     [1, 1, 1, 1, 1, 1, 1]],  # a padded slot
                    np.float32)
  batch = {"x": np.ones((3, 3), np.float32), "y": labels}
  mean_loss, sums = masked_loss_and_metric_sums(model, params, batch, np.array([True, True, False]), None, False)
  assert float(sums["true_positives"]) == 3.0
  assert float(sums["predicted_positives"]) == 10.0  # 5 per real example
  assert float(sums["true_positives_at_5"]) == 3.0
  assert float(sums["label_positives"]) == 5.0
  metrics = tag_metrics(sums)
  assert float(metrics["precision"]) == float(np.float32(3) / np.float32(10))
  assert float(metrics["recall_at_5"]) == float(np.float32(3) / np.float32(5))
  assert float(tag_metrics(finalize_metric_sums(sums))["recall_at_5"]) == float(metrics["recall_at_5"])
  # Binary cross-entropy from logits, averaged over the 7 tags, then over the 2 real examples (float64 reference;
  # float32 terms of size <= 4 summed 14 times: well inside 1e-5 relative).
  softplus = lambda v: math.log1p(math.exp(-abs(v))) + max(v, 0.0)
  per_example = [sum(softplus(b) - y * b for b, y in zip(bias.tolist(), row)) / 7 for row in labels[:2].tolist()]
  assert float(mean_loss) == pytest.approx(sum(per_example) / 2, rel=1e-5)


def test_argument_checks():
  with pytest.raises(ValueError, match="num_tags must be a positive int"):
    stackoverflow_tag_logistic_regression(num_tags=0)
  with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
    logistic_regression(num_classes=1)
  model = stackoverflow_tag_logistic_regression(vocab_size=3, num_tags=7)
  params = jax.eval_shape(model.init, jax.random.key(0))
  with pytest.raises(ValueError, match="multi-hot labels must have the logits' shape"):
    jax.eval_shape(lambda p: model.loss({"y": jnp.zeros((2, 6))}, model.apply(p, {"x": jnp.zeros((2, 3))}, None,
                                                                               False)), params)
