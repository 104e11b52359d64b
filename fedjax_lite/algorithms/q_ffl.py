"""q-FFL trained by q-FedAvg (Li, Sanjabi, Beirami & Smith 2020, "Fair Resource Allocation in Federated Learning",
ICLR, arXiv:1905.10497, Algorithm 2).

q-FFL minimizes ``f_q(w) = sum_k p_k F_k(w)^(q+1) / (q + 1)``: ``q = 0`` is FedAvg's objective, a larger ``q``
weights the clients with a larger loss more, giving a more uniform accuracy over clients (fairness). q-FedAvg
replaces the step size with a Lipschitz estimate ``L`` of ``grad F_k`` and, for the selected clients ``k``:

  ``Delta w_k = L (w - w_k_bar)`` (``w_k_bar``: the client's model after local SGD from ``w``),
  ``Delta_k = F_k(w)^q Delta w_k``,  ``h_k = q F_k(w)^(q-1) ||Delta w_k||^2 + L F_k(w)^q``,
  ``w <- w - sum_k Delta_k / sum_k h_k``,

with ``F_k(w)`` the client's loss at the broadcast model BEFORE local training (its mean loss over the examples it
is packed with, computed in the client work). As the paper's code (``fair_flearn``, ``qffedavg.py``), ``L``
defaults to ``1 / eta`` (the client learning rate of the round) and the loss is ``F_k + 1e-10`` inside the powers
(a client with a zero loss stays finite for ``q < 1``). With ``q = 0`` the server step is the unweighted mean of the
clients' updates (FedAvg with uniform weights).

One round in the four parts:

1. distributor: the server model and the round's client learning rate;
2. client work: ``F_k(w)`` (one pass over the client's batches at ``w``), local SGD to ``w_k_bar``; upload
   ``{'delta': Delta_k, 'h': h_k}`` with weight 1;
3. aggregator: the unweighted means of both (their ratio is the paper's ratio of sums);
4. finalizer: ``params <- server_optimizer(params, mean Delta_k / mean h_k)``; the default ``optax.sgd(1.0)`` is
   the paper's update. Measurement ``finalizer/mean_h``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_lite.aggregators.mean import unweighted_mean
from fedjax_lite.algorithms.evaluation import client_metric_sums
from fedjax_lite.algorithms.fed_avg import GradientCorrection, check_model, fed_avg_arguments, resolve_server_optimizer
from fedjax_lite.algorithms.local_training import train_locally
from fedjax_lite.algorithms.optimizers import ScheduledOptimizer, scheduled_optimizer
from fedjax_lite.algorithms.template import (Broadcast, ClientWork, Finalizer, FinalizerOutput, build_round,
                                             model_distributor, optimizer_finalizer)
from fedjax_lite.core import validation
from fedjax_lite.core.model import Model
from fedjax_lite.core.process import Process
from fedjax_lite.core.records import ClientOutput
from fedjax_lite.core.tree import PyTree

__all__ = ["q_ffl"]

DELTA, H = "delta", "h"
LOSS_OFFSET = 1e-10  # the paper's code: np.float_power(loss + 1e-10, q)


def fair_work(model: Model, optimizer: ScheduledOptimizer, q: float, lipschitz: float | None,
              gradient_correction: GradientCorrection | None) -> ClientWork:
  """q-FedAvg's client work: ``F_k(w)``, local steps to ``w_k_bar``, upload ``Delta_k`` and ``h_k``."""

  def work(broadcast: Broadcast, client_data: PyTree, client_state: PyTree, rng: jax.Array) -> ClientOutput:
    before = client_metric_sums(model, broadcast.params, client_data)         # F_k(w): before local training
    loss = before["loss"] / jnp.maximum(before["num_examples"], 1).astype(jnp.float32) + LOSS_OFFSET
    corrections = () if gradient_correction is None else (gradient_correction(broadcast, client_state),)
    final, sums = train_locally(model, optimizer.for_round(broadcast.hparams, *corrections), broadcast.params,
                                client_data, rng)
    rate = lipschitz if lipschitz is not None else 1.0 / broadcast.hparams["learning_rate"]   # L = 1 / eta
    step = jax.tree.map(lambda x, y: rate * (x - y), broadcast.params, final)  # Delta w_k = L (w - w_k_bar)
    loss_q = loss ** q
    h = rate * loss_q
    if q > 0:  # (q = 0: no first term; 0 * F^-1 * ||Delta w||^2 could be 0 * inf)
      squared_norm = sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(step))
      h = h + q * loss ** (q - 1.0) * squared_norm
    metrics = dict(sums, initial_loss=before["loss"])
    return ClientOutput(update={DELTA: jax.tree.map(lambda d: loss_q * d, step), H: h},
                        weight=jnp.ones((), jnp.float32), metrics=metrics)

  return work


