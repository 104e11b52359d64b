"""Label flipping on packed round data."""

from __future__ import annotations

import numpy as np
import pytest

from fedjax_lite.attacks import flip_labels, label_flip


def test_flips_only_the_malicious_clients_labels():
  round_data = {"x": np.zeros((3, 2, 4, 1), np.float32), "y": np.arange(24, dtype=np.int32).reshape(3, 2, 4) % 10,
                "num_examples": np.array([8, 8, 0])}
  out = label_flip(10)(round_data, np.array([False, True, False]))
  out = {name: np.asarray(leaf) for name, leaf in out.items()}
  np.testing.assert_array_equal(out["y"][1], 9 - round_data["y"][1])
  np.testing.assert_array_equal(out["y"][[0, 2]], round_data["y"][[0, 2]])
  assert out["y"].dtype == np.int32 and np.array_equal(out["x"], round_data["x"])


def test_argument_checks():
  round_data = {"y": np.zeros((2, 3), np.int32)}
  with pytest.raises(ValueError, match="num_classes"):
    label_flip(1)
  with pytest.raises(ValueError, match="'label'"):
    flip_labels(round_data, np.array([True, False]), 4, label_key="label")
  with pytest.raises(TypeError, match="integer labels"):
    flip_labels({"y": np.zeros((2, 3), np.float32)}, np.array([True, False]), 4)
  with pytest.raises(ValueError, match="malicious must have shape"):
    flip_labels(round_data, np.array([True]), 4)
