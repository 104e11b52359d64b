"""Tests for fedjax_lite.core.partition: exact partition properties, label skew, determinism, argument checks."""

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fedjax_lite.core.partition import dirichlet_partition, iid_partition, partition_dataset, shard_partition

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _assert_is_partition(assignment, num_examples, num_clients):
  """Every example has exactly one client index in range, and no client is empty."""
  assert assignment.shape == (num_examples,)
  assert np.issubdtype(assignment.dtype, np.integer)
  assert assignment.min() >= 0 and assignment.max() < num_clients
  assert np.all(np.bincount(assignment, minlength=num_clients) >= 1)


def _mean_dominant_label_share(labels, assignment, num_clients):
  """Mean over clients of the fraction of a client's examples that carry its most common label (1 = one label)."""
  shares = []
  for client in range(num_clients):
    client_labels = labels[assignment == client]
    shares.append(np.bincount(client_labels).max() / client_labels.size)
  return float(np.mean(shares))


def _balanced_labels(num_classes, per_class, seed=0):
  return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))


# iid_partition ---------------------------------------------------------------------------------------------------


def test_iid_sizes_differ_by_at_most_one():
  assignment = iid_partition(1001, 7, seed=0)
  _assert_is_partition(assignment, 1001, 7)
  sizes = np.bincount(assignment)
  assert sizes.sum() == 1001 and sizes.max() - sizes.min() <= 1


def test_iid_deterministic_for_seed_and_changes_with_seed():
  np.testing.assert_array_equal(iid_partition(500, 10, seed=3), iid_partition(500, 10, seed=3))
  assert not np.array_equal(iid_partition(500, 10, seed=3), iid_partition(500, 10, seed=4))


def test_iid_one_client_per_example():
  assignment = iid_partition(5, 5, seed=1)
  assert sorted(assignment.tolist()) == [0, 1, 2, 3, 4]


_EXAMPLES_AND_CLIENTS = st.integers(1, 400).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, min(n, 120))))


@FAST
@given(examples_and_clients=_EXAMPLES_AND_CLIENTS, seed=st.integers(0, 2**32 - 1))
def test_iid_is_a_partition_property(examples_and_clients, seed):
  num_examples, num_clients = examples_and_clients
  assignment = iid_partition(num_examples, num_clients, seed=seed)
  _assert_is_partition(assignment, num_examples, num_clients)
  sizes = np.bincount(assignment, minlength=num_clients)
  assert sizes.max() - sizes.min() <= 1


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(num_examples=0, num_clients=1, seed=0), ValueError, "num_examples"),
        (dict(num_examples=3, num_clients=4, seed=0), ValueError, "num_examples"),
        (dict(num_examples=10, num_clients=0, seed=0), ValueError, "num_clients"),
        (dict(num_examples=10, num_clients=2.0, seed=0), TypeError, "num_clients"),
        (dict(num_examples=10, num_clients=2, seed=-1), ValueError, "seed"),
        (dict(num_examples=10, num_clients=2, seed=None), TypeError, "seed"),
    ],
)
def test_iid_bad_arguments(kwargs, error, match):
  num_examples = kwargs.pop("num_examples")
  num_clients = kwargs.pop("num_clients")
  with pytest.raises(error, match=match):
    iid_partition(num_examples, num_clients, **kwargs)


# shard_partition --------------------------------------------------------------------------------------------------


def test_shards_at_most_shards_per_client_labels_when_classes_fill_whole_shards():
  # 10 clients x 2 shards = 20 shards of 5; every class size is a multiple of 5, so every shard is single-label.
  class_sizes = [10, 20, 5, 15, 10, 10, 5, 15, 5, 5]
  labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), class_sizes))
  assert labels.size == 100
  for seed in range(5):
    assignment = shard_partition(labels, 10, shards_per_client=2, seed=seed)
    _assert_is_partition(assignment, 100, 10)
    assert np.all(np.bincount(assignment) == 10)
    for client in range(10):
      assert np.unique(labels[assignment == client]).size <= 2


def test_shards_mcmahan_scale():
  # McMahan et al.: 100 clients x 2 shards of 300 over 60,000 MNIST-like labels (6,000 per class).
  labels = _balanced_labels(10, 6000)
  assignment = shard_partition(labels, 100, shards_per_client=2, seed=0)
  _assert_is_partition(assignment, 60000, 100)
  assert np.all(np.bincount(assignment) == 600)
  distinct = [np.unique(labels[assignment == client]).size for client in range(100)]
  assert max(distinct) <= 2


def test_shards_keep_remainder_examples():
  labels = _balanced_labels(10, 144)[:1437]  # 1437 = 100 shards of 14 + remainder 37
  assignment = shard_partition(labels, 50, shards_per_client=2, seed=0)
  _assert_is_partition(assignment, 1437, 50)
  sizes = np.bincount(assignment)
  assert sizes.sum() == 1437
  assert sizes.min() >= 28 and sizes.max() <= 30
  # Shards are contiguous in label order, so a client sees at most 2 labels per shard.
  assert max(np.unique(labels[assignment == client]).size for client in range(50)) <= 4


