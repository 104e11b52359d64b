"""Federated SGD (McMahan et al. 2017, arXiv:1602.05629; TFF ``build_fed_sgd``).

Each client computes ONE gradient at the server parameters over all its examples,
``g_i = sum_b grad(sum of losses of batch b) / n_i`` (the gradient of its mean loss), with weight ``n_i``; a
non-finite gradient becomes zeros with weight 0. The server applies its optimizer to the aggregate (default the
weighted mean): ``params <- server_optimizer(params, g)``, default ``optax.sgd(0.1)`` as in the reference.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from fedjax_lite.aggregators.base import Aggregator
from fedjax_lite.algorithms.fed_avg import check_model, resolve_aggregator
from fedjax_lite.algorithms.local_training import client_gradient
from fedjax_lite.algorithms.template import Broadcast, build_round, check_optimizer, optimizer_finalizer
from fedjax_lite.core.model import Model
from fedjax_lite.core.process import Process
from fedjax_lite.core.records import ClientOutput
from fedjax_lite.core.runner import Runner


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
  check_optimizer("server_optimizer", server_optimizer)

  def client_work(broadcast: Broadcast, client_data, client_state, rng) -> ClientOutput:
    gradient, sums = client_gradient(model, broadcast.params, client_data, rng)
    return ClientOutput(update=gradient, weight=sums["num_examples"].astype(jnp.float32), metrics=sums)

  return build_round(client_work, aggregator=resolve_aggregator(aggregator, weighted=True),
                     finalizer=optimizer_finalizer(server_optimizer), runner=runner)
