"""The estimation-process contract: a server-side estimate (a threshold, a bound) updated each round from one scalar
record per client. Aggregators that take a threshold (zeroing, clipping, the secure sum's bounds, adaptive DP
clipping) accept a fixed float or an :class:`EstimationProcess`; the quantile estimators that implement it live in
:mod:`fedjax_lite.aggregators.quantile_estimation`. This module sits at the bottom of the aggregators package so
that both the secure sum and the estimators can import it.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_lite.core import validation
from fedjax_lite.core.tree import PyTree


class EstimationProcess(NamedTuple):
  """A server estimate updated from clients' scalar records; see the module docstring.

  Attributes:
    init: ``() -> state``.
    report: ``state -> estimate`` (float32 scalar), the value used in the current round.
    broadcast: ``state -> client_params``.
    client: ``(client_params, x, rng) -> record`` for one client's float32 scalar ``x``.
    server: ``(state, summed_records, rng, context) -> state``; ``context`` is the calling aggregator's
      :class:`~fedjax_lite.aggregators.base.AggregationContext` (its ``num_client_slots`` sizes a secure sum of
      the records).
    upload_bits: bits of one client's record.
    dp_event: for private estimation, ``() -> dp_accounting.DpEvent`` of one round's noisy count; else None.
  """

  init: Callable[[], PyTree]
  report: Callable[[PyTree], jax.Array]
  broadcast: Callable[[PyTree], PyTree]
  client: Callable[[PyTree, jax.Array, jax.Array], PyTree]
  server: Callable[[PyTree, PyTree, jax.Array, Any], PyTree]
  upload_bits: int = 0
  dp_event: Callable[[], Any] | None = None


def constant_estimate(value: float | jax.Array) -> EstimationProcess:
  """A fixed threshold as an estimation process: state ``()``, reports ``value``, clients send nothing."""
  validation.check_float("value", value)
  return EstimationProcess(
      init=lambda: (),
      report=lambda state: jnp.asarray(value, jnp.float32),
      broadcast=lambda state: (),
      client=lambda client_params, x, rng: (),
      server=lambda state, records, rng, context: state,
  )


def as_estimation_process(norm: float | EstimationProcess, name: str) -> EstimationProcess:
  """A float (a fixed norm > 0) or an :class:`EstimationProcess`, as an :class:`EstimationProcess`."""
  if isinstance(norm, EstimationProcess):
    return norm
  if isinstance(norm, bool) or not (isinstance(norm, (int, float)) or validation.is_traced(norm)
                                    or hasattr(norm, "dtype")):
    raise TypeError(f"{name} must be a positive float or an EstimationProcess, got {type(norm).__name__}.")
  validation.check_positive(name, norm)
  return constant_estimate(norm)
