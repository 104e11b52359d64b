"""The round template: an algorithm is its four parts, composed by :func:`build_round`.

A round of every algorithm in this library has the reference's four parts (TFF ``tff.learning.templates``), and
:func:`build_round` keeps them visible:

1. **distributor** -- ``distributor(server_state) -> Broadcast(params, hparams, extra)``: what the server sends to
   every client: the model, the round's hyperparameters and any extra server values (SCAFFOLD's server control
   variate, Mime's optimizer state). A client optimizer whose learning rate is scheduled by round
   (:class:`~fedjax_lite.algorithms.ScheduledOptimizer`) is given to ``build_round(client_optimizer=...)``, which
   adds its round hyperparameters to every broadcast; the client work takes ``optimizer.for_round(
   broadcast.hparams, *corrections)``, which refuses a broadcast without them.
2. **client work** -- ``client_work(broadcast, client_data, client_state, rng) -> ClientOutput(update, weight,
   metrics, new_state)`` for ONE client. The runner maps it over the round's client slots (one scan per core on
   CPU, ``vmap`` on accelerators, chunks, or a device mesh: :mod:`fedjax_lite.core.runner`). A :class:`Prepass`
   runs a first client work over the cohort whose aggregate the client work then sees (``broadcast.prepass``).
3. **aggregator** -- one :class:`~fedjax_lite.aggregators.Aggregator`, or a dict of them, one per key of the
   clients' ``update`` (e.g. the model delta and a second quantity), each with the client's ``weight`` (or its own
   entry of a dict of weights). A sum-based aggregator is streamed: each client's contribution is added to a
   running sum as it is produced, so memory grows with the clients in flight, not the cohort; any other (median,
   trimmed mean, Krum) receives the stacked values.
4. **finalizer** -- ``Finalizer(init, apply)``: the server update, ``apply(finalizer_state, params, aggregate) ->
   FinalizerOutput(state, params, measurements)``; :func:`optimizer_finalizer` applies an optax transformation.
   Its state is ``ServerState.finalizer_state``, a typed record of the algorithm.

Rules the template enforces for every algorithm, so a user's own parts cannot get them wrong:

* padding slots (``num_examples == 0``) have weight 0 and add nothing, whatever the client work returns, and never
  write client state;
* a client whose update, new state, loss or metrics hold any NaN/Inf is rejected (zeros, weight 0, metrics reset,
  its state left as it was) and counted in ``client_work/num_non_finite_clients`` (TFF's client rule, extended to
  the loss). Weight 0 removes it from a weighted mean; the unweighted mean counts real slots, not weights, so under
  uniform weighting a rejected client still counts in the denominator, exactly as TFF's ``UnweightedMeanFactory``
  does;
* a non-finite aggregate, or a non-finite result of the finalizer, leaves the params and the finalizer state
  unchanged, and ``finalizer/update_non_finite`` is 1 (TFF's ``reject_non_finite_update``, for every finalizer:
  :func:`reject_non_finite_update`);
* metrics are grouped ``{'distributor', 'client_work', 'aggregator', 'finalizer', 'broadcasted_bits',
  'aggregated_bits'}``; client metrics are sums finalized once on the server (example-weighted over the cohort).

``next(state, round_data, rng, client_states=None)`` always returns ONE record,
:class:`~fedjax_lite.core.RoundOutput` ``(state, metrics, client_states)``. Algorithms with per-client state pass
``client_state=`` (one client's initial state from the params): their ``next`` then takes the cohort's states
(stacked ``[client slots, ...]``, gathered from a :class:`fedjax_lite.core.ClientStateStore`) as its own
argument ``client_states``, hands client slot ``k`` its row as ``client_state``, and returns the new states in
``RoundOutput.client_states`` (None for stateless algorithms). ``process.parts`` (:class:`RoundParts`) are the
four parts as separate functions, for drivers that run them apart (client work and server update in different
steps, as asynchronous algorithms do). ``build_round(upload_compressor=...)`` compresses each client's update at
the end of its client work; with error feedback the residual is one more client state, held beside the round's
own in ONE record (:mod:`fedjax_lite.algorithms.compressed_uploads`).

Partitioned rounds (``build_round(labels=...)``, :mod:`fedjax_lite.core.param_partition`): each parameter is
``'global'``, ``'local'`` or ``'frozen'``, and only the global ones travel. The server keeps the whole model in
``ServerState.params`` (its local positions hold the initial local values, a new client's starting point, never
changed by the server); the finalizer sees, steps and keeps state for the global part only (the params' tree with
``None`` elsewhere, :func:`~fedjax_lite.core.split_params`); the broadcast holds the global and frozen parameters
(local ``None``) and the broadcast encoder, the aggregators' templates (so compression and DP noise), the exact
bit counts cover only the global ones -- frozen ones are the copy every client already holds (a pretrained base),
never sent per round. With ``local_state=True`` the local parameters are the clients' state (the client-state
store): client slot ``k`` receives ``broadcast.params`` with its own local parameters merged in (the full model),
and ``client_state`` = its local part; its work returns ``update`` over the global part and ``new_state`` = its new
local part (:func:`partition_upload`). Without it, local positions of ``broadcast.params`` are ``None`` and the
client work makes them itself (reconstruction).

Randomness: the round key is split into ``(train, aggregator)``; client slot ``k`` trains with
``fold_in(train, k)``; a single aggregator uses the aggregator key as its own ``next`` would, several use
``fold_in(aggregator_key, i)`` in sorted key order. With a pre-pass, the round key is split first into the
pre-pass's key and the main stage's. A broadcast encoder uses ``fold_in(round key, BROADCAST_STREAM)``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from fedjax_lite.aggregators.base import STACK, SUM, AggregationContext, Aggregator, as_template, client_upload_bits, split_rng
from fedjax_lite.aggregators.sparsification import Compressor
from fedjax_lite.algorithms.compressed_uploads import compress_uploads
from fedjax_lite.algorithms.optimizers import ScheduledOptimizer
from fedjax_lite.core.model import finalize_metric_sums
from fedjax_lite.core.param_partition import (
    FROZEN,
    GLOBAL,
    LOCAL,
    LabelSpec,
    label_params,
    overlay_params,
    select_params,
)
from fedjax_lite.core.process import MeasuredOutput, Process, RoundOutput
from fedjax_lite.core.records import ClientOutput
from fedjax_lite.core.round_data import check_round_data
from fedjax_lite.core.runner import Runner, client_mask, num_client_slots, run_clients
from fedjax_lite.core.tree import PyTree, tree_all_finite, tree_select, tree_size_bits

BROADCAST_STREAM = 0xB40AD  # the broadcast encoder's key is fold_in(round key, BROADCAST_STREAM)


class Broadcast(NamedTuple):
  """What the server sends every client of a round.

  Attributes:
    params: the model parameters as the clients receive them (decoded, when a broadcast encoder compresses them).
    hparams: the round's client hyperparameters, e.g. ``{'learning_rate': lr}`` (reported in the
      ``client_work`` metrics).
    extra: the algorithm's other server values (SCAFFOLD's control variate, Mime's optimizer state, ...).
    prepass: in a round with a :class:`Prepass`, the pre-pass's aggregate over the cohort (Mime's mean full
      gradient), which the client work then sees; ``()`` otherwise.
    aggregator: what the round's aggregator(s) broadcast to every client (``aggregator.broadcast(state)``, a dict
      by key with a dict of aggregators: a clipping norm, a shared sparsification mask's round), as their client
      parts receive it. The template sets it for the client work of :func:`client_work_and_aggregate` (``()``
      elsewhere: a driver that runs the client work apart, and the distributor's own broadcast); its bits are
      the aggregators' broadcast, counted once.
  """

  params: PyTree
  hparams: PyTree = ()
  extra: PyTree = ()
  prepass: PyTree = ()
  aggregator: PyTree = ()


@flax.struct.dataclass
class ServerState:
  """The server's state between rounds (an immutable pytree; use ``.replace(...)``).

  Attributes:
    params: the global model parameters.
    finalizer_state: the finalizer's state, a typed record of the algorithm: the server optimizer's optax state
      (:func:`optimizer_finalizer`: FedAvg, FedSGD, FedProx, FedOpt), or a record with named fields
      (``scaffold.ScaffoldServerState(server_optimizer, control_variate)``,
      ``mime.MimeServerState(server_optimizer, base_optimizer)``, ``fed_kmeans.KMeansServerState(weights)``).
    aggregator_state: the aggregator's state (e.g. its quantile estimates); a dict when the round has several.
    round_num: int32 count of completed rounds; schedules read it.
  """

  params: PyTree
  finalizer_state: PyTree
  aggregator_state: PyTree
  round_num: jax.Array


Distributor = Callable[[ServerState], Broadcast]
ClientWork = Callable[[Broadcast, PyTree, PyTree, jax.Array], ClientOutput]


class Prepass(NamedTuple):
  """A first pass over the round's cohort whose aggregate the client work then sees (a two-stage round).

  Every client runs ``client_work`` on the round's broadcast; its uploads are aggregated by ``aggregator`` (a dict
  whose keys differ from the round's own aggregators'); the aggregate reaches every client of the second stage as
  ``broadcast.prepass`` (and counts in ``broadcasted_bits``), and the finalizer receives both stages' aggregates in
  one dict. Mime's full gradients at the server model are such a pre-pass (:func:`fedjax_lite.algorithms.mime`).
  The pre-pass reads the clients' states but does not change them (only the main client work does); a client it
  rejects as non-finite has weight 0 in its aggregate and still runs the second stage.

  Attributes:
    client_work: ``(broadcast, client_data, client_state, rng) -> ClientOutput`` for ONE client.
    aggregator: ``{key: Aggregator}`` of the pre-pass uploads ``update[key]``.
    update_template: ``params -> ONE client's pre-pass update``; default every key shaped like the params.
    name: the pre-pass's client metrics appear as ``metrics['client_work'][name]``.
  """

  client_work: ClientWork
  aggregator: Mapping[str, Aggregator]
  update_template: Callable[[PyTree], PyTree] | None = None
  name: str = "prepass"


class FinalizerOutput(NamedTuple):
  """What ``Finalizer.apply(state, params, aggregate)`` returns, in the order of its arguments.

  Attributes:
    state: the finalizer's new state (same structure, shapes and dtypes as before).
    params: the new server parameters (same structure, shapes and dtypes as before).
    measurements: a dict of scalars reported as ``metrics['finalizer']`` (None: none); the template adds
      ``update_non_finite``.
  """

  state: PyTree
  params: PyTree
  measurements: dict | None = None


class Finalizer(NamedTuple):
  """The server update (part 4 of a round).

  Attributes:
    init: ``init(params) -> state``: the finalizer's initial state (``ServerState.finalizer_state``), a typed
      record of the algorithm (e.g. ``ScaffoldServerState``) or an optax state.
    apply: ``apply(state, params, aggregate) -> FinalizerOutput(state, params, measurements)``. The round template
      keeps both unchanged when the aggregate or what ``apply`` computed is non-finite
      (:func:`reject_non_finite_update`), so ``apply`` needs no check of its own.
  """

  init: Callable[[PyTree], PyTree]
  apply: Callable[[PyTree, PyTree, PyTree], FinalizerOutput]


def model_distributor(client_hparams: Callable[[jax.Array], PyTree] | None = None,
                      extra: Callable[[ServerState], PyTree] | None = None) -> Distributor:
  """The usual distributor: the server params, ``client_hparams(round_num)`` and ``extra(state)``."""

  def distribute(state: ServerState) -> Broadcast:
    return Broadcast(params=state.params,
                     hparams={} if client_hparams is None else client_hparams(state.round_num),
                     extra=() if extra is None else extra(state))

  return distribute


def _all_finite(tree: PyTree) -> jax.Array:
  """True iff every floating-point leaf of ``tree`` is finite (integer, boolean and key leaves are not checked)."""
  return tree_all_finite([leaf for leaf in jax.tree.leaves(tree)
                          if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)])


def reject_non_finite_update(aggregate: PyTree, updated: PyTree, current: PyTree) -> tuple[PyTree, dict]:
  """The server's non-finite rule (TFF's ``reject_non_finite_update``), which :func:`build_round` applies to
  EVERY finalizer: ``updated`` (the new params and finalizer state) when the aggregate and ``updated`` are all
  finite, else ``current`` unchanged.

  Returns ``(kept, {'update_non_finite': int32 0 or 1})``: 1 when the aggregate -- or what the finalizer computed
  from it -- holds a NaN or Inf, so a NaN never reaches the model or the server optimizer's state. Use it in a
  round written by hand; rounds built by :func:`build_round` get it whatever their finalizer does.
  """
  finite = _all_finite((aggregate, updated))
  return (tree_select(finite, updated, current),
          {"update_non_finite": jnp.where(finite, 0, 1).astype(jnp.int32)})


def apply_optimizer_rejecting_non_finite(
    server_optimizer: optax.GradientTransformation, opt_state: PyTree, params: PyTree, aggregate: PyTree
) -> tuple[PyTree, PyTree, dict[str, jax.Array]]:
  """``params + server_optimizer(aggregate)`` under :func:`reject_non_finite_update`: a non-finite aggregate
  (or step) keeps params AND optimizer state; returns ``(params, opt_state, {'update_non_finite'})``.

  The aggregate plays the role of a gradient (FedAvg's averaged pseudo-gradient, FedSGD's averaged gradient). For
  rounds written by hand; :func:`optimizer_finalizer` in a :func:`build_round` round gets the rule from the
  template.
  """
  updates, stepped_state = server_optimizer.update(aggregate, opt_state, params)
  stepped = optax.apply_updates(params, updates)
  (params, opt_state), measurements = reject_non_finite_update(aggregate, (stepped, stepped_state),
                                                               (params, opt_state))
  return params, opt_state, measurements


def optimizer_finalizer(server_optimizer: optax.GradientTransformation) -> Finalizer:
  """The finalizer of FedAvg and its adaptive variants: ``params <- params + server_optimizer(aggregate)``.

  With ``optax.sgd(1.0)`` and the weighted mean of the clients' deltas this is exactly the weighted average of the
  client models (McMahan et al. 2017); with Adam/Yogi/Adagrad it is Reddi et al. 2021's FedOpt. Its state is the
  server optimizer's optax state. (A non-finite aggregate leaves both unchanged: the template's rule.)
  """
  check_optimizer("server_optimizer", server_optimizer)

  def apply(opt_state, params, aggregate) -> FinalizerOutput:
    updates, opt_state = server_optimizer.update(aggregate, opt_state, params)
    return FinalizerOutput(state=opt_state, params=optax.apply_updates(params, updates))

  return Finalizer(init=server_optimizer.init, apply=apply)


def check_optimizer(name: str, optimizer: Any) -> None:
  if not isinstance(optimizer, optax.GradientTransformation):
    raise TypeError(f"{name} must be an optax GradientTransformation, got {type(optimizer).__name__}.")


def check_params(params: PyTree) -> None:
  leaves = jax.tree.leaves(params)
  if not leaves:
    raise ValueError("params must be a pytree with at least one array.")
  for leaf in leaves:
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise TypeError(f"params must hold floating-point arrays, got dtype {jnp.result_type(leaf)}.")


def reject_non_finite(output: ClientOutput, client_state: PyTree) -> ClientOutput:
  """TFF's client rule, extended to everything a client reports: a client whose update, new state, loss or
  metrics hold any NaN/Inf is rejected -- its update becomes zeros with weight 0, its metrics are reset and its
  state stays ``client_state`` -- and counted: the metrics gain ``num_non_finite_clients`` (1 for a rejected
  client). A finite update with a NaN loss (e.g. a label outside the model's classes) is rejected too."""
  finite = _all_finite((output.update, output.metrics))
  if output.new_state is not None:
    finite = finite & _all_finite(output.new_state)
  zeros = jax.tree.map(jnp.zeros_like, output.update)
  metrics = tree_select(finite, output.metrics, jax.tree.map(jnp.zeros_like, output.metrics))
  metrics = dict(metrics, num_non_finite_clients=jnp.where(finite, 0, 1).astype(jnp.int32))
  new_state = output.new_state
  if new_state is not None:
    new_state = tree_select(finite, new_state, client_state)
  return ClientOutput(update=tree_select(finite, output.update, zeros),
                      weight=jax.tree.map(lambda w: jnp.where(finite, jnp.asarray(w, jnp.float32), 0.0),
                                          output.weight),
                      metrics=metrics, new_state=new_state)


SINGLE = "__single__"  # the key of a round's only aggregator, when it is not given as a dict


def _named(aggregator: Aggregator | Mapping[str, Aggregator]) -> dict[str, Aggregator]:
  """The round's aggregators as a dict; a single aggregator is under the key :data:`SINGLE`."""
  if isinstance(aggregator, Aggregator):
    return {SINGLE: aggregator}
  if isinstance(aggregator, Mapping) and aggregator:
    for name, value in aggregator.items():
      if not isinstance(name, str) or name == SINGLE or not isinstance(value, Aggregator):
        raise TypeError(f"aggregator must be an Aggregator or a dict of str -> Aggregator, got an entry "
                        f"{name!r}: {type(value).__name__}.")
    return {name: aggregator[name] for name in sorted(aggregator)}
  raise TypeError(f"aggregator must be an Aggregator or a non-empty dict of str -> Aggregator, got "
                  f"{type(aggregator).__name__}.")


def _pick(tree: PyTree, name: str) -> PyTree:
  return tree if name == SINGLE else tree[name]


def _unname(named: dict) -> PyTree:
  return named[SINGLE] if SINGLE in named else named


def _aggregator_keys(aggregators: dict, rng: jax.Array) -> dict:
  if SINGLE in aggregators:
    return {SINGLE: rng}
  return {name: jax.random.fold_in(rng, i) for i, name in enumerate(aggregators)}


def weight_of(weight: Any, name: str, aggregators: dict, *, stacked: bool = False) -> jax.Array:
  """The client weight for aggregator ``name``: ``weight`` itself (one float32 scalar for every aggregator), or
  ``weight[name]`` when the client work returns one weight per key of a dict of aggregators (``stacked``: weights
  with a leading client axis)."""
  if isinstance(weight, Mapping):
    if SINGLE in aggregators or set(weight) != set(aggregators):
      raise ValueError(f"ClientOutput.weight is a dict with keys {sorted(weight)}: a per-key weight needs a dict "
                       f"of aggregators with the same keys, got "
                       f"{'one aggregator' if SINGLE in aggregators else sorted(aggregators)}.")
    weight = weight[name]
  if jnp.ndim(weight) != (1 if stacked else 0):
    raise ValueError(f"ClientOutput.weight must be a float scalar per client (or a dict of them, one per "
                     f"aggregator key), got shape {list(jnp.shape(weight))}.")
  return weight


def check_update(update: PyTree, template: PyTree) -> None:
  """``update`` has ``template``'s tree structure, shapes and dtypes (at trace time), else a ``ValueError``."""
  expected, actual = as_template(template), as_template(update)
  if jax.tree.structure(expected) != jax.tree.structure(actual):
    raise ValueError(f"client_work's update has tree {jax.tree.structure(actual)}, but the aggregator was "
                     f"initialized for {jax.tree.structure(expected)} (pass update_template= to build_round when "
                     "the update is not shaped like the model).")
  for path, want, got in zip(jax.tree_util.tree_flatten_with_path(expected)[0], jax.tree.leaves(expected),
                             jax.tree.leaves(actual)):
    if want.shape != got.shape or want.dtype != got.dtype:
      raise ValueError(f"client_work's update leaf {jax.tree_util.keystr(path[0])} is {got.dtype}{list(got.shape)}, "
                       f"but the aggregator was initialized for {want.dtype}{list(want.shape)}.")


class CohortWork(NamedTuple):
  """Parts 2 and 3 of a round over a cohort (:func:`client_work_and_aggregate`).

  Attributes:
    aggregate: the aggregator's ``MeasuredOutput(state, result, measurements)`` (its fields dicts keyed like the
      aggregators when they are a dict).
    metrics: the client metrics ``{'train': finalized sums, 'num_non_finite_clients'}``.
    client_states: the cohort's new client states stacked ``[client slots, ...]`` (padding and rejected slots
      hand back the state they were given), or None when no client states were passed.
    broadcast: the broadcast as the client work received it (with a pre-pass: its aggregate included).
  """

  aggregate: MeasuredOutput
  metrics: dict
  client_states: PyTree = None
  broadcast: Broadcast | None = None


def check_client_states(client_states: PyTree, round_data: PyTree) -> None:
  """Every leaf of ``client_states`` has the round's client axis first (at trace time), else a ``ValueError``."""
  num_slots = num_client_slots(round_data)
  for path, leaf in jax.tree_util.tree_flatten_with_path(client_states)[0]:
    shape = jnp.shape(leaf)
    if not shape or shape[0] != num_slots:
      raise ValueError(f"client_states{jax.tree_util.keystr(path)} has shape {list(shape)}, but the round has "
                       f"{num_slots} client slots: client_states must stack one state per slot of round_data "
                       "(e.g. ClientStateStore.gather(cohort, num_slots)).")


def client_work_and_aggregate(
    client_work: ClientWork,
    aggregator: Aggregator | Mapping[str, Aggregator],
    aggregator_state: PyTree,
    broadcast: Broadcast,
    round_data: PyTree,
    rng: jax.Array,
    runner: Runner | None,
    update_template: PyTree | None = None,
    client_states: PyTree | None = None,
) -> CohortWork:
  """Parts 2 and 3 of a round: every client's work, then the aggregation.

  ``update_template`` (shape structs of ONE client's update, what the aggregators were initialized with), when
  given, is checked against what the client work returns: a different tree, shape or dtype is a ``ValueError``
  naming both, instead of an aggregator silently summing the wrong thing. ``client_states`` (stacked
  ``[client slots, ...]``), when given, hands client slot ``k`` its row as ``client_state`` and collects the new
  states; without it every client gets ``client_state=None``.

  Returns a :class:`CohortWork` ``(aggregate, metrics, client_states)``.
  """
  # Structure checks at trace time (once per shape): a clear error naming the input instead of a shape error deep
  # inside the runner.
  slots = _slots(round_data, client_states)
  stateful = client_states is not None
  aggregators = _named(aggregator)
  states = {name: _pick(aggregator_state, name) for name in aggregators}
  train_key, aggregator_key = jax.random.split(rng)
  keys = _aggregator_keys(aggregators, aggregator_key)
  split_keys = {name: split_rng(keys[name]) for name in aggregators}
  streamed = [name for name, agg in aggregators.items() if agg.combine == SUM]
  stacked = [name for name, agg in aggregators.items() if agg.combine == STACK]
  aggregator_params = {name: aggregators[name].broadcast(states[name]) for name in aggregators}
  update_templates = {}  # ONE client's update per aggregator, recorded while tracing (static shapes)

  def per_client(server_values, slot, client_keys):
    broadcast, aggregator_params = server_values
    received = broadcast._replace(aggregator=_unname(aggregator_params))  # what the aggregators broadcast, too
    output = one_client(client_work, received, slot, client_keys["train"], update_template)
    is_real = slot["num_examples"] > 0
    weight = output.weight
    contributions = {}
    for name, agg in aggregators.items():
      update = _pick(output.update, name)
      update_templates[name] = as_template(update)
      contributions[name] = agg.client(aggregator_params[name], update, weight_of(weight, name, aggregators),
                                       client_keys["aggregators"][name])
    # Sums: the runner drops padding slots' summands. Stacks: padding contributions are zeroed here.
    collected = {"stacked": {name: jax.tree.map(lambda c: jnp.where(is_real, c, jnp.zeros((), c.dtype)),
                                                contributions[name]) for name in stacked},
                 "state": output.new_state if stateful else None}
    return ({name: contributions[name] for name in streamed}, output.metrics), collected

  client_keys = {"train": train_key, "aggregators": {name: split_keys[name][0] for name in aggregators}}
  (totals, metric_sums), collected = run_clients(
      per_client, (broadcast, aggregator_params), slots, client_keys, runner=runner)
  num_slots = num_client_slots(round_data)
  outputs = {}
  for name, agg in aggregators.items():
    combined = totals[name] if agg.combine == SUM else collected["stacked"][name]
    context = AggregationContext(value_template=update_templates[name], num_client_slots=num_slots)
    outputs[name] = agg.server(states[name], combined, split_keys[name][1], context)
  aggregate = MeasuredOutput(state=_unname({n: o.state for n, o in outputs.items()}),
                             result=_unname({n: o.result for n, o in outputs.items()}),
                             measurements=_unname({n: o.measurements for n, o in outputs.items()}))
  metric_sums = dict(metric_sums)
  non_finite = metric_sums.pop("num_non_finite_clients")
  return CohortWork(aggregate=aggregate,
                    metrics={"train": finalize_metric_sums(metric_sums), "num_non_finite_clients": non_finite},
                    client_states=collected["state"], broadcast=broadcast)


def one_client(client_work: ClientWork, broadcast: Broadcast, slot: dict, rng: jax.Array,
               update_template: PyTree | None) -> ClientOutput:
  """ONE client's work with the template's client rules: the output type and update shapes checked, a non-finite
  client rejected (:func:`reject_non_finite`), a padding slot's weight 0 whatever the work returned."""
  client_data, client_state = slot["data"], slot["state"]
  output = client_work(broadcast, client_data, client_state, rng)
  if not isinstance(output, ClientOutput):
    raise TypeError(f"client_work must return a ClientOutput(update, weight, metrics, new_state), got "
                    f"{type(output).__name__}.")
  if update_template is not None:
    check_update(output.update, update_template)
  if client_state is not None and as_template(output.new_state) != as_template(client_state):
    raise ValueError(f"client_work of an algorithm with per-client state must return ClientOutput(..., new_state=...) "
                     f"shaped like its client_state {as_template(client_state)}, got {as_template(output.new_state)} "
                     "(return client_state itself when the round does not change it).")
  output = reject_non_finite(output, client_state)
  is_real = slot["num_examples"] > 0
  return output._replace(weight=jax.tree.map(lambda w: jnp.where(is_real, w, 0.0), output.weight))  # padding: 0


def _slots(round_data: PyTree, client_states: PyTree) -> dict:
  """What the runner maps over the client axis: the data and the states (its masking reads ``num_examples``)."""
  check_round_data(round_data)
  if client_states is not None:
    check_client_states(client_states, round_data)
  return {"num_examples": round_data["num_examples"], "data": round_data, "state": client_states}


def stacked_client_outputs(
    client_work: ClientWork,
    broadcast: Broadcast,
    round_data: PyTree,
    rng: jax.Array,
    runner: Runner | None,
    *,
    update_template: PyTree | None = None,
    client_states: PyTree | None = None,
) -> ClientOutput:
  """Part 2 alone: every client slot's :class:`ClientOutput`, stacked ``[client slots, ...]``, nothing aggregated.

  The client rules are those of :func:`client_work_and_aggregate` (padding weight 0, non-finite clients rejected,
  the same keys: slot ``k`` trains with ``fold_in(split(rng)[0], k)``); ``new_state`` is None without
  ``client_states``. Memory holds every client's upload: for drivers that aggregate later (asynchronous rounds).
  """
  slots = _slots(round_data, client_states)
  train_key, _ = jax.random.split(rng)

  def per_client(broadcast, slot, client_keys):
    output = one_client(client_work, broadcast, slot, client_keys["train"], update_template)
    if client_states is None:
      output = output._replace(new_state=None)
    return (), output

  _, outputs = run_clients(per_client, broadcast, slots, {"train": train_key}, runner=runner)
  return outputs


def aggregate_stacked(
    aggregator: Aggregator | Mapping[str, Aggregator],
    aggregator_state: PyTree,
    outputs: ClientOutput,
    rng: jax.Array,
    client_mask: jax.Array | None = None,
) -> MeasuredOutput:
  """Part 3 on stacked uploads: ``outputs.update`` (a leading client axis) aggregated with ``outputs.weight``.

  Each aggregator runs its own ``next`` on its values (:meth:`Aggregator.next`) with the keys
  :func:`client_work_and_aggregate` derives from ``rng``, so a cohort's stacked outputs aggregate as the streamed
  round does (up to summation order). ``client_mask`` (bool ``[rows]``) marks real clients; default every row.
  """
  aggregators = _named(aggregator)
  _, aggregator_key = jax.random.split(rng)
  keys = _aggregator_keys(aggregators, aggregator_key)
  outs = {name: agg.next(_pick(aggregator_state, name), _pick(outputs.update, name),
                         weight_of(outputs.weight, name, aggregators, stacked=True), keys[name], client_mask)
          for name, agg in aggregators.items()}
  return MeasuredOutput(state=_unname({n: o.state for n, o in outs.items()}),
                        result=_unname({n: o.result for n, o in outs.items()}),
                        measurements=_unname({n: o.measurements for n, o in outs.items()}))


@jax.tree_util.register_pytree_node_class
class BitCount:
  """An exact bit count of a round: a static number of bits per client (a Python int) times the round's traced
  int32 number of real clients.

  Only the client count is an array (the pytree's leaf), so the round stays in 32-bit JAX and the product, which
  overflows int32 for a few clients of a large model, is formed exactly on the host: ``int(bits)`` is a Python
  int, ``np.asarray(bits)`` an int64 array (also for counts stacked over rounds).
  """

  def __init__(self, num_clients: Any, bits_per_client: int):
    self.num_clients = num_clients
    self.bits_per_client = bits_per_client

  def tree_flatten(self):
    return (self.num_clients,), self.bits_per_client

  @classmethod
  def tree_unflatten(cls, bits_per_client, children):
    return cls(children[0], bits_per_client)

  def __array__(self, dtype=None, copy=None):
    total = np.asarray(np.asarray(self.num_clients, np.int64) * np.int64(self.bits_per_client))
    return total if dtype is None else total.astype(dtype)

  def __int__(self) -> int:
    return int(np.asarray(self.num_clients)) * self.bits_per_client

  __index__ = __int__

  def __float__(self) -> float:
    return float(int(self))

  def __repr__(self) -> str:
    return f"BitCount({self.bits_per_client} bits x {self.num_clients!r} clients)"


def bits_per_client(
    aggregator: Aggregator | Mapping[str, Aggregator],
    aggregator_state: PyTree,
    broadcast: Broadcast,
    update_template: PyTree,
    *,
    model_broadcast_bits: int | None = None,
) -> tuple[int, int]:
  """``(download, upload)``: the exact bits the server sends ONE client and ONE client uploads (Python ints).

  The download is the broadcast -- the model (``model_broadcast_bits`` when an encoder compresses it, else every
  leaf at its dtype's width), the hyperparameters, the extra server values, a pre-pass's aggregate -- plus each
  aggregator's broadcast (e.g. its clipping norm); the upload is each aggregator's exact payload
  (:func:`fedjax_lite.aggregators.base.client_upload_bits`). Both are static: they depend on shapes only.
  """
  aggregators = _named(aggregator)
  model_bits = (tree_size_bits(as_template(broadcast.params)) if model_broadcast_bits is None
                else int(model_broadcast_bits))
  download = (model_bits + tree_size_bits(broadcast.hparams) + tree_size_bits(broadcast.extra)
              + tree_size_bits(broadcast.prepass))
  upload = 0
  for name, agg in aggregators.items():
    download += tree_size_bits(jax.eval_shape(agg.broadcast, _pick(aggregator_state, name)))
    upload += client_upload_bits(agg, as_template(_pick(update_template, name)))
  return download, upload


def round_bits(download: int, upload: int, round_data: PyTree) -> dict[str, BitCount]:
  """``{'broadcasted_bits', 'aggregated_bits'}``: the per-client bits times the round's real clients.

  TFF measured these logical sizes with a sizing executor (``broadcasted_bits`` and ``aggregated_bits``, removed in
  TFF 0.48); these are the same quantities computed from the payload, each a :class:`BitCount`.
  """
  num_clients = jnp.sum(client_mask(round_data), dtype=jnp.int32)
  return {"broadcasted_bits": BitCount(num_clients, int(download)),
          "aggregated_bits": BitCount(num_clients, int(upload))}


def communication_bits(
    aggregator: Aggregator | Mapping[str, Aggregator],
    aggregator_state: PyTree,
    broadcast: Broadcast,
    update_template: PyTree,
    round_data: PyTree,
    *,
    model_broadcast_bits: int | None = None,
) -> dict[str, BitCount]:
  """Exact bits sent to and received from the round's real clients: :func:`bits_per_client` times the number of
  real clients (:func:`round_bits`)."""
  download, upload = bits_per_client(aggregator, aggregator_state, broadcast, update_template,
                                     model_broadcast_bits=model_broadcast_bits)
  return round_bits(download, upload, round_data)


def place_on_mesh(state: PyTree, runner: Runner | None) -> PyTree:
  """With a mesh runner, the state replicated over the mesh: the layout a sharded round returns it in, so round 2
  does not recompile for a different input sharding. Unchanged otherwise (and under tracing)."""
  mesh = (runner or Runner()).resolved_mesh()
  if mesh is None or any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(state)):
    return state
  return jax.device_put(state, NamedSharding(mesh, PartitionSpec()))


