"""FedNova (Wang et al. 2020, "Tackling the Objective Inconsistency Problem in Heterogeneous Federated
Optimization", NeurIPS, arXiv:2007.07481): normalized averaging of clients that took different numbers of local
steps.

With local SGD, client ``i``'s update after ``tau_i`` steps is ``x - y_i = eta G_i a_i``, its gradients ``G_i``
combined by the vector ``a_i`` (the paper's eq. 4). FedAvg averages ``x - y_i`` and so, when the ``tau_i`` differ
(ragged data, or stragglers' partial work under a deadline), minimizes a surrogate objective that weights client
``i`` by ``p_i ||a_i||_1`` instead of ``p_i`` (Theorem 1: the objective inconsistency). FedNova averages the
NORMALIZED updates and rescales by an effective step count (eq. 6):

  ``d_i = (x - y_i) / ||a_i||_1``,  ``tau_eff = sum_i p_i ||a_i||_1``,  ``x <- x - tau_eff sum_i p_i d_i``.

``a_i`` depends on the local optimizer (Section 4 and Appendix):

* vanilla SGD: ``a_i = [1, ..., 1]`` (``tau_i`` ones), ``||a_i||_1 = tau_i``;
* SGD with heavy-ball momentum ``rho`` (``v <- rho v + g``, ``y <- y - eta v``, the buffer fresh on each client):
  ``a_i[k] = (1 - rho^(tau_i - k)) / (1 - rho)`` for ``k = 0 .. tau_i - 1``, so
  ``||a_i||_1 = (tau_i - rho (1 - rho^tau_i) / (1 - rho)) / (1 - rho)``.

``tau_i`` is the number of local steps the client actually took: the local loop's ``num_batches`` metric, which
counts only real steps -- and only the steps within a straggler's budget (``core.pack_clients(step_budget=...)``,
:mod:`fedjax_lite.systems`).

One round in the four parts:

1. distributor: the server model and the round's client learning rate;
2. client work: local (momentum) SGD from ``x``; upload ``{'normalized': d_i, 'steps': ||a_i||_1}`` with weight
   ``p_i`` (``n_i``, examples processed, or 1: ``weighting``);
3. aggregator: the weighted mean of both keys, i.e. ``sum_i p_i d_i`` and ``tau_eff`` (``aggregator=`` replaces
   the one of ``normalized``; ``steps`` always uses the exact weighted mean);
4. finalizer: ``params <- server_optimizer(params, tau_eff sum_i p_i d_i)``; with ``optax.sgd(1.0)`` (the default)
   this is the paper's update. Measurement ``finalizer/tau_eff``.

``p_i``: the paper's ``p_i`` is client ``i``'s share of the data. ``weighting='num_examples'`` weights by the
examples processed, which is that share when every client does its full local epochs (ragged ``tau_i`` from ragged
data); under step budgets the examples processed shrink with the budget, which weights fast clients more. For
clients holding equal data (e.g. ``datasets.load_digits``' shards), ``weighting='uniform'`` is the paper's ``p_i``
under any budgets. (A weight by full-work size under budgets would need the size in the packed round; not done.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from fedjax_lite.aggregators.base import Aggregator
from fedjax_lite.algorithms.fed_avg import (check_model, client_weight, fed_avg_arguments, resolve_aggregator,
                                            resolve_server_optimizer)
from fedjax_lite.algorithms.local_training import train_locally
from fedjax_lite.algorithms.optimizers import ScheduledOptimizer, scheduled_optimizer
from fedjax_lite.algorithms.template import (Broadcast, ClientWork, Finalizer, FinalizerOutput, build_round,
                                             model_distributor, optimizer_finalizer)
from fedjax_lite.core import validation
from fedjax_lite.core.model import Model
from fedjax_lite.core.process import Process
from fedjax_lite.core.records import ClientOutput
from fedjax_lite.core.tree import PyTree

__all__ = ["fed_nova", "nova_normalizer"]

NORMALIZED, STEPS = "normalized", "steps"


def nova_normalizer(num_steps: jax.Array, momentum: float = 0.0) -> jax.Array:
  """``||a_i||_1`` for ``tau_i = num_steps`` local steps of SGD with heavy-ball momentum ``rho`` (0: vanilla):
  ``sum_{k=1}^{tau} (1 - rho^k) / (1 - rho) = (tau - rho (1 - rho^tau) / (1 - rho)) / (1 - rho)``, ``tau`` for
  ``rho = 0`` (Wang et al. 2020, Section 4)."""
  validation.check_float("momentum", momentum, low=0.0, high=1.0, high_inclusive=False)
  tau = jnp.asarray(num_steps, jnp.float32)
  if momentum == 0.0:
    return tau
  rho = jnp.float32(momentum)
  return (tau - rho * (1.0 - rho ** tau) / (1.0 - rho)) / (1.0 - rho)


def normalized_work(model: Model, optimizer: ScheduledOptimizer, momentum: float, weighting: str) -> ClientWork:
  """FedNova's client work: local steps from ``x``, upload ``d_i = (x - y_i) / ||a_i||_1`` and ``||a_i||_1``."""

  def work(broadcast: Broadcast, client_data: PyTree, client_state: PyTree, rng: jax.Array) -> ClientOutput:
    final, sums = train_locally(model, optimizer.for_round(broadcast.hparams), broadcast.params, client_data, rng)
    norm = nova_normalizer(sums["num_batches"], momentum)                      # ||a_i||_1 of the steps taken
    scale = jnp.where(norm > 0, 1.0 / jnp.maximum(norm, 1e-30), 0.0)            # a client of 0 steps sends 0
    normalized = jax.tree.map(lambda x, y: (x - y) * scale.astype(x.dtype), broadcast.params, final)
    return ClientOutput(update={NORMALIZED: normalized, STEPS: norm}, weight=client_weight(weighting, sums),
                        metrics=sums)

  return work


