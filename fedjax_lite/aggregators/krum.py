"""Krum and multi-Krum: Byzantine-robust selection of the client values closest to their neighbours.

Blanchard, El Mhamdi, Guerraoui & Stainer 2017, "Machine Learning with Adversaries: Byzantine Tolerant Gradient
Descent" (NeurIPS 2017). The reference (TFF) has no such aggregator; these sit beside
:func:`~fedjax_lite.aggregators.coordinate_median` and :func:`~fedjax_lite.aggregators.trimmed_mean` and follow
their contract (stacked, a positive weight is one vote, padding never takes part).

Let ``x_1 .. x_n`` be the ``n`` REAL clients' values (``client_mask`` marks them; padding slots never take part,
are never selected and never counted), each flattened over all leaves, and ``f`` the number of Byzantine clients
the aggregator is built to tolerate. For every real client ``i``, with ``i -> j`` meaning that ``x_j`` is one of
the ``n - f - 2`` real values closest to ``x_i`` (in squared Euclidean distance, ``j != i``):

* the Krum score is ``s(i) = sum_{i -> j} ||x_i - x_j||^2``;
* :func:`krum` returns ``x_{i*}`` with ``i* = argmin_i s(i)``;
* :func:`multi_krum` returns the unweighted mean of the ``m`` values with the lowest scores (``m = n - f`` by
  default, as in the paper's multi-Krum experiments); ``m = 1`` is Krum.

Ties (equal scores, or equal distances when choosing the neighbours) go to the lower client slot, so the result
is a deterministic function of the values, exactly as ``numpy.argsort(kind='stable')`` orders them.

Robustness (the paper's Proposition 1): if ``2f + 2 < n`` and the honest values are i.i.d. with mean ``g`` and
bounded variance, Krum's output has a positive inner product with ``g`` whatever the ``f`` Byzantine clients send
(``(alpha, f)``-Byzantine resilience). Krum needs ``n >= 2f + 3`` real clients:

* when the number of client slots is below ``2f + 3`` the round can never qualify, and ``next`` raises a
  ValueError at trace time;
* when a round has fewer than ``2f + 3`` REAL clients (padding), every coordinate of the result is NaN, which
  ``fed_avg`` rejects (the parameters are kept), as a trimmed mean with nothing left does.

Non-finite values: a real client whose value has any NaN or +-Inf coordinate is at distance +Inf from every other
client; it is ordered after every finite client (so it is selected only if fewer than ``m`` finite clients exist,
and then the result carries its NaN/Inf). Distances that overflow float32 are +Inf and ordered like any value.

Cost: all pairwise distances, ``O(n^2 d)`` time for ``d`` coordinates, computed one row at a time
(``lax.map``) so that memory stays ``O(n d)``; stacked (``combine='stack'``), not streamable.

State ``()``; measurements ``{'num_selected': m, 'num_real_clients': n}`` (int32) for both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_lite.aggregators.base import Aggregator
from fedjax_lite.aggregators.robust_statistics import participants, stacked_statistic
from fedjax_lite.core import validation
from fedjax_lite.core.tree import PyTree


def pairwise_squared_distances(values: PyTree) -> jax.Array:
  """``D[i, j] = ||x_i - x_j||^2`` summed over every leaf (float32 or wider), shape ``[clients, clients]``.

  Computed from the differences (not ``|x|^2 + |y|^2 - 2 x.y``, which cancels catastrophically for nearby values),
  one row per step of a ``lax.map`` so that memory stays ``O(clients x value size)``.
  """
  leaves = jax.tree.leaves(values)
  accumulate = jnp.result_type(jnp.float32, *[leaf.dtype for leaf in leaves])
  flat = [leaf.reshape(leaf.shape[0], -1).astype(accumulate) for leaf in leaves]

  def row(rows):
    return sum(jnp.sum(jnp.square(leaf - one[None, :]), axis=1) for leaf, one in zip(flat, rows))

  return jax.lax.map(row, flat)


def krum_scores(distances: jax.Array, usable: jax.Array, num_neighbours: jax.Array) -> jax.Array:
  """``s(i)``: the sum of the ``num_neighbours`` smallest ``distances[i, j]`` over usable ``j != i``.

  Unusable slots (padding, or clients with non-finite values) are at distance +Inf; a row with fewer usable
  neighbours than ``num_neighbours`` sums some +Inf and scores +Inf.
  """
  num_slots = distances.shape[0]
  others = usable[None, :] & ~jnp.eye(num_slots, dtype=bool)
  sorted_rows = jnp.sort(jnp.where(others, distances, jnp.inf), axis=1)
  take = jnp.arange(num_slots)[None, :] < num_neighbours
  return jnp.sum(jnp.where(take, sorted_rows, 0.0), axis=1)


def _client_finite(values: PyTree) -> jax.Array:
  leaves = jax.tree.leaves(values)
  return jnp.stack([jnp.all(jnp.isfinite(leaf.reshape(leaf.shape[0], -1)), axis=1) for leaf in leaves]).all(0)


def _krum_aggregator(aggregator_name: str, num_byzantine: int, num_selected: int | None) -> Aggregator:

  def select(combined, context):
    num_slots = context.num_client_slots
    if num_slots < 2 * num_byzantine + 3:
      raise ValueError(f"{aggregator_name} with num_byzantine={num_byzantine} needs at least "
                       f"{2 * num_byzantine + 3} real clients (n > 2f + 2), but values have only {num_slots} "
                       "client slots.")
    values, mask = participants(combined, context, aggregator_name)
    num_real = jnp.sum(mask, dtype=jnp.int32)
    finite = _client_finite(values)
    usable = mask & finite
    scores = krum_scores(pairwise_squared_distances(values), usable, num_real - num_byzantine - 2)
    slots = jnp.arange(num_slots)
    # Order: real before padding, finite before non-finite, then by score, then by slot (jnp.lexsort: last key
    # is the primary one).
    order = jnp.lexsort((slots, jnp.where(usable, scores, jnp.inf), ~finite, ~mask))
    if num_selected is None:
      count = num_real - num_byzantine
    else:
      count = jnp.minimum(jnp.asarray(num_selected, jnp.int32), num_real)
    count = jnp.maximum(count, 1)
    rank = jnp.zeros((num_slots,), jnp.int32).at[order].set(slots.astype(jnp.int32))
    selected = rank < count
    enough = num_real >= 2 * num_byzantine + 3

    def one_leaf(leaf):
      accumulate = jnp.promote_types(leaf.dtype, jnp.float32)
      chosen = selected.reshape((num_slots,) + (1,) * (leaf.ndim - 1))
      total = jnp.sum(jnp.where(chosen, leaf, jnp.zeros((), leaf.dtype)).astype(accumulate), axis=0)
      result = (total / count.astype(accumulate)).astype(leaf.dtype)
      if num_selected == 1:  # Krum returns the chosen value itself, bit for bit.
        result = jnp.take(leaf, order[0], axis=0)
      return jnp.where(enough, result, jnp.asarray(jnp.nan, leaf.dtype))

    measurements = {"num_selected": jnp.where(enough, count, 0).astype(jnp.int32), "num_real_clients": num_real}
    return jax.tree.map(one_leaf, values), measurements

  return stacked_statistic(aggregator_name, select)


def krum(num_byzantine: int) -> Aggregator:
  """Krum (Blanchard et al. 2017): the real client value with the smallest sum of squared distances to its
  ``n - f - 2`` nearest real neighbours.

  ``result = x_{i*}``, ``i* = argmin_i sum_{i -> j} ||x_i - x_j||^2`` (see the module docstring). Unweighted and
  NOT streamable; tolerates ``f = num_byzantine`` arbitrary clients when ``n >= 2f + 3``. A round with fewer real
  clients gives NaN (``fed_avg`` keeps its parameters); fewer client SLOTS than ``2f + 3`` raises a ValueError.
  State ``()``; measurements ``{'num_selected': 1, 'num_real_clients': n}``.

  Args:
    num_byzantine: ``f >= 0``, the number of Byzantine clients per round to tolerate.

  Example: four honest values near 0.1 and one Byzantine 9.0; Krum keeps the most central honest one.

  >>> import jax, numpy as np
  >>> values = {"x": np.array([[0.0], [0.1], [0.2], [0.15], [9.0]], np.float32)}
  >>> float(krum(num_byzantine=1).next((), values, np.ones(5), jax.random.key(0)).result["x"][0])
  0.15...

  In FedAvg (at least ``2f + 3`` real clients per round)::

    process = fed_avg(model, client_learning_rate=0.1, aggregator=krum(num_byzantine=2))
  """
  num_byzantine = validation.check_int("num_byzantine", num_byzantine, minimum=0)
  return _krum_aggregator("krum", num_byzantine, 1)


def multi_krum(num_byzantine: int, num_selected: int | None = None) -> Aggregator:
  """Multi-Krum (Blanchard et al. 2017): the unweighted mean of the ``m`` real values with the lowest Krum scores.

  ``result = (1/m) sum_{i in S} x_i`` with ``S`` the ``m`` real clients of smallest score
  ``s(i) = sum_{i -> j} ||x_i - x_j||^2`` (see the module docstring); ``m = 1`` is :func:`krum`. Unweighted and NOT
  streamable; needs ``n >= 2f + 3`` real clients (else NaN; fewer slots raise a ValueError).
  State ``()``; measurements ``{'num_selected': m, 'num_real_clients': n}``.

  Args:
    num_byzantine: ``f >= 0``, the number of Byzantine clients per round to tolerate.
    num_selected: ``m >= 1``, how many values to average; None (default) for ``n - f`` (the paper's choice).
      A round with fewer than ``m`` real clients averages all of them.

  Example::

    aggregator = multi_krum(num_byzantine=2)  # with 10 clients: average the 8 best-scored updates
  """
  num_byzantine = validation.check_int("num_byzantine", num_byzantine, minimum=0)
  num_selected = validation.check_int("num_selected", num_selected, minimum=1, allow_none=True)
  return _krum_aggregator("multi_krum", num_byzantine, num_selected)