def check_client_states_given(stateful: bool, client_states: PyTree, round_data: PyTree) -> None:
  """The client states are given exactly when the algorithm keeps them, else a ``ValueError`` saying what to do."""
  if isinstance(round_data, Mapping) and "client_state" in round_data:
    raise ValueError("round_data has a 'client_state' entry: client states are next's own argument, "
                     "next(state, round_data, rng, client_states), not part of the round data.")
  if stateful and client_states is None:
    raise ValueError("this algorithm keeps per-client state: pass the cohort's states as next(state, round_data, "
                     "rng, client_states), stacked [client slots, ...] (ClientStateStore.gather(cohort, num_slots); "
                     "fedjax_lite.training.run_training does this).")
  if not stateful and client_states is not None:
    raise ValueError("client_states were given but this algorithm keeps no per-client state (build_round was "
                     "called without client_state=).")


def check_finalizer_output(output: Any, current: tuple[PyTree, PyTree]) -> None:
  """The finalizer returned a :class:`FinalizerOutput` with the params' and state's structures, shapes and dtypes
  unchanged (at trace time), else a ``TypeError``/``ValueError`` naming what differs."""
  if not isinstance(output, FinalizerOutput):
    raise TypeError(f"finalizer.apply(state, params, aggregate) must return FinalizerOutput(state, params, "
                    f"measurements), got {type(output).__name__}.")
  finalizer_state, params, measurements = output
  if measurements is not None and not isinstance(measurements, Mapping):
    raise TypeError(f"FinalizerOutput.measurements must be a dict or None, got {type(measurements).__name__}.")
  for what, new, old in (("params", params, current[0]), ("state", finalizer_state, current[1])):
    if jax.tree.structure(as_template(new)) != jax.tree.structure(as_template(old)) or any(
        jnp.shape(a) != jnp.shape(b) or jnp.result_type(a) != jnp.result_type(b)
        for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old))):
      raise ValueError(f"finalizer.apply returned {what} {as_template(new)}, but the round started with "
                       f"{as_template(old)}: a finalizer keeps the structure, shapes and dtypes of the params and of "
                       "its state.")


