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
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from fedjax_lite.aggregators.base import Aggregator
from fedjax_lite.aggregators.mean import mean, unweighted_mean
from fedjax_lite.aggregators.sparsification import Compressor
from fedjax_lite.algorithms.example_dp import ExampleDp, check_example_dp
from fedjax_lite.algorithms.local_training import train_locally, zero_metric_sums
from fedjax_lite.algorithms.optimizers import OptimizerFactory, ScheduledOptimizer, scheduled_optimizer
from fedjax_lite.algorithms.template import (
    Broadcast,
    ClientWork,
    ServerState,
    build_round,
    check_optimizer,
    model_distributor,
    optimizer_finalizer,
    partition_upload,
)
from fedjax_lite.core import validation
from fedjax_lite.core.param_partition import (
    FROZEN,
    GLOBAL,
    LOCAL,
    LabelSpec,
    label_params,
    partition_optimizer,
)
from fedjax_lite.core.model import Model
from fedjax_lite.core.process import Process
from fedjax_lite.core.records import ClientOutput
from fedjax_lite.core.runner import Runner
from fedjax_lite.core.tree import PyTree

WEIGHTINGS = ("num_examples", "uniform")
GradientCorrection = Callable[[Broadcast, PyTree], optax.GradientTransformation]
LocalPhase = tuple[str | tuple[str, ...], int]  # (the label(s) trained, passes over the client's data)

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
    labels: LabelSpec | None = None,
    local_phases: Sequence[LocalPhase] | None = None,
    example_dp: ExampleDp | None = None,
) -> ClientWork:
  """FedAvg's client work: local steps from the broadcast params, upload ``delta = params - final_params``.

  With ``labels`` (a round built with ``build_round(labels=labels, local_state=True)``: ``broadcast.params`` is
  the client's full model, its local parameters merged in), the local optimizer is optax's own partitioning
  (:func:`fedjax_lite.core.partition_optimizer`: frozen parameters get a zero update), the upload is the global
  part of the delta and the new client state the local part of the final params
  (:func:`~fedjax_lite.algorithms.template.partition_upload`).

  The local optimizer is ``optimizer.for_round(broadcast.hparams, correction)``: build the round with
  ``build_round(..., client_optimizer=optimizer)``, which broadcasts the round's hyperparameters (a scheduled
  learning rate); without them this raises. ``gradient_correction(broadcast, client_state)``, when given, returns
  an optax transformation chained BEFORE the client optimizer, i.e. applied to every local gradient (FedProx's
  proximal term).

  ``local_phases`` (with ``labels``) trains the parts in turn: ``((labels trained, passes), ...)``, each phase
  ``passes`` passes over the client's data training only the parameters whose label is listed (the others get
  optax's zero update), each pass from a fresh optimizer state, each phase from where the previous one ended
  (FedRep: ``(('local', 10), ('global', 1))``, the head and then the body). The client's metrics and weight are
  its LAST phase's sums (the phase that trains what is uploaded, in FedRep); phase ``i``, pass ``j`` trains with
  ``fold_in(fold_in(rng, i), j)``. ``example_dp`` makes every local step a DP-SGD step
  (:mod:`fedjax_lite.algorithms.example_dp`).
  """
  check_model(model)
  validation.check_choice("weighting", weighting, WEIGHTINGS)
  local_phases = check_local_phases(local_phases, labels)
  check_example_dp(example_dp, model)

  def work(broadcast: Broadcast, client_data: PyTree, client_state: PyTree, rng: jax.Array) -> ClientOutput:
    corrections = () if gradient_correction is None else (gradient_correction(broadcast, client_state),)
    local_optimizer = optimizer.for_round(broadcast.hparams, *corrections)
    label_tree = None
    if labels is not None:
      check_full_model(broadcast.params)
      label_tree = label_params(broadcast.params, labels)
      if FROZEN in jax.tree.leaves(label_tree):
        local_optimizer = partition_optimizer(label_tree, local_optimizer)
    if local_phases is None:
      final_params, metric_sums = train_locally(model, local_optimizer, broadcast.params, client_data, rng,
                                                example_dp=example_dp)
    else:
      final_params, metric_sums = train_in_phases(model, optimizer.for_round(broadcast.hparams, *corrections),
                                                  label_tree, local_phases, broadcast.params, client_data, rng,
                                                  example_dp=example_dp)
    weight = client_weight(weighting, metric_sums)
    if label_tree is None:
      delta = jax.tree.map(jnp.subtract, broadcast.params, final_params)
      return ClientOutput(update=delta, weight=weight, metrics=metric_sums)
    delta, local = partition_upload(label_tree, broadcast.params, final_params)
    new_state = local if LOCAL in jax.tree.leaves(label_tree) else client_state
    return ClientOutput(update=delta, weight=weight, metrics=metric_sums, new_state=new_state)

  return work