def test_shards_deterministic_for_seed_and_changes_with_seed():
  labels = _balanced_labels(5, 40)
  first = shard_partition(labels, 20, shards_per_client=2, seed=7)
  np.testing.assert_array_equal(first, shard_partition(labels, 20, shards_per_client=2, seed=7))
  assert not np.array_equal(first, shard_partition(labels, 20, shards_per_client=2, seed=8))


@st.composite
def _labels_and_clients(draw, max_label, min_examples_per_client):
  """(labels, num_clients) with at least ``min_examples_per_client * num_clients`` labels."""
  num_clients = draw(st.integers(1, 30))
  labels = draw(
      st.lists(st.integers(0, max_label), min_size=min_examples_per_client * num_clients, max_size=300)
  )
  return np.array(labels), num_clients


@FAST
@given(
    labels_and_clients=st.integers(1, 4).flatmap(
        lambda shards: st.tuples(_labels_and_clients(6, shards), st.just(shards))
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_shards_is_a_partition_property(labels_and_clients, seed):
  (labels, num_clients), shards_per_client = labels_and_clients
  assignment = shard_partition(labels, num_clients, shards_per_client=shards_per_client, seed=seed)
  _assert_is_partition(assignment, labels.size, num_clients)
  shard_size = labels.size // (num_clients * shards_per_client)
  sizes = np.bincount(assignment, minlength=num_clients)
  assert sizes.min() >= shards_per_client * shard_size
  assert sizes.max() <= shards_per_client * (shard_size + 1)


@pytest.mark.parametrize(
    "labels, num_clients, kwargs, error, match",
    [
        (np.zeros((4, 2), int), 2, dict(seed=0), ValueError, "labels"),
        (np.array([], int), 2, dict(seed=0), ValueError, "labels"),
        (np.array([0.5, 1.5]), 1, dict(seed=0), TypeError, "labels"),
        (np.arange(10), 0, dict(seed=0), ValueError, "num_clients"),
        (np.arange(10), 2, dict(shards_per_client=0, seed=0), ValueError, "shards_per_client"),
        (np.arange(10), 3, dict(shards_per_client=4, seed=0), ValueError, "shards_per_client"),
        (np.arange(10), 2, dict(seed=-5), ValueError, "seed"),
    ],
)
def test_shards_bad_arguments(labels, num_clients, kwargs, error, match):
  with pytest.raises(error, match=match):
    shard_partition(labels, num_clients, **kwargs)


# dirichlet_partition ----------------------------------------------------------------------------------------------


def test_dirichlet_small_alpha_is_more_skewed_than_large_alpha():
  # Statistic: mean over clients of the share of the client's most common label (1.0 = single-label clients,
  # about 0.1 + noise for an IID split of 10 balanced classes). Fixed seeds 0..2.
  labels = _balanced_labels(10, 200)
  for seed in range(3):
    skewed = dirichlet_partition(labels, 20, alpha=0.1, seed=seed)
    near_iid = dirichlet_partition(labels, 20, alpha=100.0, seed=seed)
    skewed_share = _mean_dominant_label_share(labels, skewed, 20)
    near_iid_share = _mean_dominant_label_share(labels, near_iid, 20)
    assert skewed_share > 0.5
    assert near_iid_share < 0.25
    assert skewed_share > near_iid_share + 0.3


def test_dirichlet_respects_min_client_size():
  labels = _balanced_labels(10, 100)
  assignment = dirichlet_partition(labels, 20, alpha=0.5, seed=0, min_client_size=10)
  _assert_is_partition(assignment, 1000, 20)
  assert np.bincount(assignment, minlength=20).min() >= 10


def test_dirichlet_gives_up_with_clear_error():
  labels = _balanced_labels(2, 50)
  with pytest.raises(ValueError, match="max_attempts=3.*alpha"):
    dirichlet_partition(labels, 50, alpha=0.01, seed=0, min_client_size=2, max_attempts=3)


def test_dirichlet_deterministic_for_seed_and_changes_with_seed():
  labels = _balanced_labels(10, 50)
  first = dirichlet_partition(labels, 10, alpha=1.0, seed=11)
  np.testing.assert_array_equal(first, dirichlet_partition(labels, 10, alpha=1.0, seed=11))
  assert not np.array_equal(first, dirichlet_partition(labels, 10, alpha=1.0, seed=12))


def test_dirichlet_accepts_arbitrary_integer_labels():
  labels = np.array([-3, 7, 7, 100, -3, 100] * 20)
  assignment = dirichlet_partition(labels, 4, alpha=10.0, seed=0)
  _assert_is_partition(assignment, labels.size, 4)


@FAST
@given(
    labels_and_clients=_labels_and_clients(5, 5),
    alpha=st.floats(0.5, 100.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_dirichlet_is_a_partition_property(labels_and_clients, alpha, seed):
  labels, num_clients = labels_and_clients
  try:
    assignment = dirichlet_partition(labels, num_clients, alpha=alpha, seed=seed)
  except ValueError as error:
    assert "max_attempts" in str(error)
    assume(False)  # an infeasible draw (tiny alpha, few examples) is reported, not silently mis-partitioned
  _assert_is_partition(assignment, labels.size, num_clients)
  # Per class, the counts over clients add up to the class size (nothing duplicated or lost).
  for label in np.unique(labels):
    assert np.bincount(assignment[labels == label], minlength=num_clients).sum() == np.sum(labels == label)


@pytest.mark.parametrize(
    "labels, num_clients, kwargs, error, match",
    [
        (np.zeros((3, 3), int), 1, dict(alpha=1.0, seed=0), ValueError, "labels"),
        (np.arange(10), 0, dict(alpha=1.0, seed=0), ValueError, "num_clients"),
        (np.arange(10), 2, dict(alpha=0.0, seed=0), ValueError, "alpha"),
        (np.arange(10), 2, dict(alpha=float("inf"), seed=0), ValueError, "alpha"),
        (np.arange(10), 2, dict(alpha="1", seed=0), TypeError, "alpha"),
        (np.arange(10), 2, dict(alpha=1.0, seed=0, min_client_size=0), ValueError, "min_client_size"),
        (np.arange(10), 2, dict(alpha=1.0, seed=0, min_client_size=6), ValueError, "min_client_size"),
        (np.arange(10), 2, dict(alpha=1.0, seed=0, max_attempts=0), ValueError, "max_attempts"),
        (np.arange(10), 2, dict(alpha=1.0, seed=1.5), TypeError, "seed"),
    ],
)
def test_dirichlet_bad_arguments(labels, num_clients, kwargs, error, match):
  with pytest.raises(error, match=match):
    dirichlet_partition(labels, num_clients, **kwargs)


# partition_dataset ------------------------------------------------------------------------------------------------


def test_partition_dataset_groups_examples_in_numeric_client_order():
  assignment = iid_partition(120, 12, seed=0)
  arrays = {"x": np.arange(240, dtype=np.float32).reshape(120, 2), "y": np.arange(120)}
  data = partition_dataset(arrays, assignment, id_prefix="user")
  assert data.client_ids == tuple(f"user{k:02d}" for k in range(12))
  for client in range(12):
    expected_rows = np.flatnonzero(assignment == client)
    np.testing.assert_array_equal(data.client(client)["y"], expected_rows)  # original order kept
    np.testing.assert_array_equal(data[f"user{client:02d}"]["x"], arrays["x"][expected_rows])
  assert data.num_examples == 120


def test_partition_dataset_single_client_width():
  data = partition_dataset({"y": np.arange(3)}, np.zeros(3, dtype=int))
  assert data.client_ids == ("client_0",)


@FAST
@given(examples_and_clients=_EXAMPLES_AND_CLIENTS, seed=st.integers(0, 1000))
def test_partition_dataset_property(examples_and_clients, seed):
  num_examples, num_clients = examples_and_clients
  assignment = iid_partition(num_examples, num_clients, seed=seed)
  data = partition_dataset({"y": np.arange(num_examples)}, assignment)
  assert data.num_clients == num_clients
  assert list(data.client_ids) == sorted(data.client_ids)
  np.testing.assert_array_equal(data.client_sizes, np.bincount(assignment, minlength=num_clients))
  np.testing.assert_array_equal(np.sort(data.examples["y"]), np.arange(num_examples))


@pytest.mark.parametrize(
    "arrays, assignment, kwargs, error, match",
    [
        ({"y": np.arange(3)}, np.array([0, 1, 0]), dict(id_prefix=3), TypeError, "id_prefix"),
        ([np.arange(3)], np.array([0, 1, 0]), {}, TypeError, "arrays"),
        ({"x": np.arange(3), "y": np.arange(4)}, np.array([0, 1, 0]), {}, ValueError, "arrays"),
        ({"y": np.arange(3)}, np.array([0, 1]), {}, ValueError, "assignment"),
        ({"y": np.arange(3)}, np.array([0.0, 1.0, 0.0]), {}, TypeError, "assignment"),
        ({"y": np.arange(3)}, np.array([0, -1, 0]), {}, ValueError, "assignment"),
        ({"y": np.arange(3)}, np.array([0, 2, 0]), {}, ValueError, "assignment"),
    ],
)
def test_partition_dataset_bad_arguments(arrays, assignment, kwargs, error, match):
  with pytest.raises(error, match=match):
    partition_dataset(arrays, assignment, **kwargs)
