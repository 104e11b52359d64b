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

from fedjax_lite.aggregators.base import Aggregator, as_template, client_upload_bits, split_rng
from fedjax_lite.core.model import finalize_metric_sums
from fedjax_lite.core.process import MeasuredOutput
from fedjax_lite.core.records import ClientOutput
from fedjax_lite.core.runner import Runner, client_mask, run_clients
from fedjax_lite.core.tree import tree_all_finite, tree_select, tree_size_bits

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


def communication_bits(
    aggregator: Aggregator,
    aggregator_state: PyTree,
    server_value: PyTree,
    hparams: PyTree,
    round_data: PyTree,
    *,
    model_broadcast_bits: int | None = None,
) -> dict[str, jax.Array]:
  """Exact bits sent to and received from the round's real clients (int64 totals).

  Per client, the download is the model (``model_broadcast_bits`` when an encoder compresses it, else every
  leaf at its dtype's width), the broadcast hyperparameters and the aggregator's broadcast (e.g. its clipping
  norm); the upload is the aggregator's exact payload (:func:`fedjax_lite.aggregators.base.client_upload_bits`).
  Both are static counts, multiplied by the number of real clients of the round. TFF measured logical tensor
  sizes with a sizing executor (``broadcasted_bits``/``aggregated_bits``, removed in TFF 0.48); these are the same
  quantities computed from the payload.
  """
  template = as_template(server_value)
  aggregator_broadcast = (jax.eval_shape(aggregator.parts.broadcast, aggregator_state)
                          if aggregator.parts is not None else ())
  per_client_download = ((tree_size_bits(template) if model_broadcast_bits is None else int(model_broadcast_bits))
                         + tree_size_bits(hparams) + tree_size_bits(aggregator_broadcast))
  per_client_upload = client_upload_bits(aggregator, template)
  num_clients = jnp.sum(client_mask(round_data))
  with jax.enable_x64(True):
    count = num_clients.astype(jnp.int64)
    return {"broadcasted_bits": count * per_client_download, "aggregated_bits": count * per_client_upload}