class RoundParts(NamedTuple):
  """The four parts of a round built by :func:`build_round`, as separate (jittable) functions.

  ``next`` is their composition, and a driver may run them apart -- e.g. an asynchronous algorithm (FedBuff) runs
  the client work of a batch of clients from the server version they downloaded, keeps their uploads, and later
  aggregates ``K`` arrivals and updates the server in a separate step::

    outputs = parts.client_outputs(parts.distribute(state_v, rng), round_data, rng)   # [slots, ...] uploads
    state, measurements = parts.finalize(state, parts.aggregate(state, arrivals, rng2))

  Attributes:
    distribute: ``(state, rng) -> Broadcast``: part 1, what every client receives (the encoder applied).
    work: ``(state, broadcast, round_data, rng, client_states=None) -> CohortWork``: parts 2 and 3 streamed over
      the cohort (the pre-pass first, when there is one): the aggregate, the client metrics, the new client
      states, and the broadcast as the client work saw it.
    finalize: ``(state, aggregate: MeasuredOutput) -> (new ServerState, finalizer measurements)``: part 4, the
      finalizer applied to ``aggregate.result``; the new state holds ``aggregate.state`` as its aggregator state
      and ``round_num + 1``.
    client_outputs: ``(broadcast, round_data, rng, client_states=None) -> ClientOutput`` stacked
      ``[client slots, ...]``: part 2 alone, every client's upload kept (padding slots weight 0, the non-finite
      rule applied), for drivers that aggregate later.
    aggregate: ``(state, outputs: ClientOutput, rng, client_mask=None) -> MeasuredOutput``: part 3 on stacked
      uploads (e.g. ``K`` arrivals; ``client_mask`` marks real rows, default all).
  """

  distribute: Callable[..., Broadcast]
  work: Callable[..., CohortWork]
  finalize: Callable[..., tuple[ServerState, dict]]
  client_outputs: Callable[..., ClientOutput]
  aggregate: Callable[..., MeasuredOutput]


