"""Federated Averaging (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data", arXiv:1602.05629), with server optimizers (Reddi et al. 2021, arXiv:2003.00295).

One round, in the reference's four parts (TFF ``build_weighted_fed_avg``):

1. distributor: broadcast the server parameters and the round's client learning rate;
2. client work: each client runs its optimizer over its batches from the server parameters and returns
   ``delta_i = params - final_params_i`` with weight ``n_i`` (examples processed) or 1 (uniform); a delta with
   any NaN/Inf becomes zeros with weight 0;
3. aggregator: ``delta = aggregate({delta_i}, {w_i})``, by default the weighted mean ``sum w_i delta_i / sum w_i``;
4. finalizer: ``params <- server_optimizer(params, delta)``; with SGD(1.0) this is exactly the weighted average of
   the client models. A non-finite ``delta`` leaves parameters and optimizer state unchanged.

Metrics: ``{'distributor': {}, 'client_work': {'train': {loss, <model metrics>, num_examples, num_batches},
'num_non_finite_clients', 'learning_rate'}, 'aggregator': <aggregator measurements>, 'finalizer': {'update_non_finite'},
'broadcasted_bits', 'aggregated_bits'}`` -- the last two the exact bits sent to and received from the round's
clients (:func:`fedjax_lite.algorithms.template.communication_bits`).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from fedjax_lite.aggregators.base import Aggregator
from fedjax_lite.aggregators.mean import mean, unweighted_mean
from fedjax_lite.algorithms.local_training import train_locally
from fedjax_lite.algorithms.optimizers import OptimizerFactory, ScheduledOptimizer, scheduled_optimizer
from fedjax_lite.algorithms.template import (
    Broadcast,
    ClientWork,
    ServerState,
    build_round,
    check_optimizer,
    model_distributor,
    optimizer_finalizer,
)
from fedjax_lite.core import validation
from fedjax_lite.core.model import Model
from fedjax_lite.core.process import Process
from fedjax_lite.core.records import ClientOutput
from fedjax_lite.core.runner import Runner
from fedjax_lite.core.tree import PyTree

WEIGHTINGS = ("num_examples", "uniform")
GradientCorrection = Callable[[Broadcast, PyTree], optax.GradientTransformation]

__all__ = ["FED_AVG_OPTIONS", "ServerState", "fed_avg", "fed_avg_options", "local_training_work"]


def check_model(model: Model) -> None:
  if not isinstance(model, Model):
    raise TypeError(f"model must be a fedjax_lite Model (see fedjax_lite.models.from_flax), got "
                    f"{type(model).__name__}.")


def resolve_aggregator(aggregator: Aggregator | None, weighted: bool) -> Aggregator:
  if aggregator is None:
    return mean() if weighted else unweighted_mean()
  if not isinstance(aggregator, Aggregator):
    raise TypeError(f"aggregator must be a fedjax_lite Aggregator, got {type(aggregator).__name__}.")
  return aggregator


def client_weight(weighting: str, metric_sums: dict) -> jax.Array:
  """``n_i`` (examples processed) for ``'num_examples'``, else 1."""
  if weighting == "num_examples":
    return metric_sums["num_examples"].astype(jnp.float32)
  return jnp.ones((), jnp.float32)


def local_training_work(
    model: Model,
    optimizer: ScheduledOptimizer,
    *,
    weighting: str = "num_examples",
    gradient_correction: GradientCorrection | None = None,
) -> ClientWork:
  """FedAvg's client work: local steps from the broadcast params, upload ``delta = params - final_params``.

  The local optimizer is ``optimizer.for_round(broadcast.hparams, correction)``: build the round with
  ``build_round(..., client_optimizer=optimizer)``, which broadcasts the round's hyperparameters (a scheduled
  learning rate); without them this raises. ``gradient_correction(broadcast, client_state)``, when given, returns
  an optax transformation chained BEFORE the client optimizer, i.e. applied to every local gradient (FedProx's
  proximal term).
  """
  check_model(model)
  validation.check_choice("weighting", weighting, WEIGHTINGS)

  def work(broadcast: Broadcast, client_data: PyTree, client_state: PyTree, rng: jax.Array) -> ClientOutput:
    corrections = () if gradient_correction is None else (gradient_correction(broadcast, client_state),)
    final_params, metric_sums = train_locally(model, optimizer.for_round(broadcast.hparams, *corrections),
                                              broadcast.params, client_data, rng)
    delta = jax.tree.map(jnp.subtract, broadcast.params, final_params)
    return ClientOutput(update=delta, weight=client_weight(weighting, metric_sums), metrics=metric_sums)

  return work


def fed_avg(
    model: Model,
    *,
    client_optimizer: optax.GradientTransformation | OptimizerFactory = optax.sgd,
    client_learning_rate: float | optax.Schedule | None = None,
    server_optimizer: optax.GradientTransformation | None = None,
    weighting: str = "num_examples",
    aggregator: Aggregator | None = None,
    client_grad_clip_norm: float | None = None,
    server_midpoint_fraction: float | None = None,
    gradient_correction: GradientCorrection | None = None,
    broadcast_encoder: Any | None = None,
    runner: Runner | None = None,
    client_work_wrapper: Callable[[ClientWork], ClientWork] | None = None,
) -> Process:
  """Builds FedAvg as a ``Process(init, next)``: a configuration of :func:`~fedjax_lite.algorithms.build_round`.

  The one builder of the FedAvg family: FedProx (:func:`~fedjax_lite.algorithms.fed_prox`) and FedOpt
  (:func:`~fedjax_lite.algorithms.fed_adam`, ...) are this function with one option set, and take every other
  option below as keywords (``FED_AVG_OPTIONS``), so a new option added here reaches them all.

  Args:
    model: the model.
    client_optimizer: an optax transformation, or a function of the learning rate (default ``optax.sgd``).
    client_learning_rate: the client rate, a float or an optax schedule of the ROUND number (required when
      ``client_optimizer`` is a function).
    server_optimizer: optax transformation applied to the aggregated delta; default ``optax.sgd(1.0)``.
    weighting: ``'num_examples'`` (weight = examples processed) or ``'uniform'`` (weight 1).
    aggregator: any aggregator; default the weighted mean (``'num_examples'``) or unweighted mean
      (``'uniform'``).
    client_grad_clip_norm: optional clip of each local gradient's global L2 norm (``optax.clip_by_global_norm``
      chained before the client optimizer).
    server_midpoint_fraction: optional ``f`` in (0, 1]: the server step is scaled by ``f`` (``optax.scale``
      chained after the server optimizer); with SGD(1.0), ``f = 0.5`` lands at the midpoint of the current and
      averaged models.
    gradient_correction: optional ``(broadcast, client_state) -> optax transformation`` chained BEFORE the client
      optimizer, i.e. applied to every local gradient (FedProx's proximal term; see
      :func:`local_training_work`).
    broadcast_encoder: optional server-to-client compression with ``encode(params, rng) -> params as the
      clients receive them`` and ``bits(params_template) -> int`` (e.g.
      ``aggregators.quantization.broadcast_encoder(8, 10000)``). Clients train from the decoded parameters and
      report their delta from them; the server applies the aggregate to its exact parameters.
    runner: the client runner (default: per-backend strategy).
    client_work_wrapper: optional ``client_work -> client_work``, applied to the local-training client work before
      the round is built: a driver that changes what ONE client receives or uploads wraps it here
      (:func:`~fedjax_lite.algorithms.fed_buff` picks each client's model version and scales its update by its
      staleness weight), and every other option keeps its meaning.

  Returns:
    ``Process(init, next)`` with ``init(params) -> ServerState`` and
    ``next(state, round_data, rng) -> RoundOutput(state, metrics, client_states=None)``, jittable end to end.

  Example::

    process = fed_avg(model, client_learning_rate=0.02)
    state = process.init(model.init(jax.random.key(0)))
    state, metrics, _ = jax.jit(process.next)(state, round_data, jax.random.key(1))
  """
  check_model(model)
  optimizer = scheduled_optimizer(client_optimizer, client_learning_rate, grad_clip_norm=client_grad_clip_norm)
  server_optimizer = optax.sgd(1.0) if server_optimizer is None else server_optimizer
  check_optimizer("server_optimizer", server_optimizer)
  validation.check_choice("weighting", weighting, WEIGHTINGS)
  validation.check_float("server_midpoint_fraction", server_midpoint_fraction, low=0.0, high=1.0,
                         low_inclusive=False, allow_none=True)
  if gradient_correction is not None and not callable(gradient_correction):
    raise TypeError(f"gradient_correction must be a function (broadcast, client_state) -> optax "
                    f"GradientTransformation, got {type(gradient_correction).__name__}.")
  if client_work_wrapper is not None and not callable(client_work_wrapper):
    raise TypeError(f"client_work_wrapper must be a function client_work -> client_work, got "
                    f"{type(client_work_wrapper).__name__}.")
  if server_midpoint_fraction is not None:
    server_optimizer = optax.chain(server_optimizer, optax.scale(server_midpoint_fraction))
  work = local_training_work(model, optimizer, weighting=weighting, gradient_correction=gradient_correction)
  return build_round(
      work if client_work_wrapper is None else client_work_wrapper(work),                                   # 2.
      distributor=model_distributor(),                                                                       # 1.
      client_optimizer=optimizer,                                                                            #    rate
      aggregator=resolve_aggregator(aggregator, weighted=weighting == "num_examples"),                      # 3.
      finalizer=optimizer_finalizer(server_optimizer),                                                       # 4.
      broadcast_encoder=broadcast_encoder,
      runner=runner,
  )


FED_AVG_OPTIONS = tuple(name for name in inspect.signature(fed_avg).parameters if name != "model")


def fed_avg_options(builder: str, options: Mapping[str, Any], *, sets: tuple[str, ...]) -> dict[str, Any]:
  """``options`` for :func:`fed_avg` from a builder that sets the options ``sets`` itself (e.g. FedProx sets
  ``gradient_correction``); any other name is a ``TypeError`` listing what ``builder`` accepts."""
  allowed = [name for name in FED_AVG_OPTIONS if name not in sets]
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise TypeError(f"{builder}() got unexpected keyword argument(s) {unknown}; besides its own arguments it takes "
                    f"fedjax_lite.algorithms.fed_avg's options {allowed} ({', '.join(sets)} set by {builder}).")
  return dict(options)
