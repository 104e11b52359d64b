"""Evaluation of a Federated Reconstruction model (TFF's ``tff.learning.algorithms.build_fed_recon_eval``, TFF 0.82
``learning/algorithms/fed_recon_eval.py``; Singhal et al. 2021, NeurIPS, arXiv:2102.03448).

A trained model is only its global parameters; each evaluated client (1) reconstructs its local parameters as in
training -- fresh local values trained on its reconstruction part with the global parameters fixed -- and (2)
evaluates the global parameters with those local ones on its other part (inference mode), the two parts from the
same :class:`~fedjax_lite.algorithms.DatasetSplit` (by default TFF's: even-indexed batches reconstruct,
odd-indexed ones evaluate). Nothing is kept: the local parameters are dropped after the client's metrics.

Metrics are summed over the clients' evaluation examples and finalized once (TFF's ``SumThenFinalizeFactory``:
example-weighted means), and also returned per client and as their distribution over clients
(:func:`~fedjax_lite.algorithms.client_distribution`: the mean client and the worst 10%).
TFF's evaluation process also accumulates ``total_rounds_metrics`` over calls in its state; this one is a pure
function of the model and the clients (sum the per-round sums yourself to accumulate).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from fedjax_lite.algorithms.evaluation import client_distribution, client_metric_sums
from fedjax_lite.algorithms.fed_recon import DatasetSplit, LocalInitializer, reconstruct, reconstruction_stage
from fedjax_lite.core.model import Model, finalize_metric_sums
from fedjax_lite.core.param_partition import LabelSpec, label_params
from fedjax_lite.core.runner import Runner, run_clients
from fedjax_lite.core.tree import PyTree


def fed_recon_evaluation(
    model: Model,
    labels: LabelSpec,
    *,
    reconstruction_optimizer: optax.GradientTransformation | None = None,
    dataset_split: DatasetSplit | None = None,
    local_initializer: LocalInitializer | None = None,
    worst_percent: int = 10,
    lower_is_better: tuple[str, ...] = ("loss",),
    runner: Runner | None = None,
) -> Callable[..., dict]:
  """``evaluate(params, round_data, rng=None) -> metrics`` for a Federated Reconstruction model.

  Args:
    model: the model.
    labels: the same labels as in training (:func:`~fedjax_lite.algorithms.fed_recon`).
    reconstruction_optimizer: default ``optax.sgd(0.1)`` (TFF's).
    dataset_split: default :class:`~fedjax_lite.algorithms.DatasetSplit` ``()`` (TFF's: disjoint halves;
      the post-reconstruction part is the evaluation part).
    local_initializer: ``key -> local params``; default the local part of ``model.init(key)``.
    worst_percent, lower_is_better: of the distribution over clients
      (:func:`~fedjax_lite.algorithms.client_distribution`).
    runner: the client runner.

  Returns:
    ``evaluate(params, round_data, rng=None)`` (jitted; ``params`` the model's full params, e.g. ``state.params``
    of a :func:`~fedjax_lite.algorithms.fed_recon` run, whose local values are not used; client slot ``k``'s
    local values use ``fold_in(fold_in(rng, k), LOCAL_INIT_STREAM)``, default ``rng`` ``jax.random.key(0)``)
    returning
    ``{'aggregate': {loss, <metrics>, num_examples, num_batches}, 'per_client': {same, each [clients]},
    'distribution': client_distribution(per_client)}`` over the evaluation parts.
  """
  stage = reconstruction_stage(model, labels, reconstruction_optimizer, dataset_split, local_initializer)
  client_distribution({"num_examples": jnp.zeros(1), "loss": jnp.zeros(1)}, worst_percent=worst_percent,
                      lower_is_better=lower_is_better)  # checks the options now

  def per_client(params, client_data, rng):
    reconstruction_data, evaluation_data = stage.dataset_split.apply(client_data)
    params, _ = reconstruct(model, stage, params, reconstruction_data, rng)                # (1) reconstruct
    sums = client_metric_sums(model, params, evaluation_data)                               # (2) evaluate
    return sums, sums

  @jax.jit
  def run(params: PyTree, round_data: PyTree, rng: jax.Array) -> dict:
    label_params(params, stage.labels)  # the model's full params (their local values are not used)
    totals, per_client_sums = run_clients(per_client, params, round_data, rng, runner=runner)
    per_client_metrics = finalize_metric_sums(per_client_sums)
    return {"aggregate": finalize_metric_sums(totals), "per_client": per_client_metrics,
            "distribution": client_distribution(per_client_metrics, worst_percent=worst_percent,
                                                lower_is_better=lower_is_better)}

  def evaluate(params: PyTree, round_data: PyTree, rng: jax.Array | None = None) -> dict:
    return run(params, round_data, jax.random.key(0) if rng is None else rng)

  return evaluate
