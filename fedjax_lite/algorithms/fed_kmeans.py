"""Federated k-means, the first algorithm on the round template that trains no neural network: its "params" are
the centroids (TFF's ``build_fed_kmeans``, ``tensorflow_federated/python/learning/algorithms/kmeans_clustering.py``).

Mini-batch k-means with pseudo-counts (Sculley 2010, "Web-scale k-means clustering"), federated:

* init: centroids ``C_k ~ N(0, 1)`` of shape ``[k, *data_shape]`` drawn from ``seed``, weights ``W_k = 1``;
* client work: each real example ``x`` (feature ``feature_key``) goes to its nearest centroid
  ``argmin_k ||x - C_k||^2``; the client uploads ``S_k = sum of its points in cluster k`` and ``c_k = their count``;
* aggregator: two sums (``{'sums', 'counts'}``);
* finalizer: ``W' = W + c``; ``C'_k = (W_k C_k + S_k) / W'_k`` where ``c_k > 0``, else ``C_k``; ``W`` is the
  finalizer state (:class:`KMeansServerState`).

Metrics: ``client_work/train/num_examples`` (points assigned) as the reference's ``{num_examples}``.
"""

from __future__ import annotations

from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp

from fedjax_lite.aggregators.sum import sum_aggregator
from fedjax_lite.algorithms.local_training import split_steps
from fedjax_lite.algorithms.template import Broadcast, Finalizer, FinalizerOutput, build_round
from fedjax_lite.core import validation
from fedjax_lite.core.process import Process
from fedjax_lite.core.records import ClientOutput
from fedjax_lite.core.runner import Runner


@flax.struct.dataclass
class KMeansServerState:
  """Federated k-means' finalizer state (``ServerState.finalizer_state``).

  Attributes:
    weights: ``W``, float32 ``[num_clusters]``: each centroid's pseudo-count (1 at first, plus every point assigned
      to it since).
  """

  weights: jax.Array


def initial_centroids(num_clusters: int, data_shape: Sequence[int], seed: int) -> jax.Array:
  """``C ~ N(0, 1)`` of shape ``[num_clusters, *data_shape]`` (float32), from ``seed`` alone."""
  validation.check_int("num_clusters", num_clusters, minimum=1)
  validation.check_int("seed", seed, minimum=0)
  return jax.random.normal(jax.random.key(seed), (num_clusters, *tuple(data_shape)), jnp.float32)


def fed_kmeans(num_clusters: int, data_shape: Sequence[int], *, feature_key: str = "x",
               runner: Runner | None = None) -> Process:
  """Builds federated k-means (see the module docstring).

  Args:
    num_clusters: ``k >= 1``.
    data_shape: the shape of one point (e.g. ``(2,)``).
    feature_key: the packed feature holding the points.
    runner: the client runner.

  Returns:
    ``Process(init, next)``: ``init(centroids)`` (e.g. :func:`initial_centroids`) and ``next(state, round_data,
    rng) -> RoundOutput(state, metrics, None)`` with ``state.params`` the centroids and
    ``state.finalizer_state.weights`` their pseudo-counts.
  """
  validation.check_int("num_clusters", num_clusters, minimum=1)
  data_shape = tuple(int(d) for d in data_shape)
  if any(d < 1 for d in data_shape):
    raise ValueError(f"data_shape must hold positive sizes, got {data_shape}.")

  def client_work(broadcast: Broadcast, client_data, client_state, rng) -> ClientOutput:
    centroids = broadcast.params
    steps, _ = split_steps(client_data)
    points = steps[feature_key].reshape((-1,) + data_shape).astype(jnp.float32)
    mask = steps["mask"].reshape(-1)
    flat_points = points.reshape(points.shape[0], -1)
    flat_centroids = centroids.reshape(num_clusters, -1)
    distances = jnp.sum((flat_points[:, None, :] - flat_centroids[None]) ** 2, axis=-1)  # [points, k]
    assignment = jax.nn.one_hot(jnp.argmin(distances, axis=1), num_clusters, dtype=jnp.float32) * mask[:, None]
    sums = (assignment.T @ flat_points).reshape((num_clusters,) + data_shape)
    counts = jnp.sum(assignment, axis=0)
    num_examples = jnp.sum(mask, dtype=jnp.int32)
    return ClientOutput(update={"sums": sums, "counts": counts}, weight=jnp.ones((), jnp.float32),
                        metrics={"num_examples": num_examples})

  def init_weights(centroids) -> KMeansServerState:
    return KMeansServerState(weights=jnp.ones((num_clusters,), jnp.float32))

  def finalize(state: KMeansServerState, centroids, aggregate):
    weights = state.weights
    sums, counts = aggregate["sums"], aggregate["counts"]
    new_weights = weights + counts
    expand = (slice(None),) + (None,) * len(data_shape)
    moved = (weights[expand] * centroids + sums) / new_weights[expand]
    new_centroids = jnp.where((counts > 0)[expand], moved, centroids)
    return FinalizerOutput(state=KMeansServerState(weights=new_weights), params=new_centroids)

  def update_template(centroids):
    if centroids.shape != (num_clusters,) + data_shape:
      raise ValueError(f"centroids must have shape {(num_clusters,) + data_shape}, got {centroids.shape}.")
    return {"sums": centroids, "counts": jax.ShapeDtypeStruct((num_clusters,), jnp.float32)}

  return build_round(client_work, aggregator={"sums": sum_aggregator(), "counts": sum_aggregator()},
                     finalizer=Finalizer(init_weights, finalize), update_template=update_template, runner=runner)
