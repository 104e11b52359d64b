"""Partitioning a centralized dataset into simulated clients (host-side numpy).

A partitioner turns a centralized dataset into an *assignment*: an integer array with the client index
(``0 .. num_clients - 1``) of every example. :func:`partition_dataset` then groups the arrays by that assignment
into a :class:`~fedjax_lite.core.federated_data.FederatedData`, which is what a round samples clients from.

Three standard splits are provided:

* :func:`iid_partition` -- a uniformly random split into near-equal clients (the IID baseline).
* :func:`dirichlet_partition` -- label skew with per-class client proportions drawn from ``Dirichlet(alpha)``
  (Hsu, Qi & Brown 2019); ``alpha`` dials the skew from extreme (small) to almost IID (large).
* :func:`shard_partition` -- the pathological non-IID split of McMahan et al. 2017: sort by label, cut into
  shards, give each client a few shards.

Every partitioner is deterministic for a given ``seed`` (it draws only from ``np.random.default_rng(seed)``),
assigns every example to exactly one client and leaves no client empty.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from fedjax_lite.core import validation
from fedjax_lite.core.federated_data import FederatedData

__all__ = [
    "iid_partition",
    "dirichlet_partition",
    "shard_partition",
    "partition_dataset",
]


# Argument checks -------------------------------------------------------------------------------------------------






def _check_labels(labels: Any) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1 or labels.shape[0] == 0:
    raise ValueError(f"labels must be a non-empty 1-D array of class labels, got shape {labels.shape}.")
  if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
    raise TypeError(f"labels must hold integer class labels, got dtype {labels.dtype}.")
  return labels


# Partitioners ------------------------------------------------------------------------------------------------------


def iid_partition(num_examples: int, num_clients: int, *, seed: int) -> np.ndarray:
  """Assigns examples to clients uniformly at random, with sizes that differ by at most one.

  Client ``k`` receives ``floor(num_examples / num_clients)`` or one more example; which clients receive the
  extra example, and which examples each client receives, are both uniformly random. This is the IID baseline
  of McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized Data"
  (arXiv:1602.05629), §3.

  Args:
    num_examples: size of the centralized dataset, ``>= num_clients``.
    num_clients: number of clients, ``>= 1``.
    seed: seed of ``np.random.default_rng``; the same seed gives the same assignment.

  Returns:
    int64 array of shape ``[num_examples]``: the client index in ``[0, num_clients)`` of every example.

  Example:
    >>> assignment = iid_partition(10, 3, seed=0)
    >>> sorted(np.bincount(assignment).tolist())
    [3, 3, 4]
  """
  num_examples = validation.check_int("num_examples", num_examples, minimum=1)
  num_clients = validation.check_int("num_clients", num_clients, minimum=1)
  if num_examples < num_clients:
    raise ValueError(
        f"num_examples must be >= num_clients ({num_clients}) so that no client is empty, got {num_examples}."
    )
  rng = np.random.default_rng(validation.check_int("seed", seed, minimum=0))
  client_order = rng.permutation(num_clients)  # which clients get the extra example
  example_order = rng.permutation(num_examples)
  assignment = np.empty(num_examples, dtype=np.int64)
  assignment[example_order] = client_order[np.arange(num_examples) % num_clients]
  return assignment


def dirichlet_partition(
    labels: Any,
    num_clients: int,
    *,
    alpha: float,
    seed: int,
    min_client_size: int = 1,
    max_attempts: int = 100,
) -> np.ndarray:
  """Label-skewed split: each class is spread over the clients with Dirichlet proportions.

  For every class ``c`` with ``n_c`` examples, draw ``p_c ~ Dirichlet(alpha * 1_K)`` over the ``K`` clients and
  give client ``k`` the ``floor(n_c * sum_{j<=k} p_cj) - floor(n_c * sum_{j<k} p_cj)`` next examples of a random
  permutation of class ``c`` (so every example is assigned exactly once). Small ``alpha`` (e.g. 0.1) gives
  clients dominated by one or two classes; large ``alpha`` (e.g. 100) approaches the IID split. Hsu, Qi & Brown
  2019, "Measuring the Effects of Non-Identical Data Distribution for Federated Visual Classification"
  (arXiv:1909.06335), §3.

  If a draw leaves some client with fewer than ``min_client_size`` examples, the whole draw is repeated, up to
  ``max_attempts`` times; after that a ``ValueError`` explains which knob to turn.

  Args:
    labels: 1-D integer array, the class of every example.
    num_clients: number of clients ``K``, ``>= 1``.
    alpha: Dirichlet concentration, a finite float ``> 0``.
    seed: seed of ``np.random.default_rng``; the same seed gives the same assignment.
    min_client_size: smallest acceptable client, ``>= 1`` and ``<= len(labels) / num_clients``.
    max_attempts: number of draws to try before giving up, ``>= 1``.

  Returns:
    int64 array of shape ``[len(labels)]``: the client index in ``[0, num_clients)`` of every example.
  """
  labels = _check_labels(labels)
  num_clients = validation.check_int("num_clients", num_clients, minimum=1)
  alpha = validation.check_positive("alpha", alpha)
  min_client_size = validation.check_int("min_client_size", min_client_size, minimum=1)
  max_attempts = validation.check_int("max_attempts", max_attempts, minimum=1)
  num_examples = labels.shape[0]
  if num_clients * min_client_size > num_examples:
    raise ValueError(
        f"min_client_size must be <= len(labels) / num_clients = {num_examples / num_clients:g} "
        f"({num_examples} examples, {num_clients} clients), got {min_client_size}."
    )
  rng = np.random.default_rng(validation.check_int("seed", seed, minimum=0))
  _, class_of_example = np.unique(labels, return_inverse=True)
  class_of_example = class_of_example.reshape(-1)
  examples_by_class = [np.flatnonzero(class_of_example == c) for c in range(class_of_example.max() + 1)]

  smallest_size = 0
  for _ in range(max_attempts):
    assignment = np.empty(num_examples, dtype=np.int64)
    for class_examples in examples_by_class:
      proportions = rng.dirichlet(np.full(num_clients, alpha))
      if not np.all(np.isfinite(proportions)):  # underflow for tiny alpha: fall back to one random client
        proportions = np.eye(num_clients)[rng.integers(num_clients)]
      cut_points = np.floor(np.cumsum(proportions)[:-1] * class_examples.size).astype(np.int64)
      cut_points = np.clip(cut_points, 0, class_examples.size)
      counts = np.diff(np.concatenate([[0], cut_points, [class_examples.size]]))
      assignment[rng.permutation(class_examples)] = np.repeat(np.arange(num_clients), counts)
    client_sizes = np.bincount(assignment, minlength=num_clients)
    smallest_size = int(client_sizes.min())
    if smallest_size >= min_client_size:
      return assignment
  raise ValueError(
      f"dirichlet_partition: after max_attempts={max_attempts} draws some client still had fewer than "
      f"min_client_size={min_client_size} examples (smallest client in the last draw: {smallest_size}). "
      f"Increase alpha (got {alpha}), reduce num_clients (got {num_clients}) or min_client_size, "
      f"or raise max_attempts."
  )


def shard_partition(labels: Any, num_clients: int, *, shards_per_client: int = 2, seed: int) -> np.ndarray:
  """McMahan et al.'s pathological non-IID split: label-sorted shards, a few per client.

  The examples are sorted by label (a stable sort of a seeded random permutation, so examples with the same
  label are in random order) and cut into ``S = num_clients * shards_per_client`` contiguous shards. Each
  client then receives ``shards_per_client`` shards chosen uniformly at random without replacement. When every
  class has at least a shard's worth of examples a shard spans at most 2 labels, so a client sees at most
  ``2 * shards_per_client`` labels; when every class size is a multiple of the shard size, at most
  ``shards_per_client``. McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
  Decentralized Data" (arXiv:1602.05629), §3: MNIST sorted into 200 shards of 300, 2 per client.

  Nothing is dropped: with ``n`` examples the shards have ``floor(n / S)`` examples, and the ``n mod S``
  remainder examples are dealt round-robin, one each, to the first shards in label order (shards stay
  contiguous in the sorted order, so the extra example does not mix labels any more than the cut does).
  Shard sizes therefore differ by at most one and client sizes by at most ``shards_per_client``.

  Args:
    labels: 1-D integer array, the class of every example.
    num_clients: number of clients, ``>= 1``.
    shards_per_client: shards given to each client, ``>= 1``; ``len(labels)`` must be
      ``>= num_clients * shards_per_client`` so that no shard is empty.
    seed: seed of ``np.random.default_rng``; the same seed gives the same assignment.

  Returns:
    int64 array of shape ``[len(labels)]``: the client index in ``[0, num_clients)`` of every example.
  """
  labels = _check_labels(labels)
  num_clients = validation.check_int("num_clients", num_clients, minimum=1)
  shards_per_client = validation.check_int("shards_per_client", shards_per_client, minimum=1)
  num_examples = labels.shape[0]
  num_shards = num_clients * shards_per_client
  if num_examples < num_shards:
    raise ValueError(
        f"shards_per_client must be <= len(labels) / num_clients = {num_examples / num_clients:g} so that no "
        f"shard is empty ({num_examples} examples, {num_clients} clients), got {shards_per_client}."
    )
  rng = np.random.default_rng(validation.check_int("seed", seed, minimum=0))
  tie_breaking_order = rng.permutation(num_examples)
  label_sorted_examples = tie_breaking_order[np.argsort(labels[tie_breaking_order], kind="stable")]

  shard_size, remainder = divmod(num_examples, num_shards)
  shard_sizes = np.full(num_shards, shard_size, dtype=np.int64)
  shard_sizes[:remainder] += 1
  shard_of_sorted_position = np.repeat(np.arange(num_shards), shard_sizes)

  owner_of_shard = np.empty(num_shards, dtype=np.int64)
  owner_of_shard[rng.permutation(num_shards)] = np.repeat(np.arange(num_clients), shards_per_client)

  assignment = np.empty(num_examples, dtype=np.int64)
  assignment[label_sorted_examples] = owner_of_shard[shard_of_sorted_position]
  return assignment


# From an assignment to FederatedData -------------------------------------------------------------------------------


def partition_dataset(
    arrays: Mapping[str, Any], assignment: Any, *, id_prefix: str = "client_"
) -> FederatedData:
  """Groups centralized arrays into clients according to ``assignment``.

  Client ``k`` is named ``f"{id_prefix}{k:0{width}d}"`` with ``width = len(str(num_clients - 1))``, so the sorted
  string order of the ids (the storage order of :class:`FederatedData`) equals the numeric order ``0, 1, ...``.
  Within a client, examples keep their order in ``arrays``.

  Args:
    arrays: feature name -> array, all with the same leading number of examples ``n``.
    assignment: integer array of shape ``[n]`` with values in ``[0, num_clients)``, where
      ``num_clients = assignment.max() + 1``; every client index in that range must occur at least once.
    id_prefix: a string put before each client's number.

  Returns:
    A :class:`FederatedData` with ``num_clients`` clients; client ``k`` is at storage index ``k``.

  Example:
    >>> data = partition_dataset({"y": np.arange(4)}, np.array([1, 0, 1, 0]))
    >>> data.client_ids, data["client_1"]["y"].tolist()
    (('client_0', 'client_1'), [0, 2])
  """
  if not isinstance(id_prefix, str):
    raise TypeError(f"id_prefix must be a str, got {type(id_prefix).__name__}.")
  if not isinstance(arrays, Mapping) or not arrays:
    raise TypeError(f"arrays must be a non-empty dict of feature name -> array, got {type(arrays).__name__}.")
  arrays = {str(key): np.asarray(value) for key, value in arrays.items()}
  leading_sizes = {key: (value.shape[0] if value.ndim else None) for key, value in arrays.items()}
  if None in leading_sizes.values() or len(set(leading_sizes.values())) != 1:
    raise ValueError(f"arrays must all have the same leading number of examples, got {leading_sizes}.")
  num_examples = next(iter(leading_sizes.values()))
  assignment = np.asarray(assignment)
  if not np.issubdtype(assignment.dtype, np.integer):
    raise TypeError(f"assignment must be an integer array of client indices, got dtype {assignment.dtype}.")
  if assignment.shape != (num_examples,) or num_examples == 0:
    raise ValueError(
        f"assignment must have shape ({num_examples},), one client index per example, got {assignment.shape}."
    )
  if assignment.min() < 0:
    raise ValueError(f"assignment must hold client indices >= 0, got minimum {assignment.min()}.")
  num_clients = int(assignment.max()) + 1
  client_sizes = np.bincount(assignment, minlength=num_clients)
  if np.any(client_sizes == 0):
    missing = np.flatnonzero(client_sizes == 0)
    raise ValueError(
        f"assignment must use every client index in [0, {num_clients}) at least once; "
        f"missing: {missing[:10].tolist()}{' ...' if missing.size > 10 else ''}."
    )
  width = len(str(num_clients - 1))
  client_names = np.array([f"{id_prefix}{k:0{width}d}" for k in range(num_clients)])
  return FederatedData.from_arrays(arrays, client_names[assignment])