def resolve_server_optimizer(server_optimizer: optax.GradientTransformation | None,
                             server_midpoint_fraction: float | None) -> optax.GradientTransformation:
  """The server optimizer of the FedAvg family: default ``optax.sgd(1.0)``, its step scaled by
  ``server_midpoint_fraction`` when given (``optax.scale`` chained after it)."""
  server_optimizer = optax.sgd(1.0) if server_optimizer is None else server_optimizer
  check_optimizer("server_optimizer", server_optimizer)
  validation.check_float("server_midpoint_fraction", server_midpoint_fraction, low=0.0, high=1.0,
                         low_inclusive=False, allow_none=True)
  if server_midpoint_fraction is not None:
    server_optimizer = optax.chain(server_optimizer, optax.scale(server_midpoint_fraction))
  return server_optimizer


def check_local_phases(local_phases: Sequence[LocalPhase] | None, labels: LabelSpec | None
                       ) -> tuple[tuple[frozenset[str], int], ...] | None:
  """``local_phases`` validated: a non-empty sequence of ``(label or labels among 'global'/'local', passes >=
  1)``; needs ``labels``."""
  if local_phases is None:
    return None
  if labels is None:
    raise ValueError("local_phases trains the labelled parts in turn: it needs labels= as well.")
  if isinstance(local_phases, (str, bytes)) or not isinstance(local_phases, Sequence) or not local_phases:
    raise ValueError(f"local_phases must be a non-empty sequence of (label(s) trained, passes), e.g. "
                     f"(('local', 10), ('global', 1)), got {local_phases!r}.")
  checked = []
  for phase in local_phases:
    if not (isinstance(phase, tuple) and len(phase) == 2):
      raise ValueError(f"each local phase must be (label(s) trained, passes), got {phase!r}.")
    trained = (phase[0],) if isinstance(phase[0], str) else tuple(phase[0])
    if not trained or any(label not in (GLOBAL, LOCAL) for label in trained):
      raise ValueError(f"a local phase trains 'global' and/or 'local' parameters, got {phase[0]!r}.")
    validation.check_int("passes of a local phase", phase[1], minimum=1)
    checked.append((frozenset(trained), int(phase[1])))
  return tuple(checked)


def train_in_phases(model: Model, optimizer: optax.GradientTransformation, labels: PyTree,
                    phases: tuple[tuple[frozenset[str], int], ...], params: PyTree, client_data: PyTree,
                    rng: jax.Array, example_dp: ExampleDp | None = None) -> tuple[PyTree, dict[str, jax.Array]]:
  """``(final params, the last phase's metric sums)``: each phase trains only its labels (optax's partitioning:
  the others get a zero update) for its passes over the client's data, a fresh optimizer state per pass."""
  metric_sums = None
  for index, (trained, passes) in enumerate(phases):
    phase_labels = jax.tree.map(lambda label: GLOBAL if label in trained else FROZEN, labels)
    phase_optimizer = partition_optimizer(phase_labels, optimizer)
    phase_key = jax.random.fold_in(rng, index)

    def one_pass(step, carry, phase_optimizer=phase_optimizer, phase_key=phase_key):
      params, sums = carry
      params, pass_sums = train_locally(model, phase_optimizer, params, client_data,
                                        jax.random.fold_in(phase_key, step), example_dp=example_dp)
      return params, jax.tree.map(jnp.add, sums, pass_sums)

    params, metric_sums = jax.lax.fori_loop(0, passes, one_pass, (params, zero_metric_sums(model)))
  return params, metric_sums


