"""LEAF JSON: FEMNIST-, Shakespeare- and Synthetic-like files written in LEAF's layout."""

import json

import numpy as np
import pytest

from fedjax_lite.datasets import load_leaf
from fedjax_lite.datasets.errors import DatasetFormatError, DatasetNotFoundError
from fedjax_lite.datasets.file_writers import write_leaf_json
from fedjax_lite.datasets.text import SHAKESPEARE_VOCABULARY


def test_femnist_folder_of_files(tmp_path):
  rng = np.random.default_rng(0)
  users = {f"f{k:04d}_00": {"x": rng.random((k + 1, 784)).astype(np.float32), "y": rng.integers(0, 62, k + 1)}
           for k in range(3)}
  write_leaf_json(tmp_path / "all_data_0.json", {u: users[u] for u in list(users)[:2]})
  write_leaf_json(tmp_path / "all_data_1.json", {u: users[u] for u in list(users)[2:]})
  data = load_leaf(tmp_path, input_shape=(28, 28, 1))
  assert data.num_clients == 3 and data.element_spec["x"] == ((28, 28, 1), np.float32)
  for user, arrays in users.items():
    np.testing.assert_array_equal(data[user]["x"].reshape(-1, 784), arrays["x"])  # float32 -> JSON -> float32
    np.testing.assert_array_equal(data[user]["y"], arrays["y"])
    assert data[user]["y"].dtype == np.int32


def test_shakespeare_text_to_ids(tmp_path):
  write_leaf_json(tmp_path / "train.json", {"ROMEO": {"x": ["abc", "bc~"], "y": ["d", "~"]}})
  data = load_leaf(tmp_path / "train.json", label_vocabulary="characters")
  ids = {c: SHAKESPEARE_VOCABULARY.index(c) + 1 for c in "abcd"}
  # '~' is outside the 86-character vocabulary: OOV, id 87.
  np.testing.assert_array_equal(data["ROMEO"]["x"], [[ids["a"], ids["b"], ids["c"]], [ids["b"], ids["c"], 87]])
  np.testing.assert_array_equal(data["ROMEO"]["y"], [ids["d"], 87])


def test_synthetic(tmp_path):
  write_leaf_json(tmp_path / "s.json", {"0": {"x": [[0.5, -1.0], [2.0, 3.0]], "y": [1, 0]}})
  data = load_leaf(tmp_path / "s.json")
  np.testing.assert_array_equal(data["0"]["x"], np.array([[0.5, -1.0], [2.0, 3.0]], np.float32))


def test_errors(tmp_path):
  with pytest.raises(DatasetNotFoundError, match="does not exist"):
    load_leaf(tmp_path / "missing")
  with pytest.raises(DatasetNotFoundError, match="no LEAF .json"):
    load_leaf(tmp_path)
  write_leaf_json(tmp_path / "t.json", {"u": {"x": [[1.0]], "y": [0]}})
  text = (tmp_path / "t.json").read_text()
  (tmp_path / "t.json").write_text(text[: len(text) // 2])
  with pytest.raises(DatasetFormatError, match="truncated"):
    load_leaf(tmp_path / "t.json")
  (tmp_path / "t.json").write_text(json.dumps({"users": ["u"], "num_samples": [2], "user_data": {
      "u": {"x": [[1.0]], "y": [0]}}}))
  with pytest.raises(DatasetFormatError, match="num_samples"):
    load_leaf(tmp_path / "t.json")
  with pytest.raises(TypeError, match="path"):
    load_leaf(3)
