"""FedBuff: asynchronous buffered aggregation (Nguyen et al. 2022, AISTATS, "Federated Learning with Buffered
Asynchronous Aggregation", arXiv:2106.06639).

``concurrency`` clients train at once, each from the server model version it downloaded; the server applies an
update whenever ``K`` (``buffer_size``) client updates have arrived; a new client starts whenever one finishes. With
``tau_i`` the staleness of arrival ``i`` (server updates since it downloaded) and ``s(tau) = 1 / sqrt(1 + tau)``
(the paper's default; any ``staleness_weight``), one server step is

  ``delta = aggregate({s(tau_i) * delta_i}, {w_i})``,  ``params <- params + server_optimizer(delta)``

over the buffer's ``K`` arrivals, where ``delta_i = downloaded params - client's final params`` is FedAvg's client
update and ``aggregate`` is the round's aggregator (default the weighted mean ``sum w_i x_i / sum w_i``: with
``weighting='uniform'`` and SGD(``eta_g``) exactly the paper's Algorithm 1, ``params - eta_g / K sum s(tau_i)
delta_i``). Arrivals staler than ``max_staleness`` are dropped (counted, never applied).

Compiled, in the round template's four parts (:class:`~fedjax_lite.algorithms.RoundParts` of the FedAvg round,
:func:`~fedjax_lite.algorithms.fed_avg`): the HOST plans the event order on the simulated clock
(:class:`fedjax_lite.systems.BufferedSchedule`: who arrives when, with which version; it depends on the clients'
task durations only); the DEVICE runs one jitted :func:`next` per server step, which

1. **distributor** -- keeps the broadcasts of the last ``max_staleness + 1`` versions in a ring buffer
   (``FedBuffState.ring``, version ``v`` in row ``v % (max_staleness + 1)``; the row is written by
   ``parts.distribute`` when the version is made, the client learning rate scheduled by version);
2. **client work** -- trains the ``K`` arrivals, each from its own version's row of the ring (FedAvg's local
   training; a client's result depends only on what it downloaded, so training it when it arrives gives what it
   would have sent), and scales its update by its staleness weight;
3. **aggregator** -- the library's aggregator over those ``K`` updates, streamed like a synchronous round (clipping,
   DP noise, compression and secure sum all run inside the buffer: one aggregation per server step);
4. **finalizer** -- the server optimizer (optax) on the aggregate, under the template's non-finite rule; the new
   version's broadcast goes into the ring.

The ``K`` clients of a step have one fixed shape (one compilation); memory holds the ring (``max_staleness + 1``
models) and the ``K`` clients being trained. With ``concurrency == K == cohort size`` and equal task durations every
client has staleness 0 and weight 1, and the steps are FedAvg's rounds bit for bit (tests/algorithms/test_fed_buff.py).

Privacy: each server step is one aggregation of ``K`` client updates, so a DP aggregator's accounting is per step,
with ``K`` in place of the cohort size; a client contributes at most once to a step (the event order does not
restart a client whose update waits in the buffer). Staleness weights are at most 1 (for the default) and applied BEFORE the
aggregator clips, so the sensitivity is the clip norm; but the participation pattern is set by the clients' speeds
and the event order, not by uniform or Poisson sampling, so the sampling-amplified epsilon of
:mod:`fedjax_lite.privacy` is an idealization for FedBuff (Kairouz et al. 2021, "Practical and Private (Deep)
Learning without Sampling or Shuffling", motivate DP-FTRL by exactly this); the guarantee without amplification
(each client in at most ``n`` steps, a Gaussian mechanism per step composed ``n`` times) holds:
:func:`fedjax_lite.training.fed_buff_privacy` builds that ledger for :func:`fedjax_lite.training.run_fed_buff`.
See ``docs/systems.md``.

Metrics of a step: the template's groups (``client_work`` example-weighted over the ``K`` arrivals, ``aggregator``,
``finalizer``, ``broadcasted_bits``, ``aggregated_bits``) plus ``fedbuff``: ``{'mean_staleness', 'max_staleness',
'num_applied', 'version'}``; the driver (:func:`fedjax_lite.training.run_fed_buff`) adds the event order's
``fedbuff/`` metrics (arrivals, dropped stale or offline, simulated time).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lite.aggregators.base import as_template
from fedjax_lite.algorithms.fed_avg import check_model, fed_avg, fed_avg_options, resolve_aggregator
from fedjax_lite.algorithms.template import (
    Broadcast,
    ClientWork,
    ServerState,
    bits_per_client,
    place_on_mesh,
    round_bits,
)
from fedjax_lite.core import validation
from fedjax_lite.core.model import Model
from fedjax_lite.core.process import RoundOutput
from fedjax_lite.core.tree import PyTree

ARRIVALS = "fedbuff"  # the round data's per-arrival entry {'ring_row', 'staleness_weight'} (the client work reads it)
RING_STREAM = 0xFB0F  # the new version's broadcast key is fold_in(step key, RING_STREAM)

StalenessWeight = Callable[[jax.Array], jax.Array]

__all__ = ["FedBuff", "FedBuffState", "fed_buff", "inverse_sqrt_staleness", "staleness_work"]


def inverse_sqrt_staleness(staleness: jax.Array) -> jax.Array:
  """``s(tau) = 1 / sqrt(1 + tau)``: FedBuff's staleness weight (the choice of Nguyen et al. 2022), float32."""
  return 1.0 / jnp.sqrt(1.0 + jnp.asarray(staleness, jnp.float32))


