"""Personalized evaluation: each client evaluated with its OWN parameters, reported as a distribution over clients.

Personalization algorithms (Ditto's personal models, per-client local parameters) are judged by how well every
client's own model serves that client, not only by one global model's example-weighted mean: Li et al. 2021
("Ditto: Fair and Robust Federated Learning Through Personalization", ICML) report the mean over clients of each
client's test accuracy and the mean over the worst 10% of clients (fairness), next to the global model's.

* :func:`evaluate_clients_with_own_params` runs every client of a packed round with the parameters of its slot
  (stacked ``[client slots, ...]``, e.g. gathered from a :class:`fedjax_lite.core.ClientStateStore`), through the
  same runner as training (one compiled program, no Python per client);
* :func:`client_distribution` summarizes per-client metrics over the round's REAL clients (``num_examples > 0``):
  the unweighted mean over clients, and the mean over the worst ``worst_fraction`` of them.

Where this sits: after training, on each client's test split; the global model's per-client metrics come from
:func:`fedjax_lite.algorithms.evaluate_clients` and are summarized the same way.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import jax
import jax.numpy as jnp

from fedjax_lite.algorithms.evaluation import client_metric_sums
from fedjax_lite.core import validation
from fedjax_lite.core.model import Model, finalize_metric_sums
from fedjax_lite.core.runner import Runner, num_client_slots, run_clients
from fedjax_lite.core.tree import PyTree

LOWER_IS_BETTER = ("loss",)


def evaluate_clients_with_own_params(model: Model, client_params: PyTree, round_data: PyTree, *,
                                     runner: Runner | None = None) -> dict[str, dict[str, jax.Array]]:
  """Evaluates client slot ``k`` of ``round_data`` with ``client_params[k]`` (inference mode).

  Args:
    model: the model.
    client_params: the clients' own parameters, every leaf stacked ``[client slots, ...]`` in the slots' order.
    round_data: the packed clients (e.g. each client's test split).
    runner: the client runner.

  Returns:
    ``{'aggregate': {...}, 'per_client': {...}}`` as :func:`fedjax_lite.algorithms.evaluate_clients`: the
    example-weighted aggregate over all real examples and every slot's own means (padding: NaN).
  """
  num_slots = num_client_slots(round_data)
  for path, leaf in jax.tree_util.tree_flatten_with_path(client_params)[0]:
    if not jnp.shape(leaf) or jnp.shape(leaf)[0] != num_slots:
      raise ValueError(f"client_params{jax.tree_util.keystr(path)} has shape {list(jnp.shape(leaf))}, but the "
                       f"round has {num_slots} client slots: stack one parameter tree per slot.")

  def per_client(_, slot, rng):
    sums = client_metric_sums(model, slot["params"], slot["data"])
    return sums, sums

  slots = {"num_examples": round_data["num_examples"], "data": round_data, "params": client_params}
  totals, per_client_sums = run_clients(per_client, (), slots, jax.random.key(0), runner=runner)
  return {"aggregate": finalize_metric_sums(totals), "per_client": finalize_metric_sums(per_client_sums)}


def client_distribution(per_client: Mapping[str, jax.Array], *, worst_fraction: float = 0.1,
                        lower_is_better: Iterable[str] = LOWER_IS_BETTER) -> dict[str, dict[str, jax.Array]]:
  """The distribution over clients of per-client metrics: ``{metric: {'mean', 'worst'}}``.

  Over the real clients (``per_client['num_examples'] > 0``; ``n`` of them): ``mean = (1/n) sum_k m_k`` (every
  client counts once, whatever its size) and ``worst`` = the mean of the ``ceil(worst_fraction * n)`` worst
  clients' values (at least one): the largest for a metric in ``lower_is_better`` (the loss), the smallest for any
  other (accuracy). Li et al. 2021 (Ditto) report both for test accuracy with ``worst_fraction = 0.1``. Counters
  (``num_*``) are left out. With no real client every value is NaN. Jittable.

  Args:
    per_client: ``{metric: [client slots]}`` as ``evaluate_clients(...)['per_client']`` returns, with
      ``num_examples``.
    worst_fraction: in (0, 1].
    lower_is_better: the metrics for which a larger value is worse.
  """
  validation.check_float("worst_fraction", worst_fraction, low=0.0, high=1.0, low_inclusive=False)
  if not isinstance(per_client, Mapping) or "num_examples" not in per_client:
    raise ValueError("per_client must be a dict of per-client metrics with 'num_examples' (evaluate_clients(...)"
                     "['per_client']).")
  lower = frozenset(lower_is_better)
  real = jnp.asarray(per_client["num_examples"]) > 0
  count = jnp.sum(real).astype(jnp.float32)
  num_worst = jnp.maximum(jnp.ceil(worst_fraction * count - 1e-6 * count), 1.0)
  out = {}
  for name, values in per_client.items():
    if name.startswith("num_"):
      continue
    values = jnp.asarray(values, jnp.float32)
    mean = jnp.sum(jnp.where(real, values, 0.0)) / count
    # Worst first: sort the (sign-flipped) values ascending with padding slots last (+inf).
    signed = values if name not in lower else -values
    ranked = jnp.sort(jnp.where(real, signed, jnp.inf))
    taken = jnp.arange(ranked.shape[0]) < num_worst
    worst = jnp.sum(jnp.where(taken, ranked, 0.0)) / num_worst
    worst = worst if name not in lower else -worst
    out[name] = {"mean": mean, "worst": jnp.where(count > 0, worst, jnp.nan)}
  return out