def nova_finalizer(server_optimizer: optax.GradientTransformation) -> Finalizer:
  """``params <- server_optimizer(params, tau_eff * sum_i p_i d_i)`` (measurement ``tau_eff``)."""
  inner = optimizer_finalizer(server_optimizer)

  def apply(opt_state, params, aggregate) -> FinalizerOutput:
    tau_eff = aggregate[STEPS]
    step = jax.tree.map(lambda d: tau_eff.astype(d.dtype) * d, aggregate[NORMALIZED])
    return inner.apply(opt_state, params, step)._replace(measurements={"tau_eff": tau_eff})

  return Finalizer(init=inner.init, apply=apply)


def fed_nova(model: Model, *, client_momentum: float = 0.0, **options) -> Process:
  """Builds FedNova (module docstring): ``x <- x - tau_eff sum_i p_i (x - y_i) / ||a_i||_1`` with local SGD
  (``client_momentum = 0``, ``||a_i||_1 = tau_i``) or heavy-ball momentum SGD (``client_momentum = rho``).

  Args:
    model: the model.
    client_momentum: ``rho`` in ``[0, 1)``, the clients' heavy-ball momentum (``optax.sgd(lr, momentum=rho)``,
      the buffer fresh each round).
    **options: :func:`~fedjax_lite.algorithms.fed_avg`'s options: ``client_learning_rate`` (required; a float or a
      schedule of the round), ``server_optimizer`` (default ``optax.sgd(1.0)``: the paper), ``weighting``
      (``p_i``), ``aggregator`` (of the normalized updates), ``client_grad_clip_norm``,
      ``server_midpoint_fraction``, ``broadcast_encoder``, ``runner``. ``client_optimizer`` (SGD, whose ``a_i``
      FedNova knows) and ``gradient_correction`` (it would change ``a_i``) are set by FedNova; parameter
      partitions (``labels``, ``local_state``, ``local_phases``) are not supported (refused).

  Example::

    process = fed_nova(model, client_learning_rate=0.1, client_momentum=0.9)
  """
  check_model(model)
  validation.check_float("client_momentum", client_momentum, low=0.0, high=1.0, high_inclusive=False)
  args = fed_avg_arguments("fed_nova", options, takes=(
      "client_learning_rate", "server_optimizer", "weighting", "aggregator", "client_grad_clip_norm",
      "server_midpoint_fraction", "broadcast_encoder", "runner"))
  factory = optax.sgd if client_momentum == 0.0 else functools.partial(optax.sgd, momentum=client_momentum)
  optimizer = scheduled_optimizer(factory, args["client_learning_rate"], grad_clip_norm=args["client_grad_clip_norm"])
  validation.check_choice("weighting", args["weighting"], ("num_examples", "uniform"))
  weighted = args["weighting"] == "num_examples"
  normalized_aggregator: Aggregator = resolve_aggregator(args["aggregator"], weighted=weighted)
  return build_round(
      normalized_work(model, optimizer, client_momentum, args["weighting"]),                 # 2. client work
      distributor=model_distributor(),                                                       # 1. the model and
      client_optimizer=optimizer,                                                            #    the round's rate
      aggregator={NORMALIZED: normalized_aggregator,                                         # 3. sum_i p_i d_i
                  STEPS: resolve_aggregator(None, weighted=weighted)},                       #    tau_eff
      update_template=lambda params: {NORMALIZED: params, STEPS: jax.ShapeDtypeStruct((), jnp.float32)},
      finalizer=nova_finalizer(resolve_server_optimizer(args["server_optimizer"],            # 4. server update
                                                        args["server_midpoint_fraction"])),
      broadcast_encoder=args["broadcast_encoder"],
      runner=args["runner"],
  )
