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
clients (:func:`fedjax_lite.algorithms.round.communication_bits`).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from fedjax_lite.aggregators.base import Aggregator, as_template
from fedjax_lite.aggregators.mean import mean, unweighted_mean
from fedjax_lite.algorithms.local_training import train_locally
from fedjax_lite.algorithms.optimizers import ClientOptimizer, OptimizerFactory
from fedjax_lite.algorithms.round import client_work_and_aggregate, communication_bits
from fedjax_lite.algorithms.server_update import apply_server_optimizer
from fedjax_lite.core import validation
from fedjax_lite.core.model import Model
from fedjax_lite.core.process import Process
from fedjax_lite.core.records import ClientOutput
from fedjax_lite.core.runner import Runner

PyTree = Any
WEIGHTINGS = ("num_examples", "uniform")
BROADCAST_STREAM = 0xB40AD  # the broadcast encoder's key is fold_in(round key, BROADCAST_STREAM)


@flax.struct.dataclass
class ServerState:
  """The server's state between rounds (an immutable pytree; use ``.replace(...)``).

  Attributes:
    params: the global model parameters.
    opt_state: the server optimizer's state.
    aggregator_state: the aggregator's state (e.g. its quantile estimates).
    round_num: int32 count of completed rounds; the client learning-rate schedule reads it.
  """

  params: PyTree
  opt_state: PyTree
  aggregator_state: PyTree
  round_num: jax.Array


def check_model(model: Model) -> None:
  if not isinstance(model, Model):
    raise TypeError(f"model must be a fedjax_lite Model (see fedjax_lite.core.model.from_flax), got "
                    f"{type(model).__name__}.")


def check_params(params: PyTree) -> None:
  leaves = jax.tree.leaves(params)
  if not leaves:
    raise ValueError("params must be a pytree with at least one array.")
  for leaf in leaves:
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise TypeError(f"params must hold floating-point arrays, got dtype {jnp.result_type(leaf)}.")


def resolve_aggregator(aggregator: Aggregator | None, weighted: bool) -> Aggregator:
  if aggregator is None:
    return mean() if weighted else unweighted_mean()
  if not isinstance(aggregator, Aggregator):
    raise TypeError(f"aggregator must be a fedjax_lite Aggregator, got {type(aggregator).__name__}.")
  return aggregator