@flax.struct.dataclass
class FedBuffState:
  """FedBuff's device state between server steps (an immutable pytree; ``.replace(...)``).

  Attributes:
    server: the round template's :class:`~fedjax_lite.algorithms.ServerState`: the params, the server optimizer's
      state (``finalizer_state``), the aggregator's state, and ``round_num``, the version counter (server steps
      done).
    ring: a :class:`~fedjax_lite.algorithms.Broadcast` whose leaves are stacked ``[max_staleness + 1, ...]``: the
      broadcasts of the last ``max_staleness + 1`` versions, version ``v`` in row ``v % (max_staleness + 1)``.

  The in-flight clients and the buffer are host values, planned ahead of the device:
  :class:`fedjax_lite.systems.BufferedSchedule` (``in_flight``, ``version``, ``time_seconds``).
  """

  server: ServerState
  ring: Broadcast

  @property
  def version(self) -> jax.Array:
    return self.server.round_num

  @property
  def params(self) -> PyTree:
    return self.server.params


class FedBuff(NamedTuple):
  """FedBuff as ``(init, next)`` and its configuration (:func:`fed_buff`).

  Attributes:
    init: ``init(params, rng=None) -> FedBuffState`` (``rng`` keys version 0's broadcast encoder, if any).
    next: ``next(state, round_data, rng, versions) -> RoundOutput(state, metrics, None)``: ONE server step over
      the ``K`` arrivals packed in ``round_data`` (``[K, steps, batch, ...]``, slot ``k`` the ``k``-th arrival;
      padding slots allowed), ``versions`` int ``[K]`` the version each downloaded. Rows staler than
      ``max_staleness`` (or from the future) are treated as padding. Jittable; one shape, one compilation.
    bits_per_client: ``params -> (download, upload)``: the exact bits ONE client downloads and uploads.
    concurrency: clients training at once; buffer_size: ``K``; max_staleness: the staleness bound;
    staleness_weight: ``s(tau)``.
    parts: the FedAvg round's :class:`~fedjax_lite.algorithms.RoundParts` with the FedBuff client work.
    aggregator: the aggregator run over each buffer (its ``dp_event()`` is one server step's privacy event, for
      :func:`fedjax_lite.training.fed_buff_privacy`).
  """

  init: Callable[..., FedBuffState]
  next: Callable[..., RoundOutput]
  bits_per_client: Callable[[PyTree], tuple[int, int]]
  concurrency: int
  buffer_size: int
  max_staleness: int
  staleness_weight: StalenessWeight
  parts: Any
  aggregator: Any


