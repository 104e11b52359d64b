"""Estimation processes: a server-side estimate that clients help update each round (TFF ``EstimationProcess``).

The norm-bounding wrappers (zeroing, clipping, secure-sum bounds, adaptive DP clipping) take their threshold from an
:class:`EstimationProcess`. Like a sum-based aggregator it is split into what the clients send and what the server
does with the sum:

* ``init() -> state``; ``report(state) -> estimate`` (the value used this round);
* ``broadcast(state) -> client_params``; ``client(client_params, x, rng) -> record`` for a client's scalar ``x``
  (e.g. its update norm); ``server(state, summed_records, rng) -> state``.

Quantile estimation (Andrew, Thakkar, McMahan & Ramaswamy 2021, "Differentially Private Learning with Adaptive
Clipping", arXiv:1905.03871; TFF ``PrivateQuantileEstimationProcess`` over tf-privacy's quantile queries). With the
current estimate ``C``, target quantile ``q`` and learning rate ``eta``, each client sends
``b_i = 1[x_i <= C] - 1/2`` (an inclusive comparison; the shift gives sensitivity 1/2). The server forms the
fraction below the estimate

* no noise: ``b = sum_i b_i / n + 1/2`` with the exact number of clients ``n`` (sent as a record of 1);
* private: ``b = (sum_i b_i + N(0, sigma_b^2)) / m + 1/2`` with the FIXED expected number of records ``m``;

clamps it, ``b <- min(1, max(0, b))``, and updates ``C <- C * exp(-eta * (b - q))`` (geometric) or
``C <- C - eta * (b - q)`` (arithmetic). The no-noise estimator always updates geometrically and reports
``multiplier * C + increment`` while its state tracks the raw quantile ``C``. A round with no clients leaves ``C``
unchanged (there is nothing to estimate from; the reference would divide by zero).

The state is ``QuantileEstimatorState(current_estimate, target_quantile, learning_rate)`` (float32 scalars), with
the record sum's state beside it as in the reference's ``(query_state, agg_state)``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_lite.aggregators.base import SUM, Aggregator
from fedjax_lite.aggregators.estimation import EstimationProcess
from fedjax_lite.aggregators.secure import secure_sum
from fedjax_lite.aggregators.sum import sum_aggregator
from fedjax_lite.aggregators.wrapping import Inner
from fedjax_lite.core import validation
from fedjax_lite.privacy.mechanisms import gaussian_noise


class QuantileEstimatorState(NamedTuple):
  """The quantile estimator's own state (TFF's ``_GlobalState``): all float32 scalars."""

  current_estimate: jax.Array
  target_quantile: jax.Array
  learning_rate: jax.Array


def _check_quantile_arguments(initial_estimate, target_quantile, learning_rate) -> None:
  validation.check_positive("initial_estimate", initial_estimate)
  validation.check_float("target_quantile", target_quantile, low=0.0, high=1.0)
  validation.check_positive("learning_rate", learning_rate)


def _updated_estimate(state: QuantileEstimatorState, below_fraction: jax.Array, geometric: bool) -> jax.Array:
  below_fraction = jnp.clip(below_fraction, 0.0, 1.0)
  step = below_fraction - state.target_quantile
  if geometric:
    return state.current_estimate * jnp.exp(-state.learning_rate * step)
  return state.current_estimate - state.learning_rate * step


def _record(estimate: jax.Array, x: jax.Array) -> jax.Array:
  """``1[x <= estimate] - 1/2`` as float32 (inclusive)."""
  return jnp.where(jnp.asarray(x, jnp.float32) <= estimate, 0.5, -0.5).astype(jnp.float32)


def _require_sum(record_sum: Aggregator | None) -> Aggregator:
  record_sum = sum_aggregator() if record_sum is None else record_sum
  if not isinstance(record_sum, Aggregator) or record_sum.combine != SUM:
    raise TypeError("record_sum must be a sum-based Aggregator (e.g. sum_aggregator() or secure_sum(...)).")
  return record_sum


def _estimator_parts(initial_estimate, target_quantile, learning_rate, record_sum: Inner):
  """``(init, broadcast)`` shared by the estimators: the state ``(query state, record sum state)`` and the client
  parameters ``(current estimate, record sum parameters)``."""

  def init():
    query_state = QuantileEstimatorState(
        current_estimate=jnp.asarray(initial_estimate, jnp.float32),
        target_quantile=jnp.asarray(target_quantile, jnp.float32),
        learning_rate=jnp.asarray(learning_rate, jnp.float32),
    )
    return (query_state, record_sum.init())

  def broadcast(state):
    return (state[0].current_estimate, record_sum.broadcast(state[1]))

  return init, broadcast


def no_noise_quantile_estimator(
    initial_estimate: float,
    target_quantile: float,
    learning_rate: float,
    *,
    multiplier: float = 1.0,
    increment: float = 0.0,
    secure_estimation: bool = False,
) -> EstimationProcess:
  """Quantile estimation without noise, geometric update; reports ``multiplier * C + increment``.

  TFF ``PrivateQuantileEstimationProcess.no_noise``. With ``secure_estimation`` the records are summed with the
  simulated secure sum (float mode, bounds ``[-1, 1]``), as the reference does.

  Args:
    initial_estimate: ``C_0 > 0``.
    target_quantile: ``q`` in ``[0, 1]``.
    learning_rate: ``eta > 0`` (each round moves ``C`` by a factor of at most ``exp(eta)``).
    multiplier: ``> 0``, scales the reported value.
    increment: ``>= 0``, added to the reported value.
    secure_estimation: sum records with secure summation.
  """
  _check_quantile_arguments(initial_estimate, target_quantile, learning_rate)
  validation.check_positive("multiplier", multiplier)
  validation.check_float("increment", increment, low=0.0)
  if not isinstance(secure_estimation, bool):
    raise TypeError(f"secure_estimation must be a bool, got {type(secure_estimation).__name__}.")
  record_template = {"below": jax.ShapeDtypeStruct((), jnp.float32), "count": jax.ShapeDtypeStruct((), jnp.float32)}
  # The record sum keeps the estimator's keys.
  record_sum = Inner(secure_sum(1.0, -1.0) if secure_estimation else sum_aggregator(), template=record_template)
  init, broadcast = _estimator_parts(initial_estimate, target_quantile, learning_rate, record_sum)

  def report(state):
    return jnp.asarray(multiplier, jnp.float32) * state[0].current_estimate + jnp.asarray(increment, jnp.float32)

  def client(client_params, x, rng):
    estimate, sum_params = client_params
    record = {"below": _record(estimate, x), "count": jnp.ones((), jnp.float32)}
    return record_sum.client(sum_params, record, jnp.ones((), jnp.float32), rng)

  def server(state, records, rng, context):
    query_state, sum_state = state
    summed = record_sum.server(sum_state, records, rng, context)
    count = summed.result["count"]
    below_fraction = summed.result["below"] / jnp.maximum(count, 1.0) + 0.5
    new_estimate = jnp.where(count > 0, _updated_estimate(query_state, below_fraction, geometric=True),
                             query_state.current_estimate)
    return (query_state._replace(current_estimate=new_estimate), summed.state)

  return EstimationProcess(init=init, report=report, broadcast=broadcast, client=client, server=server,
                           upload_bits=record_sum.upload_bits(record_template))


def private_quantile_estimator(
    initial_estimate: float,
    target_quantile: float,
    learning_rate: float,
    below_estimate_stddev: float,
    expected_num_records: float,
    *,
    geometric_update: bool = True,
    record_sum: Aggregator | None = None,
) -> EstimationProcess:
  """Differentially private quantile estimation (tf-privacy ``QuantileEstimatorQuery``).

  ``b = clamp((sum_i b_i + N(0, sigma_b^2)) / m + 1/2)``, with the fixed expected number of records ``m``; the
  count has sensitivity 1/2, so one round is a Gaussian mechanism with noise multiplier ``2 * sigma_b``.
  Recommended (Andrew et al.): ``eta = 0.2`` geometric, ``sigma_b = m / 20``.

  Args:
    initial_estimate: ``C_0 > 0``.
    target_quantile: ``q`` in ``[0, 1]``.
    learning_rate: ``eta > 0``.
    below_estimate_stddev: ``sigma_b >= 0``.
    expected_num_records: ``m > 0``.
    geometric_update: geometric (default) or arithmetic update.
    record_sum: sum-based aggregator for the records (default the plain sum).
  """
  _check_quantile_arguments(initial_estimate, target_quantile, learning_rate)
  validation.check_float("below_estimate_stddev", below_estimate_stddev, low=0.0)
  validation.check_positive("expected_num_records", expected_num_records)
  if not isinstance(geometric_update, bool):
    raise TypeError(f"geometric_update must be a bool, got {type(geometric_update).__name__}.")
  # Keys: the record sum fold_in(rng, 0), the noise 1.
  record_template = jax.ShapeDtypeStruct((), jnp.float32)
  record_sum = Inner(_require_sum(record_sum), key=0, template=record_template)
  noise_key = 1
  init, broadcast = _estimator_parts(initial_estimate, target_quantile, learning_rate, record_sum)

  def client(client_params, x, rng):
    estimate, sum_params = client_params
    return record_sum.client(sum_params, _record(estimate, x), jnp.ones((), jnp.float32), rng)

  def server(state, records, rng, context):
    query_state, sum_state = state
    summed = record_sum.server(sum_state, records, rng, context)
    noise = gaussian_noise(jax.random.fold_in(rng, noise_key), jax.ShapeDtypeStruct((), jnp.float32),
                           below_estimate_stddev)
    below_fraction = (summed.result + noise) / jnp.asarray(expected_num_records, jnp.float32) + 0.5
    new_estimate = _updated_estimate(query_state, below_fraction, geometric=geometric_update)
    return (query_state._replace(current_estimate=new_estimate), summed.state)

  def dp_event():
    import dp_accounting

    return dp_accounting.GaussianDpEvent(2.0 * float(below_estimate_stddev))

  return EstimationProcess(init=init, report=lambda state: state[0].current_estimate, broadcast=broadcast,
                           client=client, server=server, upload_bits=record_sum.upload_bits(record_template),
                           dp_event=dp_event)
