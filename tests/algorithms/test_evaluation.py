"""Federated evaluation (aggregate and per-client) and centralized evaluation."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from fedjax_lite.algorithms.evaluation import centralized_evaluation, federated_evaluation
from fedjax_lite.core.model import masked_loss_and_metric_sums
from fedjax_lite.core.packing import pack_clients


def reference_metrics(model, params, examples):
  size = examples["x"].shape[0]
  _, sums = masked_loss_and_metric_sums(model, params, examples, np.ones(size, bool), None, False)
  return {k: float(v) for k, v in sums.items()}


def test_per_client_and_aggregate(population, tiny_model, tiny_params):
  indices = [0, 2, 5]
  round_data = pack_clients(population, indices, batch_size=4, cohort_size=4, shuffle=False)
  result = federated_evaluation(tiny_model)(tiny_params, round_data)
  totals = {"loss": 0.0, "accuracy": 0.0, "num_examples": 0}
  for slot, k in enumerate(indices):
    ref = reference_metrics(tiny_model, tiny_params, population.client(k))
    n = ref["num_examples"]
    assert float(result["per_client"]["loss"][slot]) == pytest.approx(ref["loss"] / n, rel=1e-5)
    assert float(result["per_client"]["accuracy"][slot]) == pytest.approx(ref["accuracy"] / n, abs=1e-6)
    assert int(result["per_client"]["num_examples"][slot]) == n
    for key in totals:
      totals[key] += ref[key]
  assert int(result["per_client"]["num_examples"][3]) == 0  # the padding slot
  assert np.isnan(float(result["per_client"]["loss"][3]))
  aggregate = result["aggregate"]
  assert int(aggregate["num_examples"]) == totals["num_examples"]
  assert float(aggregate["loss"]) == pytest.approx(totals["loss"] / totals["num_examples"], rel=1e-5)
  assert float(aggregate["accuracy"]) == pytest.approx(totals["accuracy"] / totals["num_examples"], abs=1e-6)


def test_centralized_evaluation_matches_direct_computation(population, tiny_model, tiny_params):
  examples = population.all_examples()
  result = centralized_evaluation(tiny_model, batch_size=7)(tiny_params, examples)
  ref = reference_metrics(tiny_model, tiny_params, examples)
  assert int(result["num_examples"]) == population.num_examples
  assert int(result["num_batches"]) == -(-population.num_examples // 7)
  assert float(result["loss"]) == pytest.approx(ref["loss"] / population.num_examples, rel=1e-5)


def test_evaluation_bad_arguments(tiny_model):
  with pytest.raises(TypeError, match="model"):
    federated_evaluation(None)
  with pytest.raises(ValueError, match="batch_size"):
    centralized_evaluation(tiny_model, batch_size=0)
