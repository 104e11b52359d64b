"""The middle of a round shared by every algorithm: client work and aggregation (upload).

:func:`client_work_and_aggregate` runs a per-client update over the round's clients with the runner and feeds the
updates to the aggregator. With a sum-based aggregator the clients' contributions are summed as they are
produced (streaming: memory grows with the clients in flight, not the cohort); otherwise every update is stacked
and the aggregator's ``next`` sees them all. Both paths derive identical random keys, so they agree.

Client metrics are SUMS (loss, metric values, example and batch counts) added over clients and finalized once on
the server, so accuracy is example-weighted over the whole cohort (TFF ``sum_then_finalize``).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from fedjax_lite.aggregators.base import Aggregator, split_rng
from fedjax_lite.core.model import finalize_metric_sums
from fedjax_lite.core.process import MeasuredOutput
from fedjax_lite.core.records import ClientOutput
from fedjax_lite.core.runner import Runner, client_mask, run_clients
from fedjax_lite.core.tree import tree_all_finite, tree_select

PyTree = Any
ClientUpdateFn = Callable[[PyTree, PyTree, jax.Array, PyTree], ClientOutput]


def reject_non_finite(output: ClientOutput) -> ClientOutput:
  """TFF's client rule: an update with any NaN/Inf becomes zeros with weight 0, and its metrics are reset.

  The metrics gain ``num_non_finite_clients`` (1 for a rejected client) so the round can report it.
  """
  finite = tree_all_finite(output.update)
  zeros = jax.tree.map(jnp.zeros_like, output.update)
  metrics = tree_select(finite, output.metrics, jax.tree.map(jnp.zeros_like, output.metrics))
  metrics = dict(metrics, num_non_finite_clients=jnp.where(finite, 0, 1).astype(jnp.int32))
  return ClientOutput(
      update=tree_select(finite, output.update, zeros),
      weight=jnp.where(finite, jnp.asarray(output.weight, jnp.float32), 0.0),
      metrics=metrics,
  )


def client_work_and_aggregate(
    client_update: ClientUpdateFn,
    aggregator: Aggregator,
    aggregator_state: PyTree,
    server_value: PyTree,
    hparams: PyTree,
    round_data: PyTree,
    rng: jax.Array,
    runner: Runner | None,
) -> tuple[MeasuredOutput, dict[str, jax.Array]]:
  """Runs ``client_update`` on every client and aggregates; returns ``(aggregator output, finalized metrics)``.

  Args:
    client_update: ``(server_value, client_data, rng, hparams) -> ClientOutput`` for one client; non-finite
      updates are rejected by :func:`reject_non_finite`.
    aggregator: the aggregator of the updates and weights.
    aggregator_state: its state.
    server_value: what is broadcast (e.g. the model parameters).
    hparams: broadcast hyperparameters (e.g. the round's client learning rate).
    round_data: the packed round.
    rng: the round's key for client work and aggregation.
    runner: the client runner.
  """
  train_key, aggregator_key = jax.random.split(rng)

  if aggregator.parts is not None:
    parts = aggregator.parts
    clients_key, server_key = split_rng(aggregator_key)
    broadcast = (server_value, hparams, parts.broadcast(aggregator_state))

    def per_client(broadcast, client_data, keys):
      value, client_hparams, aggregator_params = broadcast
      output = reject_non_finite(client_update(value, client_data, keys["train"], client_hparams))
      contribution = parts.client(aggregator_params, output.update, output.weight, keys["aggregator"])
      return (contribution, output.metrics), None

    (total, metric_sums), _ = run_clients(
        per_client, broadcast, round_data, {"train": train_key, "aggregator": clients_key}, runner=runner
    )
    aggregate = parts.server(aggregator_state, total, server_key)
  else:

    def per_client(broadcast, client_data, keys):
      value, client_hparams = broadcast
      output = reject_non_finite(client_update(value, client_data, keys["train"], client_hparams))
      return output.metrics, (output.update, output.weight)

    metric_sums, (updates, weights) = run_clients(
        per_client, (server_value, hparams), round_data, {"train": train_key}, runner=runner
    )
    aggregate = aggregator.next(aggregator_state, updates, weights, aggregator_key, client_mask(round_data))

  non_finite = metric_sums.pop("num_non_finite_clients")
  return aggregate, {"train": finalize_metric_sums(metric_sums), "num_non_finite_clients": non_finite}
