"""CIFAR-100: the baseline's central crop and per-image standardization, on a generated SQLite file."""

import numpy as np
import pytest

from fedjax_lite.datasets import load_cifar100
from fedjax_lite.datasets.cifar100 import crop_and_standardize
from fedjax_lite.datasets.file_writers import write_tff_sqlite


def test_crop_and_standardize_formula():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
  images[2] = 7  # a constant image: std 0, divided by 1/sqrt(n) instead
  out = crop_and_standardize(images, 24)
  assert out.shape == (3, 24, 24, 3) and out.dtype == np.float32
  crop = images[:, 4:28, 4:28].astype(np.float64)
  for k in range(3):
    expected = (crop[k] - crop[k].mean()) / max(crop[k].std(), 1 / np.sqrt(24 * 24 * 3))
    # float64 statistics, one float32 rounding at the end: within 1 ulp of float32.
    np.testing.assert_allclose(out[k], expected, rtol=2 ** -23, atol=2 ** -23 * np.abs(expected).max())
  np.testing.assert_array_equal(out[2], 0.0)
  with pytest.raises(ValueError, match="crop_size"):
    crop_and_standardize(images, 33)


def test_load_cifar100(tmp_path):
  rng = np.random.default_rng(1)
  def clients(n_clients):
    return {str(k): {"image": rng.integers(0, 256, size=(2, 32, 32, 3)), "label": rng.integers(0, 100, 2),
                     "coarse_label": rng.integers(0, 20, 2)} for k in range(n_clients)}
  train, test = clients(3), clients(2)
  write_tff_sqlite(tmp_path / "cifar100.sqlite", {"train": train, "test": test})
  data = load_cifar100(data_dir=tmp_path, cache_dir=tmp_path / "c")
  assert data.num_classes == 100 and data.input_shape == (24, 24, 3)
  assert data.train.client_ids == ("0", "1", "2") and data.test.num_clients == 2
  np.testing.assert_array_equal(data.train["1"]["x"], crop_and_standardize(train["1"]["image"].astype(np.uint8)))
  np.testing.assert_array_equal(data.train["1"]["y"], train["1"]["label"])
  assert load_cifar100(32, data_dir=tmp_path, cache_dir=tmp_path / "c").input_shape == (32, 32, 3)
