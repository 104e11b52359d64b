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

:func:`personalized_evaluation` evaluates the algorithms that keep per-client parameters (FedPer, FedRep, FedBN:
the local part of a partitioned round; Ditto: a personal model): each client with ITS OWN parameters -- the server
params with the client's state laid over them (:func:`fedjax_lite.core.overlay_params`) -- next to the global
model, both reported per client, example-weighted and as a distribution over clients (the mean client and the
worst 10%, :func:`~fedjax_lite.algorithms.client_distribution`).
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import optax

from fedjax_lite.algorithms.evaluation import client_distribution, client_metric_sums
from fedjax_lite.algorithms.fed_avg import check_model
from fedjax_lite.algorithms.local_training import train_locally
from fedjax_lite.core import validation
from fedjax_lite.core.model import Model, finalize_metric_sums
from fedjax_lite.core.param_partition import overlay_params
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


def personalized_evaluation(
    model: Model,
    *,
    personal_params: Callable[[PyTree], PyTree] | None = None,
    worst_percent: int = 10,
    lower_is_better: tuple[str, ...] = ("loss",),
    runner: Runner | None = None,
) -> Callable[[PyTree, PyTree, PyTree], dict]:
  """A jitted ``(params, client_states, round_data) -> metrics``: every client of ``round_data`` evaluated with
  the global model and with its own parameters.

  Client slot ``k``'s own parameters are ``overlay_params(params, personal_params(client_states[k]))``: the
  server's ``params`` with the leaves its state holds laid over them. For a partitioned round with
  ``local_state=True`` (FedPer, FedRep, FedBN) the state IS the local part (``personal_params`` default: the state
  itself), so the client runs the global body with its own head or BN layers; a state holding a whole personal
  model replaces every leaf (Ditto: ``personal_params=lambda state: state.personal`` or however its state names
  it).

  Args:
    model: the model.
    personal_params: ``client state -> the parameters it holds`` (the params' tree, ``None`` where the server's
      are used); default the state itself.
    worst_percent: the worst clients' share reported by :func:`~fedjax_lite.algorithms.client_distribution`
      (default the worst 10%).
    lower_is_better: the metrics whose worst clients are the highest (default the loss).
    runner: the client runner.

  Returns:
    ``fn(params, client_states, round_data)``, ``client_states`` stacked ``[slots, ...]`` for the cohort of
    ``round_data`` (``ClientStateStore.gather(cohort, num_slots)``), returning ``{'global': ..., 'personalized':
    ...}``, each ``{'aggregate': example-weighted {loss, <metrics>, num_examples, num_batches}, 'per_client':
    the same per slot (padding NaN), 'distribution': client_distribution(per_client)}``.
  """
  check_model(model)
  if personal_params is not None and not callable(personal_params):
    raise TypeError(f"personal_params must be a function client state -> params, got "
                    f"{type(personal_params).__name__}.")
  client_distribution({"num_examples": jax.numpy.zeros(1), "loss": jax.numpy.zeros(1)},
                      worst_percent=worst_percent, lower_is_better=lower_is_better)  # validates the options now
  own = personal_params or (lambda state: state)

  def per_client(params, slot, rng):
    data = slot["data"]
    sums = {"global": client_metric_sums(model, params, data),
            "personalized": client_metric_sums(model, overlay_params(params, own(slot["state"])), data)}
    return sums, sums

  @jax.jit
  def evaluate(params: PyTree, client_states: PyTree, round_data: PyTree) -> dict:
    slots = jax.tree.leaves(round_data)[0].shape[0]
    for leaf in jax.tree.leaves(client_states):
      if leaf.shape[:1] != (slots,):
        raise ValueError(f"client_states must stack one state per slot of round_data ({slots} slots), got a leaf "
                         f"of shape {list(leaf.shape)} (ClientStateStore.gather(cohort, num_slots)).")
    data = {"num_examples": round_data["num_examples"], "data": round_data, "state": client_states}
    totals, per_client_sums = run_clients(per_client, params, data, jax.random.key(0), runner=runner)
    out = {}
    for name in ("global", "personalized"):
      per_slot = finalize_metric_sums(per_client_sums[name])
      out[name] = {"aggregate": finalize_metric_sums(totals[name]), "per_client": per_slot,
                   "distribution": client_distribution(per_slot, worst_percent=worst_percent,
                                                       lower_is_better=lower_is_better)}
    return out

  return evaluate
