"""Personalization evaluation (TFF ``build_personalization_eval_computation``; Wang et al. 2019, "Federated
Evaluation of On-device Personalization", arXiv:1910.10252).

For each sampled client, with the global model ``w``:

1. ``baseline_metrics``: ``w`` evaluated on the client's TEST split;
2. for each named strategy ``(optimizer, num_epochs)``: ``w`` fine-tuned on the client's TRAIN split
   (``num_epochs`` passes of local steps with the optax ``optimizer``, fresh state) and the result evaluated on
   its test split.

Returns per-client metrics (arrays ``[clients]``, padding slots with ``num_examples == 0`` and NaN means, as the
reference's per-client lists) and their example-weighted aggregates over the clients' test examples. The clients
run through the runner like training (one compiled program; no Python per client); the train and test splits are
packed separately for the same cohort (``core.pack_clients``) and passed together.
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import optax

from fedjax_lite.algorithms.evaluation import client_metric_sums
from fedjax_lite.algorithms.fed_avg import check_model
from fedjax_lite.algorithms.local_training import train_locally
from fedjax_lite.core import validation
from fedjax_lite.core.model import Model, finalize_metric_sums
from fedjax_lite.core.runner import Runner, run_clients
from fedjax_lite.core.tree import PyTree

Strategy = tuple[optax.GradientTransformation, int]


def personalization_evaluation(
    model: Model,
    strategies: Mapping[str, Strategy],
    *,
    runner: Runner | None = None,
) -> Callable[[PyTree, PyTree, PyTree], dict]:
  """A jitted ``(params, train_data, test_data) -> metrics`` (see the module docstring).

  Args:
    model: the model.
    strategies: name -> ``(optax optimizer, num_epochs >= 1)``; e.g. ``{'sgd_1_epoch': (optax.sgd(0.01), 1)}``.
      The packed train data should hold ONE epoch (``num_epochs=1`` when packing): a strategy runs it
      ``num_epochs`` times.
    runner: the client runner.

  Returns:
    ``fn(params, train_data, test_data)`` where both data are packed rounds of the SAME cohort (slot ``k`` is the
    same client). It returns ``{'baseline_metrics': {'aggregate', 'per_client'}, <name>: {'aggregate',
    'per_client'}, ...}`` of ``{loss, <metrics>, num_examples, num_batches}``.
  """
  check_model(model)
  if not isinstance(strategies, Mapping) or not strategies:
    raise ValueError("strategies must be a non-empty mapping name -> (optax optimizer, num_epochs).")
  for name, strategy in strategies.items():
    if not isinstance(name, str) or name == "baseline_metrics":
      raise ValueError(f"strategy names must be strings other than 'baseline_metrics', got {name!r}.")
    if not (isinstance(strategy, tuple) and len(strategy) == 2
            and isinstance(strategy[0], optax.GradientTransformation)):
      raise TypeError(f"strategies[{name!r}] must be (optax GradientTransformation, num_epochs), got {strategy!r}.")
    validation.check_int(f"strategies[{name!r}] num_epochs", strategy[1], minimum=1)

  def per_client(params, client_data, rng):
    test = client_data["test"]
    sums = {"baseline_metrics": client_metric_sums(model, params, test)}
    for index, (name, (optimizer, num_epochs)) in enumerate(sorted(strategies.items())):
      tuned = params
      for epoch in range(num_epochs):
        tuned, _ = train_locally(model, optimizer, tuned, client_data["train"],
                                 jax.random.fold_in(rng, index * 1000 + epoch))
      sums[name] = client_metric_sums(model, tuned, test)
    return sums, sums

  @jax.jit
  def evaluate(params: PyTree, train_data: PyTree, test_data: PyTree) -> dict:
    train_slots, test_slots = (jax.tree.leaves(train_data)[0].shape[0], jax.tree.leaves(test_data)[0].shape[0])
    if train_slots != test_slots:
      raise ValueError(f"train_data and test_data must pack the same cohort: {train_slots} vs {test_slots} "
                       "client slots.")
    data = {"num_examples": test_data["num_examples"], "train": train_data, "test": test_data}
    totals, per_client_sums = run_clients(per_client, params, data, jax.random.key(0), runner=runner)
    return {name: {"aggregate": finalize_metric_sums(totals[name]),
                   "per_client": finalize_metric_sums(per_client_sums[name])} for name in totals}

  return evaluate
