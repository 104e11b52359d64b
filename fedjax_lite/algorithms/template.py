"""The round template: an algorithm is its four parts, composed by :func:`build_round`.

A round of every algorithm in this library has the reference's four parts (TFF ``tff.learning.templates``), and
:func:`build_round` keeps them visible:

1. **distributor** -- ``distributor(server_state) -> Broadcast(params, hparams, extra)``: what the server sends to
   every client: the model, the round's hyperparameters (e.g. a client learning rate scheduled by round) and any
   extra server values (SCAFFOLD's server control variate, Mime's optimizer state).
2. **client work** -- ``client_work(broadcast, client_data, client_state, rng) -> ClientOutput(update, weight,
   metrics, new_state)`` for ONE client. The runner maps it over the round's client slots (one scan per core on
   CPU, ``vmap`` on accelerators, chunks, or a device mesh: :mod:`fedjax_lite.core.runner`).
3. **aggregator** -- one :class:`~fedjax_lite.aggregators.Aggregator`, or a dict of them, one per key of the
   clients' ``update`` (e.g. the model delta and a second quantity). A sum-based aggregator is streamed: each
   client's contribution is added to a running sum as it is produced, so memory grows with the clients in flight,
   not the cohort; any other (median, trimmed mean, Krum) receives the stacked values.
4. **finalizer** -- ``Finalizer(init, apply)``: the server update, ``apply(finalizer_state, params, aggregate) ->
   (params, finalizer_state, measurements)``; :func:`optimizer_finalizer` applies an optax transformation.

Rules the template enforces for every algorithm, so a user's own parts cannot get them wrong:

* padding slots (``num_examples == 0``) have weight 0 and add nothing, whatever the client work returns, and never
  write client state;
* a client whose update has any NaN/Inf is rejected (zeros, weight 0, metrics reset, its state left as it was) and
  counted in ``client_work/num_non_finite_clients`` (TFF's client rule). Weight 0 removes it from a weighted mean;
  the unweighted mean counts real slots, not weights, so under uniform weighting a rejected client still counts in
  the denominator, exactly as TFF's ``UnweightedMeanFactory`` does;
* metrics are grouped ``{'distributor', 'client_work', 'aggregator', 'finalizer', 'broadcasted_bits',
  'aggregated_bits'}``; client metrics are sums finalized once on the server (example-weighted over the cohort).

Algorithms with per-client state pass ``client_state=`` (one client's initial state from the params): their
``next`` then reads ``round_data['client_state']`` (the cohort's states, gathered from a
:class:`fedjax_lite.core.ClientStateStore`) and returns ``(state, metrics, new_client_states)``.

Randomness: the round key is split into ``(train, aggregator)``; client slot ``k`` trains with
``fold_in(train, k)``; a single aggregator uses the aggregator key as its own ``next`` would, several use
``fold_in(aggregator_key, i)`` in sorted key order.
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
from fedjax_lite.core.model import finalize_metric_sums
from fedjax_lite.core.process import MeasuredOutput, Process
from fedjax_lite.core.records import ClientOutput
from fedjax_lite.core.round_data import check_round_data
from fedjax_lite.core.runner import Runner, client_mask, num_client_slots, run_clients
from fedjax_lite.core.tree import PyTree, tree_all_finite, tree_select, tree_size_bits

BROADCAST_STREAM = 0xB40AD  # the broadcast encoder's key is fold_in(round key, BROADCAST_STREAM)
CLIENT_STATE_KEY = "client_state"


class Broadcast(NamedTuple):
  """What the server sends every client of a round.

  Attributes:
    params: the model parameters as the clients receive them (decoded, when a broadcast encoder compresses them).
    hparams: the round's client hyperparameters, e.g. ``{'learning_rate': lr}`` (reported in the
      ``client_work`` metrics).
    extra: the algorithm's other server values (SCAFFOLD's control variate, Mime's optimizer state, ...).
  """

  params: PyTree
  hparams: PyTree = ()
  extra: PyTree = ()


@flax.struct.dataclass
class ServerState:
  """The server's state between rounds (an immutable pytree; use ``.replace(...)``).

  Attributes:
    params: the global model parameters.
    opt_state: the finalizer's state: the server optimizer's state, and for some algorithms more (SCAFFOLD's
      control variate, Mime's base optimizer state).
    aggregator_state: the aggregator's state (e.g. its quantile estimates); a dict when the round has several.
    round_num: int32 count of completed rounds; schedules read it.
  """

  params: PyTree
  opt_state: PyTree
  aggregator_state: PyTree
  round_num: jax.Array


Distributor = Callable[[ServerState], Broadcast]
ClientWork = Callable[[Broadcast, PyTree, PyTree, jax.Array], ClientOutput]


class Finalizer(NamedTuple):
  """The server update: ``init(params) -> state``; ``apply(state, params, aggregate) -> (params, state,
  measurements)``."""

  init: Callable[[PyTree], PyTree]
  apply: Callable[[PyTree, PyTree, PyTree], tuple[PyTree, PyTree, dict]]


def model_distributor(client_hparams: Callable[[jax.Array], PyTree] | None = None,
                      extra: Callable[[ServerState], PyTree] | None = None) -> Distributor:
  """The usual distributor: the server params, ``client_hparams(round_num)`` and ``extra(state)``."""

  def distribute(state: ServerState) -> Broadcast:
    return Broadcast(params=state.params,
                     hparams={} if client_hparams is None else client_hparams(state.round_num),
                     extra=() if extra is None else extra(state))

  return distribute


def apply_optimizer_rejecting_non_finite(
    server_optimizer: optax.GradientTransformation, opt_state: PyTree, params: PyTree, aggregate: PyTree
) -> tuple[PyTree, PyTree, dict[str, jax.Array]]:
  """``params + server_optimizer(aggregate)``; a non-finite aggregate keeps params AND optimizer state.

  The aggregate plays the role of a gradient (FedAvg's averaged pseudo-gradient, FedSGD's averaged gradient). TFF
  ``reject_non_finite_update``: ``update_non_finite`` is 1 when the aggregate holds any NaN/Inf.
  """
  updates, stepped_state = server_optimizer.update(aggregate, opt_state, params)
  stepped = optax.apply_updates(params, updates)
  finite = tree_all_finite(aggregate)
  return (tree_select(finite, stepped, params), tree_select(finite, stepped_state, opt_state),
          {"update_non_finite": jnp.where(finite, 0, 1).astype(jnp.int32)})


def optimizer_finalizer(server_optimizer: optax.GradientTransformation) -> Finalizer:
  """The finalizer of FedAvg and its adaptive variants: ``params <- params + server_optimizer(aggregate)``.

  With ``optax.sgd(1.0)`` and the weighted mean of the clients' deltas this is exactly the weighted average of the
  client models (McMahan et al. 2017); with Adam/Yogi/Adagrad it is Reddi et al. 2021's FedOpt.
  """
  check_optimizer("server_optimizer", server_optimizer)
  return Finalizer(
      init=server_optimizer.init,
      apply=lambda opt_state, params, aggregate: apply_optimizer_rejecting_non_finite(
          server_optimizer, opt_state, params, aggregate),
  )


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
  """TFF's client rule: an update with any NaN/Inf becomes zeros with weight 0, its metrics are reset and its
  state stays ``client_state``. The metrics gain ``num_non_finite_clients`` (1 for a rejected client)."""
  finite = tree_all_finite(output.update)
  if output.new_state is not None:
    finite = finite & tree_all_finite(output.new_state)
  zeros = jax.tree.map(jnp.zeros_like, output.update)
  metrics = tree_select(finite, output.metrics, jax.tree.map(jnp.zeros_like, output.metrics))
  metrics = dict(metrics, num_non_finite_clients=jnp.where(finite, 0, 1).astype(jnp.int32))
  new_state = output.new_state
  if new_state is not None:
    new_state = tree_select(finite, new_state, client_state)
  return ClientOutput(update=tree_select(finite, output.update, zeros),
                      weight=jnp.where(finite, jnp.asarray(output.weight, jnp.float32), 0.0),
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


def client_work_and_aggregate(
    client_work: ClientWork,
    aggregator: Aggregator | Mapping[str, Aggregator],
    aggregator_state: PyTree,
    broadcast: Broadcast,
    round_data: PyTree,
    rng: jax.Array,
    runner: Runner | None,
    update_template: PyTree | None = None,
) -> tuple[MeasuredOutput, dict[str, jax.Array], PyTree]:
  """Parts 2 and 3 of a round: every client's work, then the aggregation.

  ``update_template`` (shape structs of ONE client's update, what the aggregators were initialized with), when
  given, is checked against what the client work returns: a different tree, shape or dtype is a ``ValueError``
  naming both, instead of an aggregator silently summing the wrong thing.

  Returns ``(aggregate, client metrics, new client states or None)``: ``aggregate`` is the aggregator's
  ``MeasuredOutput`` (its fields dicts keyed like ``aggregator`` when it is a dict); the client metrics are
  ``{'train': finalized sums, 'num_non_finite_clients'}``.
  """
  # Structure checks at trace time (once per shape): a clear error naming the input instead of a shape error deep
  # inside the runner.
  check_round_data({key: value for key, value in round_data.items() if key != CLIENT_STATE_KEY}
                   if isinstance(round_data, Mapping) else round_data)
  aggregators = _named(aggregator)
  states = {name: _pick(aggregator_state, name) for name in aggregators}
  train_key, aggregator_key = jax.random.split(rng)
  keys = _aggregator_keys(aggregators, aggregator_key)
  split_keys = {name: split_rng(keys[name]) for name in aggregators}
  streamed = [name for name, agg in aggregators.items() if agg.combine == SUM]
  stacked = [name for name, agg in aggregators.items() if agg.combine == STACK]
  stateful = CLIENT_STATE_KEY in round_data
  aggregator_params = {name: aggregators[name].broadcast(states[name]) for name in aggregators}
  update_templates = {}  # ONE client's update per aggregator, recorded while tracing (static shapes)

  def per_client(server_values, client_data, client_keys):
    broadcast, aggregator_params = server_values
    client_data = dict(client_data)
    client_state = client_data.pop(CLIENT_STATE_KEY, None)
    output = client_work(broadcast, client_data, client_state, client_keys["train"])
    if not isinstance(output, ClientOutput):
      raise TypeError(f"client_work must return a ClientOutput(update, weight, metrics, new_state), got "
                      f"{type(output).__name__}.")
    if update_template is not None:
      check_update(output.update, update_template)
    output = reject_non_finite(output, client_state)
    is_real = client_data["num_examples"] > 0
    weight = jnp.where(is_real, output.weight, 0.0)  # padding: weight 0, always
    contributions = {}
    for name, agg in aggregators.items():
      update = _pick(output.update, name)
      update_templates[name] = as_template(update)
      contributions[name] = agg.client(aggregator_params[name], update, weight, client_keys["aggregators"][name])
    # Sums: the runner drops padding slots' summands. Stacks: padding contributions are zeroed here.
    collected = {"stacked": {name: jax.tree.map(lambda c: jnp.where(is_real, c, jnp.zeros((), c.dtype)),
                                                contributions[name]) for name in stacked},
                 "state": output.new_state if stateful else None}
    return ({name: contributions[name] for name in streamed}, output.metrics), collected

  client_keys = {"train": train_key, "aggregators": {name: split_keys[name][0] for name in aggregators}}
  (totals, metric_sums), collected = run_clients(
      per_client, (broadcast, aggregator_params), round_data, client_keys, runner=runner)
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
  return (aggregate, {"train": finalize_metric_sums(metric_sums), "num_non_finite_clients": non_finite},
          collected["state"])


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
  leaf at its dtype's width), the hyperparameters, the extra server values -- plus each aggregator's broadcast
  (e.g. its clipping norm); the upload is each aggregator's exact payload
  (:func:`fedjax_lite.aggregators.base.client_upload_bits`). Both are static: they depend on shapes only.
  """
  aggregators = _named(aggregator)
  model_bits = (tree_size_bits(as_template(broadcast.params)) if model_broadcast_bits is None
                else int(model_broadcast_bits))
  download = model_bits + tree_size_bits(broadcast.hparams) + tree_size_bits(broadcast.extra)
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


def build_round(
    client_work: ClientWork,
    *,
    aggregator: Aggregator | Mapping[str, Aggregator],
    finalizer: Finalizer,
    distributor: Distributor | None = None,
    client_state: Callable[[PyTree], PyTree] | None = None,
    update_template: Callable[[PyTree], PyTree] | None = None,
    broadcast_encoder: Any | None = None,
    runner: Runner | None = None,
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
      default the params' shapes (a model delta). Needed when the update is not shaped like the model.
    broadcast_encoder: optional server-to-client compression of the params, with ``encode(params, rng)`` and
      ``bits(params_template)`` (e.g. ``aggregators.broadcast_encoder(8)``): clients receive the decoded
      params, the server keeps its exact ones.
    runner: the client runner (default: the backend's strategy).

  Returns:
    ``Process(init, next, client_state)``: ``init(params) -> ServerState``; ``next(state, round_data, rng) ->
    (state, metrics)``, or ``(state, metrics, new_client_states)`` with ``client_state``. Jittable end to end.

  Example -- FedAvg in its four parts::

    process = build_round(
        local_training_work(model, lambda hparams: optax.sgd(0.1)),      # 2. client work
        aggregator=aggregators.mean(),                                  # 3. aggregation
        finalizer=optimizer_finalizer(optax.sgd(1.0)),                  # 4. server update
        distributor=model_distributor())                                # 1. broadcast
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
  distributor = distributor or model_distributor()
  update_template = update_template or as_template

  def init(params: PyTree) -> ServerState:
    check_params(params)
    params = jax.tree.map(jnp.asarray, params)
    template = as_template(update_template(params))
    state = ServerState(
        params=params,
        opt_state=finalizer.init(params),
        aggregator_state=_unname({name: agg.init(as_template(_pick(template, name)))
                                  for name, agg in aggregators.items()}),
        round_num=jnp.zeros((), jnp.int32),
    )
    return place_on_mesh(state, runner)

  def next_fn(state: ServerState, round_data: PyTree, rng: jax.Array):
    if (client_state is not None) != (CLIENT_STATE_KEY in round_data):
      raise ValueError(
          "this algorithm keeps per-client state: round_data needs 'client_state' (the cohort's states, "
          "gathered from a fedjax_lite.core.ClientStateStore)" if client_state is not None else
          "round_data has 'client_state' but this algorithm keeps no per-client state.")
    # 1. distributor
    broadcast = distributor(state)
    model_bits = None
    if broadcast_encoder is not None:
      model_bits = int(broadcast_encoder.bits(as_template(broadcast.params)))
      broadcast = broadcast._replace(
          params=broadcast_encoder.encode(broadcast.params, jax.random.fold_in(rng, BROADCAST_STREAM)))
    # 2. client work and 3. aggregation
    aggregate, client_metrics, new_client_states = client_work_and_aggregate(
        client_work, aggregator, state.aggregator_state, broadcast, round_data, rng, runner,
        update_template=jax.eval_shape(update_template, state.params))
    # 4. finalizer
    params, opt_state, finalizer_metrics = finalizer.apply(state.opt_state, state.params, aggregate.result)
    new_state = state.replace(params=params, opt_state=opt_state, aggregator_state=aggregate.state,
                              round_num=state.round_num + 1)
    metrics = {
        "distributor": {},
        "client_work": client_metrics | dict(broadcast.hparams),
        "aggregator": aggregate.measurements,
        "finalizer": finalizer_metrics,
        **communication_bits(aggregator, state.aggregator_state, broadcast,
                             jax.eval_shape(update_template, state.params), round_data,
                             model_broadcast_bits=model_bits),
    }
    if client_state is not None:
      return new_state, metrics, new_client_states
    return new_state, metrics

  return Process(init=init, next=next_fn, client_state=client_state)
