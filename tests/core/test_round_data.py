"""Round data checked at the boundary: each malformed input gives an error that names it."""

from __future__ import annotations

import numpy as np
import pytest

from fedjax_lite.core import round_data
from fedjax_lite.core.packing import pack_clients
from tests.conftest import make_population


def _packed():
  return pack_clients(make_population(), [0, 1, 2], batch_size=4, seed=0, round_num=0)


def test_a_packed_round_passes():
  round_data.check_round_data(_packed())


@pytest.mark.parametrize("corrupt, match", [
    (lambda d: d.pop("mask"), "round_data has no 'mask'"),
    (lambda d: d.pop("num_examples"), "round_data has no 'num_examples'"),
    (lambda d: d.update(x=d["x"][:2]), r"round_data\['x'\] has 2 clients, 'mask' has 3"),
    (lambda d: d.update(y=d["y"][:, :1]), r"round_data\['y'\] has shape .* must start with the mask's"),
    (lambda d: d.update(num_examples=d["num_examples"][:2]), r"round_data\['num_examples'\] must have shape"),
    (lambda d: d.update(mask=d["mask"][..., 0]), r"round_data\['mask'\] must have shape \[clients, steps, batch\]"),
    (lambda d: d.update(client_state={"c": np.zeros((2, 5))}), r"round_data\['client_state'\]\['c'\] has 2"),
])
def test_malformed_rounds_are_named(corrupt, match):
  data = dict(_packed())
  corrupt(data)
  with pytest.raises(ValueError, match=match):
    round_data.check_round_data(data)


def test_mask_must_be_boolean_and_round_data_a_dict():
  data = dict(_packed(), mask=_packed()["mask"].astype(np.float32))
  with pytest.raises(TypeError, match="mask'\\] must be boolean"):
    round_data.check_round_data(data)
  with pytest.raises(TypeError, match="round_data must be a dict"):
    round_data.check_round_data([1, 2])


def test_checker_runs_once_per_shape(monkeypatch):
  calls = []
  monkeypatch.setattr(round_data, "check_round_data", lambda data, name: calls.append(name))
  checker = round_data.RoundDataChecker()
  population = make_population()
  for round_num in range(5):  # same shapes every round
    checker(pack_clients(population, [0, 1, 2], batch_size=4, num_steps=8, seed=0, round_num=round_num))
  assert len(calls) == 1
  checker(pack_clients(population, [0, 1], batch_size=4, num_steps=8, seed=0, round_num=0))
  assert len(calls) == 2


def test_labels_outside_the_models_classes_are_named():
  examples = {"x": np.zeros((5, 2), np.float32), "y": np.array([0, 3, 4, 1, -1], np.int32)}
  with pytest.raises(ValueError, match=r"train_data\['y'\] has labels outside the model's 4 classes .*\[4, -1\]"):
    round_data.check_labels(examples, 4)
  with pytest.raises(ValueError, match="no label feature 'label'"):
    round_data.check_labels(examples, 5, label_key="label")
  with pytest.raises(TypeError, match="integer class labels"):
    round_data.check_labels({"y": np.array([0.5])}, 2)
  round_data.check_labels({"y": np.array([0, 1, 2])}, 3)


def test_clients_with_differing_features_are_named():
  good = {"x": np.zeros((3, 4)), "y": np.zeros(3, np.int32)}
  with pytest.raises(ValueError, match=r"client 'b': feature 'x' has per-example shape \(5,\), client 'a' has "
                                       r"\(4,\)"):
    round_data.check_client_features({"a": good, "b": {"x": np.zeros((2, 5)), "y": np.zeros(2, np.int32)}})
  with pytest.raises(ValueError, match="client 'b' has features \\['x'\\], client 'a' has \\['x', 'y'\\]"):
    round_data.check_client_features({"a": good, "b": {"x": np.zeros((2, 4))}})
  with pytest.raises(ValueError, match="different numbers of examples"):
    round_data.check_client_features({"a": {"x": np.zeros((3, 4)), "y": np.zeros(2)}})
  round_data.check_client_features({"a": good, "b": good})


def test_federated_data_from_clients_names_the_client_with_other_shapes():
  from fedjax_lite.core.federated_data import FederatedData

  with pytest.raises(ValueError, match=r"client 'b': feature 'x' has per-example shape \(5,\)"):
    FederatedData.from_clients({"a": {"x": np.zeros((3, 4)), "y": np.zeros(3, np.int32)},
                                "b": {"x": np.zeros((2, 5)), "y": np.zeros(2, np.int32)}})
