"""Tests for fedjax_lite.datasets.synthetic: sizes, shapes, the teacher labels, heterogeneity, argument checks."""

import numpy as np
import pytest

from fedjax_lite.datasets import SyntheticLeafTask, synthetic_leaf, synthetic_leaf_task


def _assert_labels_follow_teachers(data, task):
  """y == argmax(x W_k + b_k), recomputed independently; near-ties (top-2 margin < 1e-6) are not judged."""
  for k in range(data.num_clients):
    client = data.client(k)
    logits = np.einsum("nf,fc->nc", client["x"].astype(np.float64), task.weights[k]) + task.biases[k]
    top_two = np.sort(logits, axis=1)[:, -2:]
    clear = top_two[:, 1] - top_two[:, 0] > 1e-6
    np.testing.assert_array_equal(np.argmax(logits, axis=1)[clear], client["y"][clear])
    assert clear.mean() > 0.99


def test_sizes_shapes_and_dtypes():
  data = synthetic_leaf(num_clients=12, alpha=0.5, beta=0.5, seed=3)
  task = synthetic_leaf_task(num_clients=12, alpha=0.5, beta=0.5, seed=3)
  assert data.num_clients == 12
  assert data.client_ids == tuple(f"client_{k:02d}" for k in range(12))
  assert data.element_spec == {"x": ((60,), np.dtype(np.float32)), "y": ((), np.dtype(np.int32))}
  np.testing.assert_array_equal(data.client_sizes, task.client_sizes)
  assert data.client_sizes.min() >= 50
  assert data.examples["y"].min() >= 0 and data.examples["y"].max() < 10
  assert task.weights.shape == (12, 60, 10) and task.biases.shape == (12, 10)
  assert task.feature_means.shape == (12, 60)
  np.testing.assert_allclose(task.feature_variances, np.arange(1, 61) ** -1.2)


def test_min_and_max_size():
  task = synthetic_leaf_task(num_clients=200, min_size=7, max_size=300, seed=0)
  assert task.client_sizes.min() >= 7 and task.client_sizes.max() <= 300
  assert np.any(task.client_sizes == 300)  # the lognormal(4, 2) tail is actually capped
  data = synthetic_leaf(num_clients=5, min_size=1, max_size=1, num_features=3, num_classes=2)
  np.testing.assert_array_equal(data.client_sizes, np.ones(5))


@pytest.mark.parametrize("kwargs", [dict(iid=True), dict(alpha=1.0, beta=1.0), dict(alpha=0.0, beta=0.0)])
def test_labels_follow_argmax_of_teacher(kwargs):
  data = synthetic_leaf(num_clients=8, max_size=400, seed=5, **kwargs)
  task = synthetic_leaf_task(num_clients=8, max_size=400, seed=5, **kwargs)
  _assert_labels_follow_teachers(data, task)
  for k in range(data.num_clients):  # the public helper agrees exactly
    np.testing.assert_array_equal(task.labels(k, data.client(k)["x"]), data.client(k)["y"])


def test_iid_shares_one_teacher_and_zero_mean_inputs():
  task = synthetic_leaf_task(num_clients=6, iid=True, seed=2)
  assert np.all(task.weights == task.weights[0]) and np.all(task.biases == task.biases[0])
  assert np.all(task.feature_means == 0)
  data = synthetic_leaf(num_clients=6, iid=True, seed=2, min_size=3000, max_size=3000)
  inputs = data.examples["x"]
  np.testing.assert_allclose(inputs.mean(axis=0), 0.0, atol=0.05)
  np.testing.assert_allclose(inputs.var(axis=0), np.arange(1, 61) ** -1.2, rtol=0.1)  # Sigma_jj = j^-1.2


def test_alpha_and_beta_control_heterogeneity():
  # Spread across clients of the teachers' mean weight (≈ u_k) and of the input means (≈ B_k).
  homogeneous = synthetic_leaf_task(num_clients=50, alpha=0.0, beta=0.0, seed=0)
  heterogeneous = synthetic_leaf_task(num_clients=50, alpha=1.0, beta=1.0, seed=0)
  spread = lambda array: np.std(array.reshape(array.shape[0], -1).mean(axis=1))
  assert spread(homogeneous.weights) < 0.2 < 0.6 < spread(heterogeneous.weights)
  assert spread(homogeneous.feature_means) < 0.3 < 0.6 < spread(heterogeneous.feature_means)
  # Client sizes are drawn first, so they do not depend on alpha and beta.
  np.testing.assert_array_equal(homogeneous.client_sizes, heterogeneous.client_sizes)


def test_deterministic_for_seed_and_changes_with_seed():
  first = synthetic_leaf(num_clients=4, seed=9, max_size=200)
  again = synthetic_leaf(num_clients=4, seed=9, max_size=200)
  np.testing.assert_array_equal(first.examples["x"], again.examples["x"])
  np.testing.assert_array_equal(first.examples["y"], again.examples["y"])
  other = synthetic_leaf(num_clients=4, seed=10, max_size=200)
  assert first.examples["x"].shape != other.examples["x"].shape or not np.array_equal(
      first.examples["x"], other.examples["x"]
  )


@pytest.mark.parametrize("function", [synthetic_leaf, synthetic_leaf_task])
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(num_clients=0), ValueError, "num_clients"),
        (dict(alpha=-0.1), ValueError, "alpha"),
        (dict(alpha="big"), TypeError, "alpha"),
        (dict(beta=float("nan")), ValueError, "beta"),
        (dict(iid="yes"), TypeError, "iid"),
        (dict(num_features=0), ValueError, "num_features"),
        (dict(num_classes=1), ValueError, "num_classes"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(min_size=0), ValueError, "min_size"),
        (dict(min_size=10, max_size=9), ValueError, "max_size"),
    ],
)
def test_bad_arguments(function, kwargs, error, match):
  with pytest.raises(error, match=match):
    function(**kwargs)


@pytest.mark.parametrize(
    "client_index, inputs, error, match",
    [
        (3, np.zeros((2, 60)), ValueError, "client_index"),
        (1.0, np.zeros((2, 60)), TypeError, "client_index"),
        (0, np.zeros((2, 59)), ValueError, "inputs"),
    ],
)
def test_task_labels_bad_arguments(client_index, inputs, error, match):
  task = synthetic_leaf_task(num_clients=3, max_size=60)
  assert isinstance(task, SyntheticLeafTask)
  with pytest.raises(error, match=match):
    task.labels(client_index, inputs)