def partition_upload(labels: PyTree, start: PyTree, final: PyTree) -> tuple[PyTree, PyTree]:
  """``(global delta, new local params)`` of one client in a partitioned round: ``start - final`` on the global
  positions (``None`` elsewhere; what the client uploads) and ``final`` on the local positions (``None``
  elsewhere; the client's new state). Frozen positions are in neither: they never leave the client."""
  delta = jax.tree.map(lambda label, a, b: jnp.subtract(a, b) if label == GLOBAL else None, labels, start, final)
  local = jax.tree.map(lambda label, b: b if label == LOCAL else None, labels, final)
  return delta, local


def _with_client_params(client_work: ClientWork) -> ClientWork:
  """``client_work`` of a round whose local parameters are the client state: the client's own local parameters
  (the non-``None`` leaves of its state) merged into ``broadcast.params`` (``None`` at those positions)."""

  def work(broadcast, client_data, client_state, rng):
    return client_work(broadcast._replace(params=overlay_params(broadcast.params, client_state)), client_data,
                       client_state, rng)

  return work


class _Partition:
  """The parameter partition of a :func:`build_round` round (``labels=``): resolves the label tree from the
  params (static strings, at trace time) and cuts trees by label."""

  def __init__(self, labels: LabelSpec, local_state: bool):
    self.labels, self.local_state = labels, local_state

  def tree(self, params: PyTree) -> PyTree:
    labels = label_params(params, self.labels)
    if self.local_state and LOCAL not in jax.tree.leaves(labels):
      raise ValueError("build_round(local_state=True) keeps the 'local' parameters as the client state, but the "
                       "labels mark no parameter 'local'.")
    return labels

  def keep(self, params: PyTree, labels: tuple[str, ...]) -> PyTree:
    return select_params(params, self.tree(params), labels)

  def sent(self, params: PyTree, encode: Callable[[PyTree], PyTree] | None = None) -> PyTree:
    """The broadcast params: the global ones (``encode``d) and the frozen ones, ``None`` at local positions."""
    labels = self.tree(params)
    global_part = select_params(params, labels, GLOBAL)
    if encode is not None:
      global_part = encode(global_part)
    return jax.tree.map(lambda label, p, g: g if label == GLOBAL else (p if label == FROZEN else None),
                        labels, params, global_part)

  def finalizer(self, finalizer: Finalizer) -> Finalizer:
    """``finalizer`` on the global part: its state and step cover the global parameters only."""

    def apply(state, params, aggregate):
      labels = self.tree(params)
      output = finalizer.apply(state, select_params(params, labels, GLOBAL), aggregate)
      if not isinstance(output, FinalizerOutput):
        return output  # check_finalizer_output names the type
      merged = jax.tree.map(lambda label, p, g: g if label == GLOBAL else p, labels, params, output.params)
      return output._replace(params=merged)

    return Finalizer(init=lambda params: finalizer.init(self.keep(params, GLOBAL)), apply=apply)


