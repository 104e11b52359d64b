"""Ditto (Li, Hu, Beirami & Smith 2021, "Ditto: Fair and Robust Federated Learning Through Personalization", ICML,
arXiv:2012.04221), Algorithm 1.

Every client ``k`` of the POPULATION keeps a personal model ``v_k`` (its client state, kept in a
:class:`fedjax_lite.core.ClientStateStore`; the initial global model at first), and the global model ``w`` trains
exactly as FedAvg. A round, for the sampled clients S:

1. distributor: broadcast ``w`` (and the round's client and personal learning rates);
2. client ``k``: (a) FedAvg's local SGD from ``w`` gives ``w_k``, uploaded as ``delta_k = w - w_k`` with FedAvg's
   weight; (b) the personal model takes the same number of SGD steps (one pass over the client's packed batches)
   on ``F_k(v) + lambda/2 ||v - w||^2``:

       v_k <- v_k - eta_p (grad F_k(v_k; b) + lambda (v_k - w))

   with ``w`` the BROADCAST global model of this round (fixed during the steps), and ``v_k`` goes back to the store;
3. aggregator: ``delta = aggregate({delta_k}, {n_k})``, by default the example-weighted mean (FedAvg's);
4. finalizer: ``w <- server_optimizer(w, delta)`` (SGD(1.0): the weighted average of the ``w_k``).

``lambda = 0`` makes ``v_k`` local training alone (it keeps its own optimum); a large ``lambda`` ties ``v_k`` to
``w``. The personal steps never change what is uploaded: the global model is FedAvg's, bit for bit. A client whose
global update or personal model is not finite is rejected and keeps its ``v_k`` (the template's rule).

Metrics: FedAvg's, plus ``client_work/train/personal_loss`` and ``personal_<metric>`` (the personal steps' forward
passes, example-weighted like the global ones) and ``client_work/personal_learning_rate``. Evaluate both models
with :func:`~fedjax_lite.algorithms.personalized_evaluation` ``(model)(state.params, personal_models,
test_data)``: the state of a client IS its whole personal model, so the default ``personal_params`` applies; it
reports the global model and each client's personal model per client, example-weighted, and as their distribution
over clients (the mean client and the worst 10%, the paper's fairness measure).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_lite.aggregators.base import Aggregator
from fedjax_lite.algorithms.fed_avg import (
    WEIGHTINGS,
    check_model,
    local_training_work,
    resolve_aggregator,
)
from fedjax_lite.algorithms.fed_prox import proximal_term
from fedjax_lite.algorithms.local_training import train_locally
from fedjax_lite.algorithms.optimizers import scheduled_optimizer
from fedjax_lite.algorithms.template import (
    Broadcast,
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

PERSONAL_LEARNING_RATE = "personal_learning_rate"
PERSONAL_STREAM = 0xD1770  # the personal steps' key is fold_in(client key, PERSONAL_STREAM); the global steps use
                           # the client key itself, as FedAvg's do


def ditto(
    model: Model,
    *,
    proximal_strength: float,
    client_learning_rate: float | optax.Schedule,
    personal_learning_rate: float | optax.Schedule | None = None,
    server_optimizer: optax.GradientTransformation | None = None,
    weighting: str = "num_examples",
    aggregator: Aggregator | None = None,
    runner: Runner | None = None,
) -> Process:
  """Builds Ditto (see the module docstring for the update rules).

  Args:
    model: the model.
    proximal_strength: ``lambda >= 0``, the pull of each personal model towards the global one (the paper tunes
      it in {0.01, 0.1, 1, 2}).
    client_learning_rate: the global model's local SGD rate, a positive float or a schedule of the round number.
    personal_learning_rate: ``eta_p`` of the personal steps, a float or a schedule of the round number; default
      ``client_learning_rate``.
    server_optimizer: applied to the aggregated delta; default ``optax.sgd(1.0)`` (FedAvg).
    weighting: ``'num_examples'`` (FedAvg's default) or ``'uniform'`` for the global model's mean.
    aggregator: aggregator of the global deltas; default the (un)weighted mean per ``weighting``.
    runner: the client runner.

  Returns:
    ``Process(init, next, client_state)``: ``client_state(params)`` is one client's initial personal model (the
    params themselves); ``next(state, round_data, rng, client_states) -> RoundOutput(state, metrics,
    client_states)`` takes the cohort's personal models and returns them trained (``training.run_training`` and
    :class:`fedjax_lite.core.ClientStateStore` gather and scatter them).
  """
  check_model(model)
  validation.check_float("proximal_strength", proximal_strength, low=0.0)
  validation.check_choice("weighting", weighting, WEIGHTINGS)
  optimizer = scheduled_optimizer(optax.sgd, client_learning_rate)
  personal_rate = client_learning_rate if personal_learning_rate is None else personal_learning_rate
  if not callable(personal_rate):
    validation.check_positive(PERSONAL_LEARNING_RATE, personal_rate)
  personal_schedule = personal_rate if callable(personal_rate) else (lambda round_num: personal_rate)
  server_optimizer = optax.sgd(1.0) if server_optimizer is None else server_optimizer
  check_optimizer("server_optimizer", server_optimizer)
  global_work = local_training_work(model, optimizer, weighting=weighting)

  def client_work(broadcast: Broadcast, client_data: PyTree, personal: PyTree, rng: jax.Array) -> ClientOutput:
    output = global_work(broadcast, client_data, None, rng)                        # (a) FedAvg's local steps
    personal_optimizer = optax.chain(proximal_term(proximal_strength, anchor=broadcast.params),  # (b) v_k
                                     optax.sgd(broadcast.hparams[PERSONAL_LEARNING_RATE]))
    personal, sums = train_locally(model, personal_optimizer, personal, client_data,
                                   jax.random.fold_in(rng, PERSONAL_STREAM))
    personal_sums = {f"personal_{name}": sums[name] for name in ("loss", *model.metrics)}
    return output._replace(metrics={**output.metrics, **personal_sums}, new_state=personal)

  return build_round(
      client_work,                                                                                      # 2.
      distributor=model_distributor(                                                                    # 1.
          client_hparams=lambda round_num: {PERSONAL_LEARNING_RATE: jnp.asarray(personal_schedule(round_num),
                                                                                jnp.float32)}),
      client_optimizer=optimizer,                                                                       #    rate
      aggregator=resolve_aggregator(aggregator, weighted=weighting == "num_examples"),                 # 3.
      finalizer=optimizer_finalizer(server_optimizer),                                                  # 4.
      client_state=lambda params: params,
      runner=runner,
  )
