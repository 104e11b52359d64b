"""Federated sums and means of client values with ANY fedjax_lite aggregator (so DP and secure sums apply).

The introduction of the reference's tutorials: every client holds a value (a sensor reading, a local statistic of
its data) and the server wants their mean. Here the aggregation step IS an
:class:`~fedjax_lite.aggregators.Aggregator`, so any of them can be dropped in: ``mean()`` (the default),
``secure_aggregator()``, a DP mean (``gaussian_fixed``), the median, Krum, ...

* :func:`federated_mean` / :func:`federated_sum`: a :class:`~fedjax_lite.analytics.Query` whose
  ``compute(values, weights=None, client_mask=None, rng=None, state=None) -> MeasuredOutput`` runs one step of the
  aggregator on the clients' stacked values (leading client axis); ``dp_event()`` is the aggregator's (or
  ``NonPrivateDpEvent`` for an aggregator without one).
* :func:`aggregate_client_statistics`: computes each client's value from its packed data with the client runner
  (:func:`fedjax_lite.core.run_clients`, vmap/sequential/chunked/sharded) and aggregates it; with a sum-based
  aggregator the clients' contributions are summed as they are produced (memory of the clients in flight, not the
  cohort), otherwise the values are stacked and ``next`` is called. Both paths use the aggregator's key rules
  (``split_rng``, ``fold_in(clients_key, slot)``), so they give the same result.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from fedjax_lite.aggregators.base import SUM, AggregationContext, Aggregator, as_template, split_rng
from fedjax_lite.aggregators.mean import mean
from fedjax_lite.aggregators.sum import sum_aggregator
from fedjax_lite.analytics.base import Query, real_mask
from fedjax_lite.core.process import MeasuredOutput
from fedjax_lite.core.runner import Runner, num_client_slots, run_clients
from fedjax_lite.core.tree import PyTree

StatisticFn = Callable[[PyTree], tuple[PyTree, jax.Array]]


def _check_aggregator(aggregator: Aggregator) -> Aggregator:
  if not isinstance(aggregator, Aggregator):
    raise TypeError(f"aggregator must be a fedjax_lite Aggregator (e.g. aggregators.mean()), got "
                    f"{type(aggregator).__name__}.")
  return aggregator


def _event_of(aggregator: Aggregator):
  import dp_accounting

  return aggregator.dp_event() if aggregator.dp_event is not None else dp_accounting.NonPrivateDpEvent()


def _aggregate_query(aggregator: Aggregator) -> Query:

  def compute(values: PyTree, weights: jax.Array | None = None, client_mask: jax.Array | None = None,
              rng: jax.Array | None = None, state: PyTree = None) -> MeasuredOutput:
    leaves = jax.tree.leaves(values)
    if not leaves:
      raise ValueError("values must have at least one array leaf with a leading client axis.")
    num_slots = leaves[0].shape[0]
    mask = real_mask(num_slots, client_mask)
    weights = jnp.ones((num_slots,), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
    if weights.shape != (num_slots,):
      raise ValueError(f"weights must have shape ({num_slots},) (one per client slot), got {weights.shape}.")
    if state is None:
      state = aggregator.init(as_template(jax.tree.map(lambda leaf: leaf[0], values)))
    rng = jax.random.key(0) if rng is None else rng
    return aggregator.next(state, values, weights, rng, mask)

  return Query(compute=compute, dp_event=lambda: _event_of(aggregator))


def federated_mean(aggregator: Aggregator | None = None) -> Query:
  """The (weighted) mean of the clients' values through ``aggregator`` (default :func:`~fedjax_lite.aggregators.mean`).

  ``compute(values, weights=None, client_mask=None, rng=None, state=None)``: ``values`` a pytree with a leading
  client axis, ``weights`` ``[clients]`` (default 1 each: the plain mean ``sum_i x_i / n``), ``client_mask``
  marking real slots, ``rng`` the aggregator's key (default ``key(0)``; give a fresh one for DP noise),
  ``state`` the aggregator's state (default ``init`` from the first client's value). Returns the aggregator's
  ``MeasuredOutput(state, result, measurements)``.

  Example (the reference tutorial's average of sensor readings):

  >>> import jax.numpy as jnp
  >>> readings = jnp.array([20.5, 21.25, 19.75, 22.0])
  >>> float(federated_mean().compute(readings).result)
  20.875

  With differential privacy (clip each reading to 30, Gaussian noise of 1 x 30 on the sum)::

    private = federated_mean(aggregators.gaussian_fixed(noise_multiplier=1.0, clients_per_round=4, clip=30.0))
    private.compute(readings, rng=jax.random.key(1)).result, private.dp_event()  # GaussianDpEvent(1.0)
  """
  return _aggregate_query(_check_aggregator(mean() if aggregator is None else aggregator))


def federated_sum(aggregator: Aggregator | None = None) -> Query:
  """The sum of the clients' values through ``aggregator`` (default :func:`~fedjax_lite.aggregators.sum_aggregator`;
  e.g. ``secure_sum(...)`` for a simulated secure sum). ``compute`` as in :func:`federated_mean`."""
  return _aggregate_query(_check_aggregator(sum_aggregator() if aggregator is None else aggregator))


def aggregate_client_statistics(
    statistic_fn: StatisticFn,
    aggregator: Aggregator,
    state: PyTree,
    round_data: PyTree,
    rng: jax.Array,
    *,
    runner: Runner | None = None,
) -> MeasuredOutput:
  """Aggregates ``statistic_fn(client_data) -> (value, weight)`` of every client of the packed ``round_data``.

  Padding slots (``num_examples == 0``) take no part. Jittable.

  Args:
    statistic_fn: ONE client's statistic from its packed data (``[steps, batch, ...]`` leaves and ``mask``), e.g.
      the mean of its readings and its example count.
    aggregator: any aggregator; sum-combined ones stream over the clients, stack-combined ones stack.
    state: the aggregator's state.
    round_data: packed clients (:func:`fedjax_lite.core.pack_clients`), with ``num_examples``.
    rng: the aggregator's key.
    runner: the client runner (default per backend).
  """
  _check_aggregator(aggregator)
  if not callable(statistic_fn):
    raise TypeError("statistic_fn must be a function client_data -> (value, weight).")
  clients_key, server_key = split_rng(rng)
  value_templates = []  # ONE client's value, recorded while tracing (static shapes)

  def per_client(client_params, client_data, key):
    value, weight = statistic_fn(client_data)
    value_templates.append(as_template(value))
    is_real = client_data["num_examples"] > 0
    weight = jnp.where(is_real, jnp.asarray(weight, jnp.float32), 0.0)  # padding: weight 0
    contribution = aggregator.client(client_params, value, weight, key)
    if aggregator.combine == SUM:
      return contribution, None  # the runner sums the real clients' contributions
    return (), jax.tree.map(lambda c: jnp.where(is_real, c, jnp.zeros((), c.dtype)), contribution)

  total, stacked = run_clients(per_client, aggregator.broadcast(state), round_data, clients_key, runner=runner)
  context = AggregationContext(value_templates[-1], num_client_slots(round_data))
  return aggregator.server(state, total if aggregator.combine == SUM else stacked, server_key, context)