def staleness_work(client_work: ClientWork) -> ClientWork:
  """FedBuff's client work: ``client_work`` (FedAvg's local training) from the client's own version, its update
  scaled by its staleness weight.

  The broadcast it receives is the ring of :class:`FedBuffState` (stacked versions); the client's data holds
  ``client_data['fedbuff'] = {'ring_row', 'staleness_weight'}``, the row of the version it downloaded and
  ``s(tau)``. The inner work sees the ordinary one-version broadcast and data without that entry.
  """

  def work(ring: Broadcast, client_data: PyTree, client_state: PyTree, rng: jax.Array):
    arrival = client_data[ARRIVALS]
    data = {key: value for key, value in client_data.items() if key != ARRIVALS}
    # the versions are stacked; the aggregators' broadcast (Broadcast.aggregator) is the current one, not stacked
    versions = jax.tree.map(lambda rows: rows[arrival["ring_row"]], ring._replace(aggregator=()))
    broadcast = versions._replace(aggregator=ring.aggregator)
    output = client_work(broadcast, data, client_state, rng)
    weight = arrival["staleness_weight"]
    return output._replace(update=jax.tree.map(lambda u: u * weight.astype(u.dtype), output.update))

  return work


def _check_staleness_weight(staleness_weight: Any, max_staleness: int) -> None:
  if not callable(staleness_weight):
    raise TypeError(f"staleness_weight must be a function staleness (int array) -> weights (float array), got "
                    f"{type(staleness_weight).__name__}.")
  staleness = np.arange(max_staleness + 1)
  weights = np.asarray(jax.device_get(staleness_weight(jnp.asarray(staleness, jnp.int32))))
  if weights.shape != staleness.shape or not np.issubdtype(weights.dtype, np.floating):
    raise ValueError(f"staleness_weight must map an int array of staleness values to float weights of the same "
                     f"shape; for staleness {staleness.tolist()[:4]}... it returned shape {weights.shape} and dtype "
                     f"{weights.dtype}.")
  if not np.all(np.isfinite(weights)) or np.any(weights < 0):
    bad = int(np.flatnonzero(~np.isfinite(weights) | (weights < 0))[0])
    raise ValueError(f"staleness_weight must be finite and >= 0 for every staleness in [0, max_staleness = "
                     f"{max_staleness}], got {weights[bad]} at staleness {bad}.")


