"""Federated and centralized evaluation of a model (TFF ``build_fed_eval``; per-client metrics, TFF issue #2110).

:func:`evaluate_clients` runs the model in inference mode over every client of a packed round and returns both
the example-weighted aggregate over all real examples (sum then finalize, as the reference) and every client's own
metrics. :func:`centralized_evaluation` evaluates a centralized dataset (e.g. the held-out test split) in batches
with the same machinery, the dataset packed as one client. :func:`client_distribution` summarizes per-client
metrics as a distribution over clients (the mean client and the worst 10%), as personalization is reported;
:func:`fairness_metrics` adds, on the host, the variance and the best 10% (q-FFL's fairness measures, Li et al.
2020).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
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


def client_distribution(per_client: Mapping[str, jax.Array], *, worst_percent: int = 10,
                        lower_is_better: tuple[str, ...] = ("loss",)) -> dict[str, dict[str, jax.Array]]:
  """Per-client metrics (``[slots]``, from :func:`evaluate_clients`' ``per_client``) as a distribution over the
  REAL clients (``num_examples > 0``; padding slots and clients without examples are left out), each client
  counting once whatever its size.

  For every metric but the counters: ``{'client_mean': the unweighted mean over clients, 'worst_<p>_percent': the
  mean over the worst ceil(p% of the clients) (at least one)}``, where worst means highest for the metrics in
  ``lower_is_better`` (the loss) and lowest for the others (accuracy); plus ``'num_clients'``. NaN with no real
  client. Jittable (the count of clients is traced; the ranking is a sort).
  """
  validation.check_int("worst_percent", worst_percent, minimum=1)
  if worst_percent > 100:
    raise ValueError(f"worst_percent must be in [1, 100], got {worst_percent}.")
  real = jnp.asarray(per_client["num_examples"]) > 0
  count = jnp.sum(real, dtype=jnp.int32)
  worst_count = jnp.maximum((count * worst_percent + 99) // 100, 1)  # ceil(p% of the clients), exactly
  ranks = jnp.arange(real.shape[0])
  out: dict = {"num_clients": count}
  for name, values in per_client.items():
    if name.startswith("num_"):
      continue
    values = jnp.asarray(values, jnp.float32)
    worst_first = values if name not in lower_is_better else -values  # the worst value sorts first
    ordered = jnp.sort(jnp.where(real, worst_first, jnp.inf))
    worst = jnp.sum(jnp.where(ranks < worst_count, ordered, 0.0)) / worst_count.astype(jnp.float32)
    worst = worst if name not in lower_is_better else -worst
    mean = jnp.sum(jnp.where(real, values, 0.0)) / count.astype(jnp.float32)
    out[name] = {"client_mean": jnp.where(count > 0, mean, jnp.nan),
                 f"worst_{worst_percent}_percent": jnp.where(count > 0, worst, jnp.nan)}
  return out


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


def fairness_metrics(per_client: Mapping[str, Any], *, metric: str = "accuracy", percent: int = 10
                     ) -> dict[str, float | int]:
  """The distribution of one metric over clients, from :func:`evaluate_clients`' ``per_client`` (on the host).

  The fairness measures of Li et al. 2020 ("Fair Resource Allocation in Federated Learning", ICLR, Table 1): over
  the ``n`` clients with examples (``num_examples > 0``; padding slots are left out) with values ``a_1..a_n``,

  * ``client_mean``: ``(1/n) sum_k a_k`` (every client counts once, whatever its size);
  * ``variance``: ``(1/n) sum_k (a_k - mean)^2`` (the population variance, NumPy's ``var``, in float64);
  * ``worst_<p>_percent`` / ``best_<p>_percent``: the mean of the ``m = max(1, ceil(p n / 100))`` lowest / highest
    values (:func:`client_distribution`'s worst share, and the same from the other end);
  * ``num_clients``: ``n``.

  Vectorized (one sort per tail), no per-client Python loop.

  Args:
    per_client: ``{metric: [clients], 'num_examples': [clients], ...}`` (arrays or lists).
    metric: the key to summarize (default ``'accuracy'``); higher is better.
    percent: the tails' share of the clients, an int in ``[1, 50]``.

  Raises:
    ValueError: no client has examples, or a client with examples has a non-finite value (named).
  """
  if not isinstance(per_client, Mapping):
    raise TypeError(f"per_client must be a dict of per-client arrays (evaluate_clients(...)['per_client']), got "
                    f"{type(per_client).__name__}.")
  for key in (metric, "num_examples"):
    if key not in per_client:
      raise ValueError(f"per_client has no {key!r} (it has {sorted(per_client)}).")
  validation.check_int("percent", percent, minimum=1, maximum=50)
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
  one = {metric: values, "num_examples": counts}
  low = client_distribution(one, worst_percent=percent, lower_is_better=())[metric]
  high = client_distribution(one, worst_percent=percent, lower_is_better=(metric,))[metric]  # "worst" = highest
  tail = f"{percent}_percent"
  return {"client_mean": float(low["client_mean"]), "variance": float(np.var(values[real])),
          f"worst_{tail}": float(low[f"worst_{tail}"]), f"best_{tail}": float(high[f"worst_{tail}"]),
          "num_clients": int(np.count_nonzero(real))}