def fair_finalizer(server_optimizer: optax.GradientTransformation) -> Finalizer:
  """``params <- server_optimizer(params, mean_k Delta_k / mean_k h_k)`` (measurement ``mean_h``)."""
  inner = optimizer_finalizer(server_optimizer)

  def apply(opt_state, params, aggregate) -> FinalizerOutput:
    mean_h = aggregate[H]
    step = jax.tree.map(lambda d: d / mean_h.astype(d.dtype), aggregate[DELTA])
    return inner.apply(opt_state, params, step)._replace(measurements={"mean_h": mean_h})

  return Finalizer(init=inner.init, apply=apply)


def q_ffl(model: Model, q: float, *, lipschitz: float | None = None, **options) -> Process:
  """Builds q-FedAvg (module docstring): ``w <- w - sum_k F_k^q Delta w_k / sum_k h_k``.

  Args:
    model: the model.
    q: the fairness parameter ``q >= 0`` (0: FedAvg's objective; the paper uses 0.001 to 15 by dataset).
    lipschitz: ``L > 0``, the Lipschitz estimate; default ``1 / eta``, the round's client learning rate (the
      paper's code), which needs ``client_optimizer`` to be a function of the learning rate (the default SGD).
    **options: :func:`~fedjax_lite.algorithms.fed_avg`'s options: ``client_learning_rate``, ``client_optimizer``
      (default ``optax.sgd``: the paper's local SGD), ``server_optimizer`` (default ``optax.sgd(1.0)``: the
      paper), ``client_grad_clip_norm``, ``server_midpoint_fraction``, ``gradient_correction``,
      ``broadcast_encoder``, ``runner``. ``weighting`` and ``aggregator`` are set by q-FFL (the weights are the
      losses' powers); parameter partitions (``labels``, ``local_state``, ``local_phases``) are not supported.

  Example::

    process = q_ffl(model, q=1.0, client_learning_rate=0.1)
  """
  check_model(model)
  validation.check_float("q", q, low=0.0)
  validation.check_positive("lipschitz", lipschitz, allow_none=True)
  args = fed_avg_arguments("q_ffl", options, takes=(
      "client_optimizer", "client_learning_rate", "server_optimizer", "client_grad_clip_norm",
      "server_midpoint_fraction", "gradient_correction", "broadcast_encoder", "runner"))
  optimizer = scheduled_optimizer(args["client_optimizer"], args["client_learning_rate"],
                                  grad_clip_norm=args["client_grad_clip_norm"])
  if lipschitz is None and "learning_rate" not in optimizer.names:
    raise ValueError("q_ffl's default Lipschitz estimate is 1 / the client learning rate, but client_optimizer is "
                     "an optax transformation with its own rate: pass client_optimizer=optax.sgd (a function of the "
                     "rate) with client_learning_rate, or lipschitz=L.")
  if args["gradient_correction"] is not None and not callable(args["gradient_correction"]):
    raise TypeError(f"gradient_correction must be a function (broadcast, client_state) -> optax "
                    f"GradientTransformation, got {type(args['gradient_correction']).__name__}.")
  return build_round(
      fair_work(model, optimizer, float(q), lipschitz, args["gradient_correction"]),        # 2. client work
      distributor=model_distributor(),                                                      # 1. the model and
      client_optimizer=optimizer,                                                           #    the round's rate
      aggregator={DELTA: unweighted_mean(), H: unweighted_mean()},                          # 3. means (ratio)
      update_template=lambda params: {DELTA: params, H: jax.ShapeDtypeStruct((), jnp.float32)},
      finalizer=fair_finalizer(resolve_server_optimizer(args["server_optimizer"],           # 4. server update
                                                        args["server_midpoint_fraction"])),
      broadcast_encoder=args["broadcast_encoder"],
      runner=args["runner"],
  )