def check_full_model(params: PyTree) -> None:
  """The client received every parameter (none ``None``), else a ``ValueError``: local parameters reach a
  client's work only when the round keeps them as client state (``local_state=True``)."""
  if any(leaf is None for leaf in jax.tree.leaves(params, is_leaf=lambda x: x is None)):
    raise ValueError("the broadcast params hold None where 'local' parameters belong: this client work trains "
                     "the full model, so the round must keep the local parameters as client state "
                     "(fed_avg(..., labels=..., local_state=True), or build_round(..., local_state=True)).")


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
    upload_compressor: Compressor | None = None,
    example_dp: ExampleDp | None = None,
    runner: Runner | None = None,
    labels: LabelSpec | None = None,
    local_state: bool = False,
    local_phases: Sequence[LocalPhase] | None = None,
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
    upload_compressor: optional :class:`~fedjax_lite.aggregators.Compressor` of each client's delta, applied at
      the end of the client work (e.g. ``aggregators.top_k_compressor(fraction=0.01, error_feedback=True)``);
      ``aggregator`` then sums the decoded messages and ``aggregated_bits`` counts the encoded ones. With the
      compressor's ``error_feedback`` each client keeps its residual in the client states: ``next`` then takes
      and returns ``client_states`` (``process.client_state(params)`` is one client's zeros), as SCAFFOLD's does
      (:mod:`fedjax_lite.algorithms.compressed_uploads`). With ``labels`` only the global part of the delta is
      compressed and the residual covers it alone; with ``local_state`` too, each client's state is
      ``ErrorFeedbackState(state=<its local parameters>, residual)``. A shared mask
      (``aggregators.shared_random_k_compressor``) lets ``aggregator`` see the ``k`` values only (e.g. a
      ``secure_sum``).
    example_dp: optional :class:`~fedjax_lite.algorithms.ExampleDp` (per-example clip and noise multiplier):
      every local step is a DP-SGD step, an example-level guarantee accounted by
      :func:`fedjax_lite.privacy.example_level_epsilon`; it composes with a DP ``aggregator`` (user level).
    runner: the client runner (default: per-backend strategy).
    labels: optional parameter partition (:mod:`fedjax_lite.core.param_partition`): only ``'global'``
      parameters are broadcast, uploaded, aggregated and counted in the bits; ``'frozen'`` ones are never
      trained (optax's partitioning); ``'local'`` ones need ``local_state=True``. FedPer and FedBN are this.
    local_state: with ``labels``: the ``'local'`` parameters are kept per client (the client-state store; ``next``
      then takes and returns ``client_states``, the local parameters of the cohort).
    local_phases: with ``labels``: the parts trained in turn, ``((label(s), passes), ...)`` (FedRep; see
      :func:`local_training_work`).
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
  server_optimizer = resolve_server_optimizer(server_optimizer, server_midpoint_fraction)
  validation.check_choice("weighting", weighting, WEIGHTINGS)
  if gradient_correction is not None and not callable(gradient_correction):
    raise TypeError(f"gradient_correction must be a function (broadcast, client_state) -> optax "
                    f"GradientTransformation, got {type(gradient_correction).__name__}.")
  if client_work_wrapper is not None and not callable(client_work_wrapper):
    raise TypeError(f"client_work_wrapper must be a function client_work -> client_work, got "
                    f"{type(client_work_wrapper).__name__}.")
  work = local_training_work(model, optimizer, weighting=weighting, gradient_correction=gradient_correction,
                             labels=labels, local_phases=local_phases, example_dp=example_dp)
  if client_work_wrapper is not None:
    work = client_work_wrapper(work)
  aggregator = resolve_aggregator(aggregator, weighted=weighting == "num_examples")
  return build_round(
      work,                                                                                                   # 2.
      distributor=model_distributor(),                                                                       # 1.
      client_optimizer=optimizer,                                                                            #    rate
      aggregator=aggregator,                                                                                  # 3.
      finalizer=optimizer_finalizer(server_optimizer),                                                       # 4.
      broadcast_encoder=broadcast_encoder,
      runner=runner,
      labels=labels,
      local_state=local_state,
      upload_compressor=upload_compressor,                                                                   # 2.-3.
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


def fed_avg_arguments(builder: str, options: Mapping[str, Any], *, takes: tuple[str, ...]) -> dict[str, Any]:
  """The options of :func:`fed_avg` that ``builder`` takes (``takes``), from ``options`` with fed_avg's defaults
  filled in: for a builder that composes its own round from the family's options (FedNova, q-FFL) rather than
  calling :func:`fed_avg`. Any other name -- an option of fed_avg that ``builder`` sets itself or does not support,
  or an unknown one -- is a ``TypeError`` listing what ``builder`` takes, so an option added to fed_avg later is
  refused by such a builder until it handles it (never silently ignored)."""
  assert set(takes) <= set(FED_AVG_OPTIONS), sorted(set(takes) - set(FED_AVG_OPTIONS))
  unknown = sorted(set(options) - set(takes))
  if unknown:
    raise TypeError(f"{builder}() got unexpected keyword argument(s) {unknown}; besides its own arguments it takes "
                    f"fedjax_lite.algorithms.fed_avg's options {list(takes)}.")
  defaults = {name: parameter.default for name, parameter in inspect.signature(fed_avg).parameters.items()
              if name in takes}
  return {**defaults, **options}