def fed_buff(
    model: Model,
    *,
    concurrency: int,
    buffer_size: int,
    max_staleness: int,
    staleness_weight: StalenessWeight = inverse_sqrt_staleness,
    **options: Any,
) -> FedBuff:
  """Builds FedBuff (module docstring): FedAvg's round, its client work made asynchronous.

  Args:
    model: the model.
    concurrency: clients training at once (>= 1; the driver's :class:`fedjax_lite.systems.BufferedSchedule`).
    buffer_size: ``K``, client updates per server step (>= 1).
    max_staleness: arrivals staler than this are dropped (>= 0); the ring keeps ``max_staleness + 1`` versions.
      :func:`fedjax_lite.systems.default_max_staleness` gives ``4 * ceil(concurrency / K)``.
    staleness_weight: ``s(tau)``, a jax function from int staleness to float32 weights (default
      :func:`inverse_sqrt_staleness`); checked for ``tau in [0, max_staleness]``: finite and >= 0.
    **options: :func:`~fedjax_lite.algorithms.fed_avg`'s options (``FED_AVG_OPTIONS``): ``client_optimizer``,
      ``client_learning_rate`` (a schedule reads the downloaded version), ``server_optimizer``, ``weighting``,
      ``aggregator``, ``client_grad_clip_norm``, ``server_midpoint_fraction``, ``gradient_correction``,
      ``broadcast_encoder``, ``example_dp``, ``runner`` (not yet ``labels``, ``local_state``, ``local_phases``,
      ``upload_compressor``: a ``ValueError``).

  Returns:
    a :class:`FedBuff` ``(init, next, ...)``. Run it with :func:`fedjax_lite.training.run_fed_buff`, which plans
    the event order on the simulated clock and calls ``next`` once per server step.

  Example::

    process = fed_buff(model, concurrency=20, buffer_size=10, max_staleness=8, client_learning_rate=0.1,
                       weighting="uniform")
    state = process.init(params)
    state, metrics, _ = jax.jit(process.next)(state, round_data_of_10_arrivals, key, versions)
  """
  check_model(model)
  validation.check_int("concurrency", concurrency, minimum=1)
  validation.check_int("buffer_size", buffer_size, minimum=1)
  validation.check_int("max_staleness", max_staleness, minimum=0)
  _check_staleness_weight(staleness_weight, max_staleness)
  options = fed_avg_options("fed_buff", options, sets=("client_work_wrapper",))
  unsupported = sorted(name for name in ("labels", "local_state", "local_phases", "upload_compressor")
                       if options.get(name) not in (None, False))
  if unsupported:
    raise ValueError(f"fed_buff does not support fed_avg's {unsupported} yet (partial models, per-client local "
                     "state and compressed uploads with their residuals need the ring and the stale clients' states "
                     "handled); leave them unset.")
  round_process = fed_avg(model, client_work_wrapper=staleness_work, **options)
  parts = round_process.parts
  aggregator = resolve_aggregator(options.get("aggregator"), weighted=options.get("weighting", "num_examples")
                                  == "num_examples")
  encoder = options.get("broadcast_encoder")
  num_rows = max_staleness + 1

  def bits(params: PyTree) -> tuple[int, int]:
    server = jax.eval_shape(round_process.init, params)
    broadcast = jax.eval_shape(parts.distribute, server, jax.random.key(0))
    model_bits = None if encoder is None else int(encoder.bits(as_template(params)))
    return bits_per_client(aggregator, server.aggregator_state, broadcast, as_template(params),
                           model_broadcast_bits=model_bits)

  def init(params: PyTree, rng: jax.Array | None = None) -> FedBuffState:
    server = round_process.init(params)
    broadcast = parts.distribute(server, jax.random.key(0) if rng is None else rng)
    ring = jax.tree.map(lambda leaf: jnp.broadcast_to(leaf, (num_rows,) + jnp.shape(leaf)), broadcast)
    return place_on_mesh(FedBuffState(server=server, ring=ring), options.get("runner"))

  def next_fn(state: FedBuffState, round_data: PyTree, rng: jax.Array, versions: jax.Array) -> RoundOutput:
    if not isinstance(state, FedBuffState):
      raise TypeError(f"state must be a FedBuffState (from fed_buff(...).init), got {type(state).__name__}.")
    if not isinstance(round_data, dict) or "num_examples" not in round_data:
      raise ValueError("round_data must be a packed cohort dict with 'num_examples' (core.pack_clients).")
    num_slots = jnp.shape(round_data["num_examples"])[0]
    if jnp.shape(versions) != (num_slots,):
      raise ValueError(f"versions must hold one downloaded version per slot of round_data ({num_slots}), got shape "
                       f"{list(jnp.shape(versions))}.")
    server = state.server
    versions = jnp.asarray(versions, jnp.int32)
    staleness = server.round_num - versions
    applied = (staleness >= 0) & (staleness <= max_staleness) & (round_data["num_examples"] > 0)
    weights = jnp.where(applied, staleness_weight(jnp.where(applied, staleness, 0)), 0.0).astype(jnp.float32)
    round_data = {**round_data, "num_examples": jnp.where(applied, round_data["num_examples"], 0),
                  ARRIVALS: {"ring_row": jnp.mod(versions, num_rows), "staleness_weight": weights}}
    # 1. distributor: the ring holds every version a client may have downloaded.
    cohort = parts.work(server, state.ring, round_data, rng)                          # 2. client work, 3. aggregator
    new_server, finalizer_metrics = parts.finalize(server, cohort.aggregate)          # 4. finalizer
    new_broadcast = parts.distribute(new_server, jax.random.fold_in(rng, RING_STREAM))  # the new version's row
    ring = jax.tree.map(lambda rows, row: rows.at[new_server.round_num % num_rows].set(row), state.ring,
                        new_broadcast)
    num_applied = jnp.sum(applied, dtype=jnp.int32)
    real_staleness = jnp.where(applied, staleness, 0)
    download, upload = bits(server.params)
    metrics = {
        "distributor": {},
        "client_work": cohort.metrics,
        "aggregator": cohort.aggregate.measurements,
        "finalizer": finalizer_metrics,
        **round_bits(download, upload, round_data),
        "fedbuff": {"mean_staleness": jnp.sum(real_staleness).astype(jnp.float32) / jnp.maximum(num_applied, 1),
                    "max_staleness": jnp.max(real_staleness), "num_applied": num_applied,
                    "version": new_server.round_num},
    }
    return RoundOutput(state=FedBuffState(server=new_server, ring=ring), metrics=metrics, client_states=None)

  return FedBuff(init=init, next=next_fn, bits_per_client=bits, concurrency=concurrency, buffer_size=buffer_size,
                 max_staleness=max_staleness, staleness_weight=staleness_weight, parts=parts,
                 aggregator=aggregator)
