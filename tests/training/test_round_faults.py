"""Faults in the data path caught by the loop: labels outside the model's classes, rounds that train nothing."""

from __future__ import annotations

import warnings

import numpy as np
import optax
import pytest

from fedjax_lite.algorithms import fed_avg
from fedjax_lite.core import ClientSpec
from fedjax_lite.core.federated_data import FederatedData
from fedjax_lite.training.loop import TrainingStalledError, run_training
from tests.conftest import make_population


def _process(tiny_model):
  return fed_avg(tiny_model, client_learning_rate=0.1, server_optimizer=optax.sgd(1.0))


def test_labels_outside_the_models_classes_are_refused_before_training(tiny_model, tiny_params):
  population = make_population(num_classes=6)  # the tiny model has 4 classes
  with pytest.raises(ValueError, match=r"train_data\['y'\] has labels outside the model's 4 classes"):
    run_training(_process(tiny_model), population, tiny_params, client_spec=ClientSpec(batch_size=4),
                 clients_per_round=2, num_rounds=1, progress=False, num_classes=4)


def _nan_population():
  population = make_population()
  clients = {cid: dict(population[cid]) for cid in population.client_ids}
  for examples in clients.values():
    examples["x"] = np.full_like(examples["x"], np.nan)
  return FederatedData.from_clients(clients)


def test_rounds_whose_every_client_is_rejected_warn_then_stop(tiny_model, tiny_params):
  records = []
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with pytest.raises(TrainingStalledError, match=r"round 2: every client's update was rejected .* Stopped after "
                                                   r"3 such rounds"):
      run_training(_process(tiny_model), _nan_population(), tiny_params, client_spec=ClientSpec(batch_size=4),
                   clients_per_round=2, num_rounds=10, progress=False,
                   on_round_end=lambda round_num, record: records.append(record))
  rejected = [w for w in caught if "every client's update was rejected" in str(w.message)]
  assert len(rejected) == 2  # rounds 0 and 1 warn; round 2 stops
  assert len(records) == 2 and all(r["client_work/num_non_finite_clients"] == 2 for r in records)


def test_max_rejected_rounds_is_configurable(tiny_model, tiny_params):
  with pytest.raises(TrainingStalledError, match="round 0"):
    run_training(_process(tiny_model), _nan_population(), tiny_params, client_spec=ClientSpec(batch_size=4),
                 clients_per_round=2, num_rounds=3, progress=False, max_rejected_rounds=1)
  with pytest.raises(ValueError, match="max_rejected_rounds"):
    run_training(_process(tiny_model), _nan_population(), tiny_params, client_spec=ClientSpec(batch_size=4),
                 clients_per_round=2, num_rounds=3, progress=False, max_rejected_rounds=0)
