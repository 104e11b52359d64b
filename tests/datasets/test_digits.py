"""Tests for fedjax_lite.datasets.digits: shapes, ranges, the stratified split, the default non-IID partition."""

import numpy as np
import pytest
from sklearn import datasets as sklearn_datasets

from fedjax_lite.datasets import DIGITS_NUM_EXAMPLES, DigitsData, load_digits


@pytest.fixture(scope="module")
def default_digits() -> DigitsData:
  return load_digits()


def _rows(x, y):
  """Each example as bytes, sorted: a multiset of examples that ignores order."""
  return sorted(x.reshape(len(y), -1).tobytes()[i * 256:(i + 1) * 256] + bytes([int(label)])
                for i, label in enumerate(y))


def test_shapes_dtypes_and_ranges(default_digits):
  data = default_digits
  assert data.num_classes == 10 and data.input_shape == (8, 8, 1)
  assert data.train.num_clients == 50
  assert data.train.element_spec == {"x": ((8, 8, 1), np.dtype(np.float32)), "y": ((), np.dtype(np.int32))}
  assert data.test["x"].dtype == np.float32 and data.test["x"].shape[1:] == (8, 8, 1)
  assert data.test["y"].dtype == np.int32 and data.test["y"].shape == (data.test["x"].shape[0],)
  for x in (data.train.examples["x"], data.test["x"]):
    assert x.min() >= 0.0 and x.max() <= 1.0
  assert data.train.examples["x"].max() == 1.0  # scaled by 16, not left in 0..16
  for y in (data.train.examples["y"], data.test["y"]):
    assert set(np.unique(y).tolist()) <= set(range(10))


def test_sizes_sum_to_1797_and_split_is_a_partition_of_the_data(default_digits):
  data = default_digits
  assert data.train.num_examples + data.test["y"].size == DIGITS_NUM_EXAMPLES == 1797
  assert abs(data.test["y"].size - 0.2 * 1797) <= 10
  bunch = sklearn_datasets.load_digits()
  original = _rows((bunch.images / 16.0).astype(np.float32), bunch.target)
  x = np.concatenate([data.train.examples["x"], data.test["x"]])
  y = np.concatenate([data.train.examples["y"], data.test["y"]])
  assert _rows(x, y) == original


def test_test_split_has_every_class_in_proportion(default_digits):
  test_counts = np.bincount(default_digits.test["y"], minlength=10)
  train_counts = np.bincount(default_digits.train.examples["y"], minlength=10)
  assert np.all(test_counts >= 1) and np.all(train_counts >= 1)
  total = test_counts + train_counts
  np.testing.assert_allclose(test_counts, 0.2 * total, atol=1)  # stratified


def test_default_partition_is_label_skewed(default_digits):
  train = default_digits.train
  distinct_labels = np.array([np.unique(train.client(k)["y"]).size for k in range(train.num_clients)])
  assert distinct_labels.max() <= 4
  assert distinct_labels.mean() <= 2.5  # 2.08 with seed 0
  sizes = train.client_sizes
  assert sizes.min() >= 28 and sizes.max() <= 30


def test_other_partitions():
  iid = load_digits(partition="iid", num_clients=20)
  sizes = iid.train.client_sizes
  assert sizes.max() - sizes.min() <= 1
  dirichlet = load_digits(partition="dirichlet", num_clients=20, alpha=0.5)
  assert dirichlet.train.num_clients == 20
  assert dirichlet.train.num_examples == iid.train.num_examples  # the test split does not depend on partition
  np.testing.assert_array_equal(dirichlet.test["y"], iid.test["y"])


def test_deterministic_for_seed_and_changes_with_seed(default_digits):
  again = load_digits(seed=0)
  np.testing.assert_array_equal(again.train.offsets, default_digits.train.offsets)
  np.testing.assert_array_equal(again.train.examples["x"], default_digits.train.examples["x"])
  np.testing.assert_array_equal(again.test["x"], default_digits.test["x"])
  other = load_digits(seed=1)
  assert not np.array_equal(other.test["x"], default_digits.test["x"])
  assert not np.array_equal(other.train.examples["y"], default_digits.train.examples["y"])


def test_arrays_are_read_only(default_digits):
  with pytest.raises(ValueError):
    default_digits.test["x"][0, 0, 0, 0] = 2.0


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(partition="pathological"), ValueError, "partition"),
        (dict(test_fraction=0.0), ValueError, "test_fraction"),
        (dict(test_fraction=1.0), ValueError, "test_fraction"),
        (dict(test_fraction="0.2"), TypeError, "test_fraction"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(seed=0.5), TypeError, "seed"),
        (dict(num_clients=0), ValueError, "num_clients"),
        (dict(num_clients=5000, partition="iid"), ValueError, "num_examples"),
        (dict(shards_per_client=0), ValueError, "shards_per_client"),
        (dict(partition="dirichlet", alpha=-1.0), ValueError, "alpha"),
    ],
)
def test_bad_arguments(kwargs, error, match):
  with pytest.raises(error, match=match):
    load_digits(**kwargs)
