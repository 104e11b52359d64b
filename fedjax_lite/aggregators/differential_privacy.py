"""User-level differential privacy by the Gaussian mechanism (TFF ``DifferentiallyPrivateFactory``).

DP-FedAvg (McMahan, Ramage, Talwar & Zhang 2018, "Learning Differentially Private Recurrent Language Models",
arXiv:1710.06963) with fixed or adaptive clipping (Andrew et al. 2021, arXiv:1905.03871). Unweighted: weights are
ignored. With clip ``C_t`` and ``m`` the FIXED expected number of clients per round:

* each client sends ``clip_C(x_i) = x_i * min(1, C / ||x_i||_2)`` (global L2 norm over all leaves);
* the server returns ``(sum_i clip_C(x_i) + N(0, (z C)^2 I)) / m`` -- divided by ``m`` even when the actual count
  differs (Poisson sampling), as the reference; that keeps the sensitivity at ``C / m``.

Adaptive clipping (:func:`gaussian_adaptive`) also estimates the ``target_unclipped_quantile`` of the clients'
UNCLIPPED norms with the private quantile estimator: clients add ``b_i = 1[||x_i|| <= C_t] - 1/2``; the server
takes ``b = clamp((sum b_i + N(0, sigma_b^2)) / m + 1/2)`` and ``C_{t+1} = C_t exp(-eta (b - gamma))``; the
value noise ``z_v`` and count noise ``sigma_b`` are split so the round is a Gaussian mechanism with total noise
multiplier ``z``: ``1/z^2 = 1/z_v^2 + 1/(2 sigma_b)^2`` (:func:`adaptive_clip_noise_params`).

Every round is one privacy event: ``aggregator.dp_event()`` gives its ``dp_accounting`` ``DpEvent`` (fixed:
``GaussianDpEvent(z)``; adaptive: ``ComposedDpEvent([GaussianDpEvent(z_v), GaussianDpEvent(2 sigma_b)])``), and
:func:`extract_dp_event` returns it from a state that has completed at least one round, as the reference does.
State ``{'query_state': ..., 'agg_state': ..., 'is_init_state': bool}``; measurements
``{'dp_query_metrics': {} or {'clip': C_{t+1}}, 'dp': <record sum measurements>}``.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp

from fedjax_lite.aggregators.base import Aggregator
from fedjax_lite.aggregators.estimation import EstimationProcess, constant_estimate
from fedjax_lite.aggregators.quantile_estimation import private_quantile_estimator
from fedjax_lite.aggregators.robust import clip_to, global_norm
from fedjax_lite.aggregators.sum import sum_aggregator
from fedjax_lite.aggregators.wrapping import Inner, total_upload_bits
from fedjax_lite.core import validation
from fedjax_lite.core.process import MeasuredOutput
from fedjax_lite.core.tree import PyTree
from fedjax_lite.privacy.mechanisms import gaussian_noise


class ExtractingDpEventFromInitialStateError(ValueError):
  """Raised when the privacy event of a round is asked of a state that has not completed a round."""


def adaptive_clip_noise_params(
    noise_multiplier: float, expected_clients_per_round: float, clipped_count_stddev: float | None = None
) -> tuple[float, float]:
  """Splits the total noise multiplier ``z`` into ``(value_noise_multiplier, clipped_count_stddev)``.

  For ``z > 0``: ``sigma_b`` defaults to ``0.05 m``; it must satisfy ``z < 2 sigma_b``; then
  ``z_v = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` (Gaussian composition). Warns when ``z_v / z >= 2`` (the count noise
  then costs much of the budget). For ``z = 0``: ``z_v = 0`` and ``sigma_b = 0`` unless given.
  """
  validation.check_float("noise_multiplier", noise_multiplier, low=0.0)
  validation.check_positive("expected_clients_per_round", expected_clients_per_round)
  validation.check_float("clipped_count_stddev", clipped_count_stddev, low=0.0, allow_none=True)
  if noise_multiplier > 0:
    stddev = 0.05 * expected_clients_per_round if clipped_count_stddev is None else float(clipped_count_stddev)
    if noise_multiplier >= 2 * stddev:
      raise ValueError(
          f"noise_multiplier ({noise_multiplier}) must be < 2 * clipped_count_stddev ({2 * stddev}); the "
          "clipped-count noise alone would exceed the total noise. Raise clipped_count_stddev (default "
          "0.05 * expected_clients_per_round) or expected_clients_per_round.")
    value_noise = (noise_multiplier ** -2 - (2 * stddev) ** -2) ** -0.5
    if value_noise / noise_multiplier >= 2:
      warnings.warn(f"The value noise multiplier {value_noise:.3g} is at least twice the total {noise_multiplier}: "
                    "the clipped-count estimate uses much of the privacy budget.", stacklevel=2)
    return float(value_noise), float(stddev)
  return 0.0, 0.0 if clipped_count_stddev is None else float(clipped_count_stddev)


def _gaussian_dp(value_noise_multiplier: float, clients_per_round: float, clip: EstimationProcess,
                 dp_event, report_clip: bool, correlated_noise=None) -> Aggregator:
  """The DP sum query: clip to ``report(clip_state)``, add ``N(0, (z_v C)^2)``, divide by ``m``.

  With ``correlated_noise`` (a ``privacy.matrix_factorization.NoiseGenerator`` of ``C^{-1}``), the noise is row
  ``t`` of ``z_v C_t (C^{-1} Z)``: the round's unit normals ``Z_t`` (the very draw the Gaussian mechanism scales)
  pass through the generator, whose state (``'noise_state'``) carries the correlation across rounds.
  """
  # Keys: the record sum fold_in(rng, 0), the value noise 1, the clip estimator 2.
  record_sum = Inner(sum_aggregator(), key=0)
  clip_part = Inner(clip, key=2)
  noise_key = 1

  def init(value_template):
    state = {"query_state": clip_part.init(), "agg_state": record_sum.init(value_template),
             "is_init_state": jnp.asarray(True)}
    if correlated_noise is not None:
      zeros = jax.tree.map(lambda t: jnp.zeros(jnp.shape(t), jnp.float32), value_template)
      state["noise_state"] = correlated_noise.init(zeros)
    return state

  def broadcast(state):
    return (clip.report(state["query_state"]), clip_part.broadcast(state["query_state"]))

  def client(client_params, value, weight, rng):
    clip_norm, clip_params = client_params
    norm = global_norm(value, 2.0)
    return {"value": record_sum.client((), clip_to(value, norm, clip_norm), weight, rng),
            "clip_record": clip_part.client(clip_params, norm, rng)}

  def server(state, total, rng, context):
    clip_norm = clip.report(state["query_state"])
    summed = record_sum.server(state["agg_state"], total["value"], rng, context)
    stddev = jnp.asarray(value_noise_multiplier, jnp.float32) * clip_norm
    new_state = {}
    if correlated_noise is None:
      noise = gaussian_noise(jax.random.fold_in(rng, noise_key), summed.result, stddev)
    else:
      unit = gaussian_noise(jax.random.fold_in(rng, noise_key), summed.result, 1.0)
      correlated, new_state["noise_state"] = correlated_noise.next(unit, state["noise_state"])
      noise = jax.tree.map(lambda c, leaf: (c * stddev.astype(c.dtype)).astype(leaf.dtype), correlated,
                           summed.result)
    noised = jax.tree.map(jnp.add, summed.result, noise)
    result = jax.tree.map(lambda leaf: leaf / jnp.asarray(clients_per_round, leaf.dtype), noised)
    query_state = clip_part.server(state["query_state"], total["clip_record"], rng, context)
    metrics = {"clip": clip.report(query_state)} if report_clip else {}
    return MeasuredOutput(
        state={"query_state": query_state, "agg_state": summed.state, "is_init_state": jnp.asarray(False),
               **new_state},
        result=result,
        measurements={"dp_query_metrics": metrics, "dp": summed.measurements},
    )

  return Aggregator(init, broadcast, client, server, upload_bits=total_upload_bits((record_sum, clip_part)),
                    dp_event=dp_event)


def gaussian_event(noise_multiplier: float) -> Callable[[], Any]:
  """``dp_event`` of a round with a fixed clip: ``GaussianDpEvent(z)``."""

  def dp_event():
    import dp_accounting

    return dp_accounting.GaussianDpEvent(float(noise_multiplier))

  return dp_event


def adaptive_clip(noise_multiplier: float, clients_per_round: float, initial_l2_norm_clip: float,
                  target_unclipped_quantile: float, learning_rate: float, clipped_count_stddev: float | None
                  ) -> tuple[float, EstimationProcess, Callable[[], Any]]:
  """``(z_v, clip estimator, dp_event)`` of adaptive clipping (Andrew et al. 2021), shared by the Gaussian and the
  matrix-factorization DP means.

  ``z`` splits into the value noise ``z_v`` and the clipped count's ``sigma_b`` (:func:`adaptive_clip_noise_params`);
  the clip is the private quantile estimator's (geometric update, ``m`` expected records); one round is the
  composition ``[GaussianDpEvent(z_v), GaussianDpEvent(2 sigma_b)]`` (``NonPrivateDpEvent`` for ``z = 0``).
  """
  value_noise, count_stddev = adaptive_clip_noise_params(noise_multiplier, clients_per_round, clipped_count_stddev)
  estimator = private_quantile_estimator(initial_l2_norm_clip, target_unclipped_quantile, learning_rate,
                                         count_stddev, clients_per_round, geometric_update=True)

  def dp_event():
    import dp_accounting

    if noise_multiplier == 0:
      return dp_accounting.NonPrivateDpEvent()
    return dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(value_noise),
                                          dp_accounting.GaussianDpEvent(2.0 * count_stddev)])

  return value_noise, estimator, dp_event


def gaussian_fixed(noise_multiplier: float, clients_per_round: float, clip: float) -> Aggregator:
  """DP mean with a fixed clip: ``(sum_i clip_C(x_i) + N(0, (z C)^2 I)) / m``; event ``GaussianDpEvent(z)``.

  Args:
    noise_multiplier: ``z >= 0``.
    clients_per_round: ``m > 0``, the fixed normalizer (expected clients per round).
    clip: ``C > 0``, the L2 clip of each client's value.
  """
  validation.check_float("noise_multiplier", noise_multiplier, low=0.0)
  validation.check_positive("clients_per_round", clients_per_round)
  validation.check_positive("clip", clip)
  return _gaussian_dp(noise_multiplier, clients_per_round, constant_estimate(clip), gaussian_event(noise_multiplier),
                      report_clip=False)


def gaussian_adaptive(
    noise_multiplier: float,
    clients_per_round: float,
    *,
    initial_l2_norm_clip: float = 0.1,
    target_unclipped_quantile: float = 0.5,
    learning_rate: float = 0.2,
    clipped_count_stddev: float | None = None,
) -> Aggregator:
  """DP mean with the clip adapted to a quantile of the unclipped norms (Andrew et al. 2021); defaults as TFF.

  Args:
    noise_multiplier: total ``z >= 0``, split between the value and the clipped count.
    clients_per_round: ``m > 0``, the fixed normalizer and the quantile estimator's expected record count.
    initial_l2_norm_clip: ``C_0 > 0``.
    target_unclipped_quantile: ``gamma`` in ``[0, 1]``.
    learning_rate: ``eta > 0`` of the geometric update.
    clipped_count_stddev: ``sigma_b``; default ``0.05 m`` when ``z > 0``.
  """
  value_noise, estimator, dp_event = adaptive_clip(noise_multiplier, clients_per_round, initial_l2_norm_clip,
                                                   target_unclipped_quantile, learning_rate, clipped_count_stddev)
  return _gaussian_dp(value_noise, clients_per_round, estimator, dp_event, report_clip=True)


def extract_dp_event(aggregator: Aggregator, state: PyTree):
  """The ``dp_accounting`` event of one round of ``aggregator``, given a state after at least one round.

  Raises:
    ValueError: if ``aggregator`` is not differentially private.
    ExtractingDpEventFromInitialStateError: if ``state`` is the initial state (no round has run).
  """
  if not isinstance(aggregator, Aggregator) or aggregator.dp_event is None:
    raise ValueError("aggregator has no privacy event: it is not a differentially private aggregator.")
  flags = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
           if any(getattr(entry, "key", None) == "is_init_state" for entry in path)]
  if not flags:
    raise ValueError("state holds no DP aggregator state ('is_init_state' not found).")
  if any(bool(flag) for flag in flags):
    raise ExtractingDpEventFromInitialStateError(
        "the state is the initial state: no round has run yet, so there is no privacy event to extract.")
  return aggregator.dp_event()