def init_server_state(
    params: PyTree, server_optimizer: optax.GradientTransformation, aggregator: Aggregator
) -> ServerState:
  """The round-0 :class:`ServerState` for ``params`` (validated: a pytree of floating-point arrays)."""
  check_params(params)
  params = jax.tree.map(jnp.asarray, params)
  return ServerState(
      params=params,
      opt_state=server_optimizer.init(params),
      aggregator_state=aggregator.init(as_template(params)),
      round_num=jnp.zeros((), jnp.int32),
  )


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
    broadcast_encoder: Any | None = None,
    runner: Runner | None = None,
) -> Process:
  """Builds FedAvg as a ``Process(init, next)``.

  Args:
    model: the model.
    client_optimizer: an optax transformation, or a function of the learning rate (default ``optax.sgd``).
    client_learning_rate: the client rate, a float or an optax schedule of the ROUND number (required when
      ``client_optimizer`` is a function).
    server_optimizer: optax transformation applied to the aggregated delta; default ``optax.sgd(1.0)``.
    weighting: ``'num_examples'`` (weight = examples processed) or ``'uniform'`` (weight 1).
    aggregator: any aggregator; default the weighted mean (``'num_examples'``) or unweighted mean
      (``'uniform'``).
    client_grad_clip_norm: optional clip of each local gradient's global L2 norm (``optax.clip_by_global_norm``).
    server_midpoint_fraction: optional ``f`` in (0, 1]: move only ``f`` of the way to the server optimizer's
      proposal (with SGD(1.0), ``f = 0.5`` lands at the midpoint of the current and averaged models).
    broadcast_encoder: optional server-to-client compression with ``encode(params, rng) -> params as the
      clients receive them`` and ``bits(params_template) -> int`` (e.g.
      ``aggregators.quantization.broadcast_encoder(8, 10000)``). Clients train from the decoded parameters and
      report their delta from them; the server applies the aggregate to its exact parameters.
    runner: the client runner (default: per-backend strategy).

  Returns:
    ``Process(init, next)`` with ``init(params) -> ServerState`` and
    ``next(state, round_data, rng) -> (state, metrics)``, jittable end to end.

  Example::

    process = fed_avg(model, client_learning_rate=0.02)
    state = process.init(model.init(jax.random.key(0)))
    state, metrics = jax.jit(process.next)(state, round_data, jax.random.key(1))
  """
  check_model(model)
  optimizer = ClientOptimizer(client_optimizer, client_learning_rate, grad_clip_norm=client_grad_clip_norm)
  server_optimizer = optax.sgd(1.0) if server_optimizer is None else server_optimizer
  if not isinstance(server_optimizer, optax.GradientTransformation):
    raise TypeError(f"server_optimizer must be an optax GradientTransformation, got "
                    f"{type(server_optimizer).__name__}.")
  validation.check_choice("weighting", weighting, WEIGHTINGS)
  aggregator = resolve_aggregator(aggregator, weighted=weighting == "num_examples")
  validation.check_float("server_midpoint_fraction", server_midpoint_fraction, low=0.0, high=1.0,
                         low_inclusive=False, allow_none=True)
  if runner is not None and not isinstance(runner, Runner):
    raise TypeError(f"runner must be a fedjax_lite Runner, got {type(runner).__name__}.")
  check_broadcast_encoder(broadcast_encoder)

  def client_update(params, client_data, rng, hparams) -> ClientOutput:
    final_params, metric_sums = train_locally(model, optimizer.build(hparams), params, client_data, rng)
    delta = jax.tree.map(jnp.subtract, params, final_params)
    if weighting == "num_examples":
      weight = metric_sums["num_examples"].astype(jnp.float32)
    else:
      weight = jnp.ones((), jnp.float32)
    return ClientOutput(update=delta, weight=weight, metrics=metric_sums)

  def init(params: PyTree) -> ServerState:
    return init_server_state(params, server_optimizer, aggregator)

  def next_fn(state: ServerState, round_data: PyTree, rng: jax.Array) -> tuple[ServerState, dict]:
    hparams = optimizer.hparams(state.round_num)
    client_params, model_bits = encode_broadcast(broadcast_encoder, state.params,
                                                 jax.random.fold_in(rng, BROADCAST_STREAM))
    aggregate, client_metrics = client_work_and_aggregate(
        client_update, aggregator, state.aggregator_state, client_params, hparams, round_data, rng, runner
    )
    params, opt_state, finalizer_metrics = apply_server_optimizer(
        server_optimizer, state.params, state.opt_state, aggregate.result,
        midpoint_fraction=server_midpoint_fraction,
    )
    new_state = state.replace(
        params=params, opt_state=opt_state, aggregator_state=aggregate.state, round_num=state.round_num + 1
    )
    metrics = {
        "distributor": {},
        "client_work": client_metrics | dict(hparams),
        "aggregator": aggregate.measurements,
        "finalizer": finalizer_metrics,
        **communication_bits(aggregator, state.aggregator_state, state.params, hparams, round_data,
                             model_broadcast_bits=model_bits),
    }
    return new_state, metrics

  return Process(init=init, next=next_fn)


def check_broadcast_encoder(encoder: Any) -> None:
  if encoder is not None and not (callable(getattr(encoder, "encode", None))
                                  and callable(getattr(encoder, "bits", None))):
    raise TypeError("broadcast_encoder must have encode(params, rng) and bits(params_template) methods, e.g. "
                    "fedjax_lite.aggregators.quantization.broadcast_encoder().")


def encode_broadcast(encoder: Any, params: PyTree, rng: jax.Array) -> tuple[PyTree, int | None]:
  """``(params as the clients receive them, bits of the encoded model per client or None if uncompressed)``."""
  if encoder is None:
    return params, None
  return encoder.encode(params, rng), int(encoder.bits(as_template(params)))