def _check_update_template(aggregators: dict, template: PyTree, what: str) -> None:
  if SINGLE in aggregators:
    return
  missing = sorted(set(aggregators) - set(template)) if isinstance(template, Mapping) else sorted(aggregators)
  if missing:
    raise ValueError(f"{what} is a dict of aggregators with keys {sorted(aggregators)}, but ONE client's update "
                     f"(the update template) has no {missing}: pass update_template=lambda params: "
                     f"{{{', '.join(repr(k) + ': ...' for k in sorted(aggregators))}}} to build_round, with the shape "
                     "structs (or arrays) of one client's update under each key.")


def _default_update_template(aggregators: dict) -> Callable[[PyTree], PyTree]:
  """The params' shapes (a model delta); with a dict of aggregators, the params' shapes under every key."""
  if SINGLE in aggregators:
    return as_template
  return lambda params: {name: as_template(params) for name in aggregators}


def build_round(
    client_work: ClientWork,
    *,
    aggregator: Aggregator | Mapping[str, Aggregator],
    finalizer: Finalizer,
    distributor: Distributor | None = None,
    client_state: Callable[[PyTree], PyTree] | None = None,
    update_template: Callable[[PyTree], PyTree] | None = None,
    prepass: Prepass | None = None,
    client_optimizer: ScheduledOptimizer | None = None,
    broadcast_encoder: Any | None = None,
    runner: Runner | None = None,
    labels: LabelSpec | None = None,
    local_state: bool = False,
    upload_compressor: Compressor | Mapping[str, Compressor] | None = None,
) -> Process:
  """Composes an algorithm from its four parts (see the module docstring); returns a ``Process``.

  Args:
    client_work: ``(broadcast, client_data, client_state, rng) -> ClientOutput`` for ONE client.
    aggregator: an :class:`Aggregator` of the clients' ``update``, or a dict ``{key: Aggregator}`` aggregating
      each ``update[key]`` with the client's weight.
    finalizer: the server update (e.g. :func:`optimizer_finalizer`).
    distributor: ``server_state -> Broadcast``; default the params and no hyperparameters.
    client_state: for stateful clients, ``params -> ONE client's initial state``.
    update_template: ``params -> ONE client's update`` (arrays or shape structs) to initialize the aggregators;
      default the params' shapes (a model delta), under every key with a dict of aggregators. Needed when the
      update is not shaped like that; a client work whose update differs from it is a ``ValueError`` naming both.
    prepass: optional :class:`Prepass`: a first pass over the cohort whose aggregate the client work sees as
      ``broadcast.prepass`` (Mime). Its aggregators and ``aggregator`` (then a dict) have distinct keys.
    client_optimizer: the clients' :class:`~fedjax_lite.algorithms.ScheduledOptimizer`, whose round
      hyperparameters (a learning rate scheduled by round) the template adds to every broadcast's ``hparams``;
      the client work takes the round's optimizer with ``client_optimizer.for_round(broadcast.hparams, ...)``,
      which refuses a broadcast without them.
    broadcast_encoder: optional server-to-client compression of the params, with ``encode(params, rng)`` and
      ``bits(params_template)`` (e.g. ``aggregators.broadcast_encoder(8)``): clients receive the decoded
      params, the server keeps its exact ones.
    runner: the client runner (default: the backend's strategy).
    labels: optional parameter partition (:func:`fedjax_lite.core.label_params`: one label, a function of the
      parameter's path, or a label tree): only ``'global'`` parameters are broadcast (and encoded), uploaded,
      aggregated, counted in the bits and stepped by the finalizer; ``update_template`` and the finalizer receive
      the global part (the params' tree with ``None`` elsewhere). See the module docstring.
    local_state: with ``labels``: the ``'local'`` parameters are the client state (``client_state=`` must then be
      None): client slot ``k`` gets the full model in ``broadcast.params`` and its local part as ``client_state``,
      and returns its new local part as ``new_state`` (:func:`partition_upload`).
    upload_compressor: optional :class:`~fedjax_lite.aggregators.Compressor` of each client's update (with a dict
      of aggregators, ``{key: Compressor}`` for the keys it compresses), applied at the end of the client work
      (:mod:`fedjax_lite.algorithms.compressed_uploads`): the aggregator sums the decoded messages and
      ``aggregated_bits`` counts the encoded ones. With the compressor's ``error_feedback`` each client keeps its
      residual (over the compressed part of the update; the global part in a partitioned round) in the client
      states, beside the round's own client state when it has one
      (:class:`~fedjax_lite.algorithms.ErrorFeedbackState`).

  Returns:
    ``Process(init, next, client_state, parts)``: ``init(params) -> ServerState``; ``next(state, round_data, rng,
    client_states=None) -> RoundOutput(state, metrics, client_states)``, ``client_states`` given and returned
    exactly when ``client_state`` is set (None otherwise); ``parts`` the :class:`RoundParts` that ``next``
    composes. Jittable end to end.

  Example -- FedAvg in its four parts, the client learning rate scheduled by round::

    optimizer = scheduled_optimizer(optax.sgd, optax.exponential_decay(0.1, 100, 0.5))
    process = build_round(
        local_training_work(model, optimizer),                          # 2. client work
        aggregator=aggregators.mean(),                                  # 3. aggregation
        finalizer=optimizer_finalizer(optax.sgd(1.0)),                  # 4. server update
        distributor=model_distributor(),                                # 1. broadcast: the model ...
        client_optimizer=optimizer)                                     #    ... and the round's rate
  """
  if not callable(client_work):
    raise TypeError(f"client_work must be a function (broadcast, client_data, client_state, rng) -> "
                    f"ClientOutput, got {type(client_work).__name__}.")
  aggregators = _named(aggregator)
  if not isinstance(finalizer, Finalizer):
    raise TypeError(f"finalizer must be a Finalizer(init, apply), e.g. optimizer_finalizer(optax.sgd(1.0)), got "
                    f"{type(finalizer).__name__}.")
  for name, value in (("distributor", distributor), ("client_state", client_state),
                      ("update_template", update_template)):
    if value is not None and not callable(value):
      raise TypeError(f"{name} must be a function or None, got {type(value).__name__}.")
  if runner is not None and not isinstance(runner, Runner):
    raise TypeError(f"runner must be a fedjax_lite Runner, got {type(runner).__name__}.")
  if broadcast_encoder is not None and not (callable(getattr(broadcast_encoder, "encode", None))
                                            and callable(getattr(broadcast_encoder, "bits", None))):
    raise TypeError("broadcast_encoder must have encode(params, rng) and bits(params_template) methods, e.g. "
                    "fedjax_lite.aggregators.quantization.broadcast_encoder().")
  if client_optimizer is not None and not isinstance(client_optimizer, ScheduledOptimizer):
    raise TypeError(f"client_optimizer must be a ScheduledOptimizer (algorithms.scheduled_optimizer(optax.sgd, "
                    f"learning_rate_or_schedule)), got {type(client_optimizer).__name__}.")
  if not isinstance(local_state, bool):
    raise TypeError(f"local_state must be a bool, got {type(local_state).__name__}.")
  partition = None
  if labels is not None:
    if not (isinstance(labels, str) or callable(labels)):
      label_params(jax.tree.map(lambda _: 0, labels), labels)  # checks the label values now
    partition = _Partition(labels, local_state)
    finalizer = partition.finalizer(finalizer)
    if local_state:
      if client_state is not None:
        raise ValueError("build_round(local_state=True) keeps the local parameters as the client state; an "
                         "algorithm state besides them (client_state=) is not supported.")
      client_state = lambda params: partition.keep(params, LOCAL)  # noqa: E731
      client_work = _with_client_params(client_work)
      if prepass is not None:
        prepass = prepass._replace(client_work=_with_client_params(prepass.client_work))
  elif local_state:
    raise ValueError("local_state=True needs labels= (which parameters are 'local').")
  update_template = update_template or _default_update_template(aggregators)
  if upload_compressor is not None:  # the client compresses (with its residual), the aggregator counts the message
    if prepass is not None:
      raise ValueError("upload_compressor with a prepass is not supported: the pre-pass's client work reads the "
                       "client states, which error feedback would change under it; compress in the main client "
                       "work's aggregator (aggregators.compressed) instead.")
    def sent_update(params, template=update_template):
      """ONE client's update: over the global parameters in a partitioned round."""
      return template(partition.keep(params, GLOBAL) if partition is not None else params)

    client_work, aggregator, client_state = compress_uploads(
        client_work, _unname(aggregators), upload_compressor, client_state=client_state,
        update_template=sent_update)
    aggregators = _named(aggregator)
  distributor = distributor or model_distributor()
  prepass_aggregators = {}
  if prepass is not None:
    if not isinstance(prepass, Prepass):
      raise TypeError(f"prepass must be a Prepass(client_work, aggregator, ...), got {type(prepass).__name__}.")
    if not callable(prepass.client_work):
      raise TypeError(f"prepass.client_work must be a function, got {type(prepass.client_work).__name__}.")
    if not isinstance(prepass.aggregator, Mapping):
      raise TypeError("prepass.aggregator must be a dict {key: Aggregator} (the finalizer receives both stages' "
                      f"aggregates in one dict), got {type(prepass.aggregator).__name__}.")
    prepass_aggregators = _named(prepass.aggregator)
    if SINGLE in aggregators or set(aggregators) & set(prepass_aggregators):
      got = "one aggregator" if SINGLE in aggregators else f"the keys {sorted(aggregators)}"
      raise ValueError(f"with a prepass, aggregator must be a dict whose keys differ from the prepass's "
                       f"{sorted(prepass_aggregators)}, got {got}.")
    if not isinstance(prepass.name, str) or not prepass.name or prepass.name in ("train", "num_non_finite_clients"):
      raise ValueError(f"prepass.name must be a non-empty str other than 'train' and 'num_non_finite_clients', got "
                       f"{prepass.name!r}.")
  prepass_template = (None if prepass is None
                      else prepass.update_template or _default_update_template(prepass_aggregators))
  all_aggregators = {**prepass_aggregators, **aggregators}

  def templates(params):
    """``(main update template, pre-pass update template or None)`` as shape structs, checked against the keys."""
    if partition is not None:
      params = partition.keep(params, GLOBAL)
    main = jax.eval_shape(update_template, params)
    _check_update_template(aggregators, main, "aggregator")
    if prepass is None:
      return main, None
    before = jax.eval_shape(prepass_template, params)
    _check_update_template(prepass_aggregators, before, "prepass.aggregator")
    return main, before

  def init(params: PyTree) -> ServerState:
    check_params(params)
    params = jax.tree.map(jnp.asarray, params)
    main, before = templates(params)
    aggregator_state = {name: agg.init(as_template(_pick(main, name))) for name, agg in aggregators.items()}
    if prepass is not None:
      aggregator_state.update({name: agg.init(as_template(before[name])) for name, agg in prepass_aggregators.items()})
    state = ServerState(
        params=params,
        finalizer_state=finalizer.init(params),
        aggregator_state=_unname(aggregator_state),
        round_num=jnp.zeros((), jnp.int32),
    )
    return place_on_mesh(state, runner)

  def distribute(state: ServerState, rng: jax.Array) -> Broadcast:
    broadcast = distributor(state)
    if client_optimizer is not None:  # the optimizer's round hyperparameters, threaded by the template
      scheduled = client_optimizer.hparams(state.round_num)
      if broadcast.hparams and not isinstance(broadcast.hparams, Mapping):
        raise TypeError(f"with client_optimizer, the distributor's Broadcast.hparams must be a dict, got "
                        f"{type(broadcast.hparams).__name__}.")
      own = dict(broadcast.hparams or {})
      if set(own) & set(scheduled):
        raise ValueError(f"the hyperparameters {sorted(set(own) & set(scheduled))} are broadcast both by the "
                         "distributor and by client_optimizer: let client_optimizer= alone broadcast its own.")
      broadcast = broadcast._replace(hparams={**own, **scheduled})
    encode = None
    if broadcast_encoder is not None:
      encode = lambda params: broadcast_encoder.encode(params, jax.random.fold_in(rng, BROADCAST_STREAM))  # noqa
    if partition is not None:
      return broadcast._replace(params=partition.sent(broadcast.params, encode))
    if encode is not None:
      broadcast = broadcast._replace(params=encode(broadcast.params))
    return broadcast

  def work(state: ServerState, broadcast: Broadcast, round_data: PyTree, rng: jax.Array,
           client_states: PyTree = None) -> CohortWork:
    main_template, prepass_update = templates(state.params)
    if prepass is None:
      return client_work_and_aggregate(client_work, aggregator, state.aggregator_state, broadcast, round_data, rng,
                                       runner, update_template=main_template, client_states=client_states)
    prepass_key, rng = jax.random.split(rng)
    before = client_work_and_aggregate(_reading_state(prepass.client_work), prepass.aggregator,
                                       state.aggregator_state, broadcast, round_data, prepass_key, runner,
                                       update_template=prepass_update, client_states=client_states)
    broadcast = broadcast._replace(prepass=before.aggregate.result)
    after = client_work_and_aggregate(client_work, aggregator, state.aggregator_state, broadcast, round_data, rng,
                                      runner, update_template=main_template, client_states=client_states)
    aggregate = MeasuredOutput(*(dict(a, **b) for a, b in zip(before.aggregate, after.aggregate)))
    return CohortWork(aggregate=aggregate, metrics=after.metrics | {prepass.name: before.metrics},
                      client_states=after.client_states, broadcast=broadcast)

  def finalize(state: ServerState, aggregate: MeasuredOutput) -> tuple[ServerState, dict]:
    output = finalizer.apply(state.finalizer_state, state.params, aggregate.result)
    check_finalizer_output(output, (state.params, state.finalizer_state))
    params, finalizer_state, measurements = output.params, output.state, dict(output.measurements or {})
    # The server's non-finite rule, for every finalizer: a NaN/Inf aggregate (or step) changes nothing.
    (params, finalizer_state), rule = reject_non_finite_update(
        aggregate.result, (params, finalizer_state), (state.params, state.finalizer_state))
    return state.replace(params=params, finalizer_state=finalizer_state, aggregator_state=aggregate.state,
                         round_num=state.round_num + 1), {**measurements, **rule}

  def client_outputs(broadcast: Broadcast, round_data: PyTree, rng: jax.Array,
                     client_states: PyTree = None) -> ClientOutput:
    return stacked_client_outputs(client_work, broadcast, round_data, rng, runner, client_states=client_states)

  def aggregate_outputs(state: ServerState, outputs: ClientOutput, rng: jax.Array,
                        client_mask: jax.Array | None = None) -> MeasuredOutput:
    return aggregate_stacked(aggregator, state.aggregator_state, outputs, rng, client_mask)

  def next_fn(state: ServerState, round_data: PyTree, rng: jax.Array, client_states: PyTree = None) -> RoundOutput:
    check_client_states_given(client_state is not None, client_states, round_data)
    broadcast = distribute(state, rng)                                              # 1. distributor
    cohort = work(state, broadcast, round_data, rng, client_states)                  # 2. client work, 3. aggregator
    new_state, finalizer_metrics = finalize(state, cohort.aggregate)                 # 4. finalizer
    model_bits = model_broadcast_bits(state)
    metrics = {
        "distributor": {},
        "client_work": cohort.metrics | dict(broadcast.hparams),
        "aggregator": cohort.aggregate.measurements,
        "finalizer": finalizer_metrics,
        **communication_bits(_unname(all_aggregators), state.aggregator_state, cohort.broadcast,
                             _merged_templates(templates(state.params)), round_data,
                             model_broadcast_bits=model_bits),
    }
    return RoundOutput(state=new_state, metrics=metrics, client_states=cohort.client_states)

  def model_broadcast_bits(state: ServerState) -> int | None:
    """The model's broadcast bits when they are not its whole size: encoded, or the global part only."""
    if broadcast_encoder is None and partition is None:
      return None
    sent = jax.eval_shape(lambda s: distributor(s).params, state)
    if partition is not None:
      sent = partition.keep(sent, GLOBAL)
    return int(broadcast_encoder.bits(sent)) if broadcast_encoder is not None else tree_size_bits(sent)

  parts = RoundParts(distribute=distribute, work=work, finalize=finalize, client_outputs=client_outputs,
                     aggregate=aggregate_outputs)
  return Process(init=init, next=next_fn, client_state=client_state, parts=parts)


def _reading_state(client_work: ClientWork) -> ClientWork:
  """``client_work`` that leaves the client's state as it was (a pre-pass reads the states, never writes them)."""

  def work(broadcast, client_data, client_state, rng):
    output = client_work(broadcast, client_data, client_state, rng)
    return output._replace(new_state=client_state) if isinstance(output, ClientOutput) else output

  return work


def _merged_templates(templates: tuple[PyTree, PyTree | None]) -> PyTree:
  main, before = templates
  return main if before is None else {**before, **main}
