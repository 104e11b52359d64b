"""LEAF's Synthetic(alpha, beta) federated classification data, as used in the FedProx paper.

Li, Sahu, Zaheer, Sanjabi, Talwalkar & Smith 2020, "Federated Optimization in Heterogeneous Networks"
(arXiv:1812.06127), §5.1, and the LEAF benchmark (Caldas et al. 2018, arXiv:1812.01097). Every client ``k``
has its own softmax-regression "teacher" ``(W_k, b_k)`` and its own input distribution; ``alpha`` controls how
much the teachers differ across clients and ``beta`` how much the inputs differ. Synthetic-IID shares one
teacher and one input distribution across all clients. The data are generated on the host with numpy, fully
determined by ``seed``; :func:`synthetic_leaf_task` returns the teachers so that a model can be compared with
the ground truth.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import numpy as np

from fedjax_lite.core import validation
from fedjax_lite.core.federated_data import FederatedData
from fedjax_lite.core.partition import partition_dataset

__all__ = ["SyntheticLeafTask", "synthetic_leaf_task", "synthetic_leaf"]

# Client sizes follow LEAF / FedProx: floor(LogNormal(mean=4, sigma=2)) + min_size, with min_size = 50.
LOG_SIZE_MEAN = 4.0
LOG_SIZE_SIGMA = 2.0
DEFAULT_MIN_SIZE = 50
# Sigma_jj = j ** COVARIANCE_DECAY for j = 1..num_features.
COVARIANCE_DECAY = -1.2


@dataclasses.dataclass(frozen=True, eq=False)
class SyntheticLeafTask:
  """The ground truth behind a Synthetic(alpha, beta) dataset (client ``k`` in the storage order of the data).

  Attributes:
    weights: float64 ``[num_clients, num_features, num_classes]``, the teachers ``W_k``.
    biases: float64 ``[num_clients, num_classes]``, the teachers ``b_k``.
    feature_means: float64 ``[num_clients, num_features]``, the input means ``v_k``.
    feature_variances: float64 ``[num_features]``, the diagonal of ``Sigma``, ``Sigma_jj = j^{-1.2}``.
    client_sizes: int64 ``[num_clients]``, the number of examples of each client.
  """

  weights: np.ndarray
  biases: np.ndarray
  feature_means: np.ndarray
  feature_variances: np.ndarray
  client_sizes: np.ndarray

  def labels(self, client_index: int, inputs: np.ndarray) -> np.ndarray:
    """The teacher's labels ``argmax(softmax(x W_k + b_k)) = argmax(x W_k + b_k)`` for client ``client_index``.

    Args:
      client_index: an integer in ``[0, num_clients)``.
      inputs: array of shape ``[..., num_features]``.

    Returns:
      int32 array of shape ``inputs.shape[:-1]``.
    """
    num_clients, num_features, _ = self.weights.shape
    if isinstance(client_index, bool) or not isinstance(client_index, numbers.Integral):
      raise TypeError(f"client_index must be an integer in [0, {num_clients}), got {type(client_index).__name__}.")
    if not 0 <= client_index < num_clients:
      raise ValueError(f"client_index must be an integer in [0, {num_clients}), got {client_index}.")
    inputs = np.asarray(inputs, dtype=np.float64)
    if inputs.ndim < 1 or inputs.shape[-1] != num_features:
      raise ValueError(f"inputs must have shape [..., {num_features}], got {inputs.shape}.")
    logits = inputs @ self.weights[client_index] + self.biases[client_index]
    return np.argmax(logits, axis=-1).astype(np.int32)






def synthetic_leaf_task(
    *,
    num_clients: int = 30,
    alpha: float = 1.0,
    beta: float = 1.0,
    iid: bool = False,
    num_features: int = 60,
    num_classes: int = 10,
    seed: int = 0,
    min_size: int = DEFAULT_MIN_SIZE,
    max_size: int | None = None,
) -> SyntheticLeafTask:
  """Draws the per-client teachers, input means and sizes of Synthetic(alpha, beta).

  Non-IID (FedProx §5.1): for every client ``k``

    ``u_k ~ N(0, alpha^2)``, ``B_k ~ N(0, beta^2)``,
    ``W_k[i, c] ~ N(u_k, 1)`` of shape ``[num_features, num_classes]``, ``b_k[c] ~ N(u_k, 1)``,
    ``v_k[j] ~ N(B_k, 1)``.

  The paper writes ``N(0, alpha)``; as in the generator released with it, ``alpha`` and ``beta`` are the standard
  deviations (the two readings agree for the paper's settings 0 and 1). IID (``iid=True``, "Synthetic-IID"): one
  ``W, b ~ N(0, 1)`` shared by all clients and ``v_k = 0``; ``alpha`` and ``beta`` are ignored.

  Client sizes are ``floor(LogNormal(4, 2)) + min_size`` (a power law as in LEAF, which uses ``min_size = 50``),
  capped at ``max_size`` when given. They are drawn first, so for one ``seed`` they do not depend on ``alpha``,
  ``beta`` or ``iid``: the settings of a sweep differ only in their heterogeneity.

  Takes the same arguments as :func:`synthetic_leaf` and returns the ground truth of the data that
  :func:`synthetic_leaf` generates with them.
  """
  num_clients = validation.check_int("num_clients", num_clients, minimum=1)
  alpha = validation.check_float("alpha", alpha, low=0.0)
  beta = validation.check_float("beta", beta, low=0.0)
  if not isinstance(iid, (bool, np.bool_)):
    raise TypeError(f"iid must be a bool, got {type(iid).__name__}.")
  num_features = validation.check_int("num_features", num_features, minimum=1)
  num_classes = validation.check_int("num_classes", num_classes, minimum=2)
  seed = validation.check_int("seed", seed, minimum=0)
  min_size = validation.check_int("min_size", min_size, minimum=1)
  if max_size is not None:
    max_size = validation.check_int("max_size", max_size, minimum=min_size)

  task_rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[0])
  sizes = np.floor(task_rng.lognormal(LOG_SIZE_MEAN, LOG_SIZE_SIGMA, size=num_clients)).astype(np.int64) + min_size
  if max_size is not None:
    sizes = np.minimum(sizes, max_size)
  feature_variances = np.arange(1, num_features + 1, dtype=np.float64) ** COVARIANCE_DECAY

  if iid:
    shared_weights = task_rng.normal(0.0, 1.0, size=(num_features, num_classes))
    shared_biases = task_rng.normal(0.0, 1.0, size=num_classes)
    weights = np.broadcast_to(shared_weights, (num_clients, num_features, num_classes)).copy()
    biases = np.broadcast_to(shared_biases, (num_clients, num_classes)).copy()
    feature_means = np.zeros((num_clients, num_features))
  else:
    model_means = task_rng.normal(0.0, alpha, size=num_clients)  # u_k
    input_mean_centers = task_rng.normal(0.0, beta, size=num_clients)  # B_k
    weights = task_rng.normal(model_means[:, None, None], 1.0, size=(num_clients, num_features, num_classes))
    biases = task_rng.normal(model_means[:, None], 1.0, size=(num_clients, num_classes))
    feature_means = task_rng.normal(input_mean_centers[:, None], 1.0, size=(num_clients, num_features))

  for array in (weights, biases, feature_means, feature_variances, sizes):
    array.setflags(write=False)
  return SyntheticLeafTask(weights, biases, feature_means, feature_variances, sizes)


def synthetic_leaf(
    *,
    num_clients: int = 30,
    alpha: float = 1.0,
    beta: float = 1.0,
    iid: bool = False,
    num_features: int = 60,
    num_classes: int = 10,
    seed: int = 0,
    min_size: int = DEFAULT_MIN_SIZE,
    max_size: int | None = None,
) -> FederatedData:
  """Generates LEAF's Synthetic(alpha, beta) (or Synthetic-IID) federated dataset.

  With the teachers of :func:`synthetic_leaf_task`, client ``k``'s examples are

    ``x ~ N(v_k, Sigma)``, ``Sigma = diag(j^{-1.2})_{j=1..num_features}``,
    ``y = argmax(softmax(x W_k + b_k))``.

  Li et al. 2020, "Federated Optimization in Heterogeneous Networks" (arXiv:1812.06127), §5.1; the paper's
  settings are Synthetic(0, 0), (0.5, 0.5), (1, 1) and Synthetic-IID, with 30 clients, 60 features and 10
  classes (the defaults here).

  Args:
    num_clients: number of clients, ``>= 1``.
    alpha: spread of the clients' teachers (standard deviation of ``u_k``), a finite float ``>= 0``.
    beta: spread of the clients' input means (standard deviation of ``B_k``), a finite float ``>= 0``.
    iid: generate Synthetic-IID (one shared teacher, ``v_k = 0``); ``alpha`` and ``beta`` are then ignored.
    num_features: input dimension, ``>= 1``.
    num_classes: number of classes, ``>= 2``.
    seed: an integer ``>= 0``; the same arguments always give the same data.
    min_size: smallest client, ``>= 1`` (the ``+ 50`` of LEAF's ``floor(LogNormal(4, 2)) + 50``).
    max_size: largest client, ``None`` (no cap) or an integer ``>= min_size``.

  Returns:
    A :class:`FederatedData` with clients ``client_00, client_01, ...`` (client ``k`` at storage index ``k``,
    matching index ``k`` of :func:`synthetic_leaf_task`), features ``'x'`` float32 ``[num_features]`` and
    ``'y'`` int32 in ``[0, num_classes)``.

  Example:
    >>> data = synthetic_leaf(num_clients=5, alpha=0.5, beta=0.5, seed=1)
    >>> data.num_clients, data.element_spec["x"][0]
    (5, (60,))
  """
  task = synthetic_leaf_task(
      num_clients=num_clients, alpha=alpha, beta=beta, iid=iid, num_features=num_features,
      num_classes=num_classes, seed=seed, min_size=min_size, max_size=max_size,
  )
  example_rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[1])
  input_scales = np.sqrt(task.feature_variances)
  client_inputs, client_labels = [], []
  for client_index, client_size in enumerate(task.client_sizes):
    noise = example_rng.standard_normal(size=(client_size, input_scales.size))
    inputs = (task.feature_means[client_index] + noise * input_scales).astype(np.float32)
    client_inputs.append(inputs)
    client_labels.append(task.labels(client_index, inputs))  # labels of the stored float32 inputs
  client_of_example = np.repeat(np.arange(task.client_sizes.size), task.client_sizes)
  return partition_dataset(
      {"x": np.concatenate(client_inputs), "y": np.concatenate(client_labels)}, client_of_example
  )
