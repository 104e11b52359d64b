"""Federated and centralized evaluation of a model (TFF ``build_fed_eval``; per-client metrics, TFF issue #2110).

:func:`evaluate_clients` runs the model in inference mode over every client of a packed round and returns both
the example-weighted aggregate over all real examples (sum then finalize, as the reference) and every client's own
metrics. :func:`centralized_evaluation` evaluates a centralized dataset (e.g. the held-out test split) in batches
with the same machinery, the dataset packed as one client. :func:`fairness_metrics` summarizes the per-client
results on the host: the distribution of a metric over clients (q-FFL's fairness measures, Li et al. 2020).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax
import numpy as np

from fedjax_lite.algorithms.local_training import split_steps, step_batch, zero_metric_sums
from fedjax_lite.core import validation
from fedjax_lite.core.model import Model, finalize_metric_sums, masked_loss_and_metric_sums
from fedjax_lite.core.packing import pack_centralized
from fedjax_lite.core.runner import Runner, run_clients
from fedjax_lite.core.tree import PyTree


def client_metric_sums(model: Model, params: PyTree, client_data: PyTree) -> dict[str, jax.Array]:
  """Sums of loss and metrics over one client's real examples, in inference mode (a rolled loop over batches)."""
  steps, num_steps = split_steps(client_data)

  def body(step, sums):
    batch = step_batch(steps, step)
    mask = batch.pop("mask")
    _, batch_sums = masked_loss_and_metric_sums(model, params, batch, mask, None, False)
    return {key: sums[key] + batch_sums[key] for key in batch_sums} | {"num_batches": sums["num_batches"] + 1}

  return jax.lax.fori_loop(0, num_steps, body, zero_metric_sums(model))


def evaluate_clients(
    model: Model, params: PyTree, round_data: PyTree, *, runner: Runner | None = None
) -> dict[str, dict[str, jax.Array]]:
  """Evaluates ``params`` on every client of ``round_data``.

  Returns:
    ``{'aggregate': {loss, <metrics>, num_examples, num_batches}, 'per_client': {same keys, each [clients]}}``.
    The aggregate is example-weighted over all real examples; per-client entries of padding slots have
    ``num_examples == 0`` and NaN means.
  """

  def per_client(params, client_data, rng):
    sums = client_metric_sums(model, params, client_data)
    return sums, sums

  totals, per_client_sums = run_clients(per_client, params, round_data, jax.random.key(0), runner=runner)
  return {"aggregate": finalize_metric_sums(totals), "per_client": finalize_metric_sums(per_client_sums)}


def federated_evaluation(model: Model, *, runner: Runner | None = None) -> Callable[[PyTree, PyTree], dict]:
  """A jitted ``(params, round_data) -> metrics`` computing :func:`evaluate_clients`."""
  if not isinstance(model, Model):
    raise TypeError(f"model must be a fedjax_lite Model, got {type(model).__name__}.")
  return jax.jit(lambda params, round_data: evaluate_clients(model, params, round_data, runner=runner))


def centralized_evaluation(model: Model, *, batch_size: int = 256) -> Callable[[PyTree, Mapping], dict]:
  """``(params, examples) -> {loss, <metrics>, num_examples, num_batches}`` over a centralized dataset.

  The examples (a dict of numpy arrays, e.g. the test split) are packed on the host into batches of
  ``batch_size`` (the step axis bucketed to a power of two, so a few shapes compile) and evaluated in one jitted
  program.
  """
  if not isinstance(model, Model):
    raise TypeError(f"model must be a fedjax_lite Model, got {type(model).__name__}.")
  validation.check_int("batch_size", batch_size, minimum=1)
  evaluate = federated_evaluation(model, runner=Runner(strategy="sequential"))

  def run(params: PyTree, examples: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    packed = pack_centralized(dict(examples), batch_size=batch_size)
    return evaluate(params, packed)["aggregate"]

  return run


def fairness_metrics(per_client: Mapping[str, Any], *, metric: str = "accuracy", fraction: float = 0.1
                     ) -> dict[str, float | int]:
  """The distribution of one metric over clients, from :func:`evaluate_clients`' ``per_client`` (on the host).

  The fairness measures of Li et al. 2020 ("Fair Resource Allocation in Federated Learning", ICLR, Table 1): over
  the ``n`` clients with examples (``num_examples > 0``; padding slots are left out) with values ``a_1..a_n``,

  * ``mean``: ``(1/n) sum_k a_k`` (every client counts once, whatever its size);
  * ``variance``: ``(1/n) sum_k (a_k - mean)^2`` (the population variance, NumPy's ``var``);
  * ``worst_<P>pct`` / ``best_<P>pct`` (``P = 100 fraction``, e.g. ``worst_10pct``): the mean of the
    ``m = max(1, ceil(fraction n))`` lowest / highest values;
  * ``num_clients``: ``n``.

  Vectorized NumPy over the clients (one sort), no per-client Python loop.

  Args:
    per_client: ``{metric: [clients], 'num_examples': [clients], ...}`` (arrays or lists).
    metric: the key to summarize (default ``'accuracy'``).
    fraction: the tails' share of the clients, in ``(0, 0.5]``.

  Raises:
    ValueError: no client has examples, or a client with examples has a non-finite value (named).
  """
  if not isinstance(per_client, Mapping):
    raise TypeError(f"per_client must be a dict of per-client arrays (evaluate_clients(...)['per_client']), got "
                    f"{type(per_client).__name__}.")
  for key in (metric, "num_examples"):
    if key not in per_client:
      raise ValueError(f"per_client has no {key!r} (it has {sorted(per_client)}).")
  validation.check_float("fraction", fraction, low=0.0, high=0.5, low_inclusive=False)
  values = np.asarray(per_client[metric], np.float64)
  counts = np.asarray(per_client["num_examples"])
  if values.ndim != 1 or values.shape != counts.shape:
    raise ValueError(f"per_client[{metric!r}] and per_client['num_examples'] must be [clients] arrays of one shape, "
                     f"got {values.shape} and {counts.shape}.")
  real = counts > 0
  if not real.any():
    raise ValueError("no client has examples (num_examples > 0): there is no distribution to summarize.")
  bad = np.flatnonzero(real & ~np.isfinite(values))
  if bad.size:
    raise ValueError(f"per_client[{metric!r}] is not finite for the clients with examples at slots "
                     f"{bad[:5].tolist()}: values {values[bad[:5]].tolist()}.")
  ordered = np.sort(values[real])
  n = ordered.shape[0]
  tail = max(1, math.ceil(round(fraction * n, 9)))
  label = f"{100 * fraction:g}".replace(".", "_")
  return {"mean": float(np.mean(ordered)), "variance": float(np.var(ordered)),
          f"worst_{label}pct": float(np.mean(ordered[:tail])), f"best_{label}pct": float(np.mean(ordered[-tail:])),
          "num_clients": int(n)}
