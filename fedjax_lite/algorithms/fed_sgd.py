"""Federated SGD (McMahan et al. 2017, arXiv:1602.05629; TFF ``build_fed_sgd``).

Each client computes ONE gradient at the server parameters over all its examples,
``g_i = sum_b grad(sum of losses of batch b) / n_i`` (the gradient of its mean loss), with weight ``n_i``; a
non-finite gradient becomes zeros with weight 0. The server applies its optimizer to the aggregate (default the
weighted mean): ``params <- server_optimizer(params, g)``, default ``optax.sgd(0.1)`` as in the reference.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedjax_lite.aggregators.base import Aggregator
from fedjax_lite.algorithms.fed_avg import ServerState, check_model, init_server_state, resolve_aggregator
from fedjax_lite.algorithms.local_training import split_steps, step_batch, zero_metric_sums
from fedjax_lite.algorithms.round import client_work_and_aggregate, communication_bits
from fedjax_lite.algorithms.server_update import apply_server_optimizer
from fedjax_lite.core.model import Model, masked_loss_and_metric_sums
from fedjax_lite.core.process import Process
from fedjax_lite.core.records import ClientOutput
from fedjax_lite.core.runner import Runner

PyTree = Any


def client_gradient(model: Model, params: PyTree, client_data: PyTree, rng: jax.Array) -> tuple[PyTree, dict]:
  """``(gradient of the client's mean loss at params, metric sums)``, one batch at a time in a rolled loop."""
  steps, num_steps = split_steps(client_data)

  def body(step, carry):
    grad_sum, sums = carry
    batch = step_batch(steps, step)
    mask = batch.pop("mask")

    def summed_loss(p):
      mean_loss, batch_sums = masked_loss_and_metric_sums(model, p, batch, mask, jax.random.fold_in(rng, step), True)
      return mean_loss * batch_sums["num_examples"].astype(jnp.float32), batch_sums

    grads, batch_sums = jax.grad(summed_loss, has_aux=True)(params)
    sums = {key: sums[key] + batch_sums[key] for key in batch_sums} | {"num_batches": sums["num_batches"] + 1}
    return jax.tree.map(jnp.add, grad_sum, grads), sums

  grad_sum, sums = jax.lax.fori_loop(
      0, num_steps, body, (jax.tree.map(jnp.zeros_like, params), zero_metric_sums(model))
  )
  count = jnp.maximum(sums["num_examples"], 1).astype(jnp.float32)
  return jax.tree.map(lambda g: g / count, grad_sum), sums


def fed_sgd(
    model: Model,
    *,
    server_optimizer: optax.GradientTransformation | None = None,
    aggregator: Aggregator | None = None,
    runner: Runner | None = None,
) -> Process:
  """Builds FedSGD as a ``Process(init, next)`` (same state and metrics layout as :func:`fed_avg`).

  Args:
    model: the model.
    server_optimizer: applied to the aggregated gradient; default ``optax.sgd(0.1)`` (TFF's default).
    aggregator: aggregator of the gradients, weighted by examples; default the weighted mean.
    runner: the client runner.
  """
  check_model(model)
  server_optimizer = optax.sgd(0.1) if server_optimizer is None else server_optimizer
  if not isinstance(server_optimizer, optax.GradientTransformation):
    raise TypeError(f"server_optimizer must be an optax GradientTransformation, got "
                    f"{type(server_optimizer).__name__}.")
  aggregator = resolve_aggregator(aggregator, weighted=True)
  if runner is not None and not isinstance(runner, Runner):
    raise TypeError(f"runner must be a fedjax_lite Runner, got {type(runner).__name__}.")

  def client_update(params, client_data, rng, hparams) -> ClientOutput:
    gradient, sums = client_gradient(model, params, client_data, rng)
    return ClientOutput(update=gradient, weight=sums["num_examples"].astype(jnp.float32), metrics=sums)

  def init(params: PyTree) -> ServerState:
    return init_server_state(params, server_optimizer, aggregator)

  def next_fn(state: ServerState, round_data: PyTree, rng: jax.Array) -> tuple[ServerState, dict]:
    aggregate, client_metrics = client_work_and_aggregate(
        client_update, aggregator, state.aggregator_state, state.params, {}, round_data, rng, runner
    )
    params, opt_state, finalizer_metrics = apply_server_optimizer(
        server_optimizer, state.params, state.opt_state, aggregate.result
    )
    new_state = state.replace(
        params=params, opt_state=opt_state, aggregator_state=aggregate.state, round_num=state.round_num + 1
    )
    metrics = {"distributor": {}, "client_work": client_metrics, "aggregator": aggregate.measurements,
               "finalizer": finalizer_metrics,
               **communication_bits(aggregator, state.aggregator_state, state.params, {}, round_data)}
    return new_state, metrics

  return Process(init=init, next=next_fn)
