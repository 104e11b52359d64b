"""Debug measurements around any aggregator: client-norm statistics and the size of the aggregate.

After TFF's ``tff.learning.add_debug_measurements`` (``learning/debug_measurements.py``). The wrapper leaves the
inner aggregator's state, result and randomness untouched and adds five float32 scalars to its measurements. With
``n_i = ||x_i||_2`` the global L2 norm of real client ``i``'s value (all leaves together, in float32), ``w_i`` its
weight, ``a = sum_i w_i``, ``b = sum_i w_i^2`` and ``E[f] = sum_i w_i f_i / a`` the weighted mean:

* ``average_client_norm = E[n]`` (0 when ``a = 0``);
* ``std_dev_client_norm = sqrt(a^2 / (a^2 - b) * (E[n^2] - E[n]^2))``, the unbiased weighted (reliability
  weights) standard deviation; with unit weights it is ``np.std(norms, ddof=1)``. It is 0 when undefined
  (``a^2 - b <= 0``, e.g. a single client) and the variance is clamped at 0 against rounding;
* ``server_update_max``, ``server_update_min``: the largest and smallest coordinate over all leaves of the inner
  aggregator's result; ``server_update_norm``: its global L2 norm.

Each client uploads ``(w n, w n^2, w, w^2)`` besides what the inner aggregator needs (``upload_bits`` grows by 4
float32 scalars). The wrapper combines as its inner aggregator does: it streams around a sum and stacks around,
e.g., :func:`~fedjax_lite.aggregators.robust_statistics.coordinate_median`, where the server sums the stacked norm
terms. Padding slots (weight 0) count nowhere.

The weights are the ones the round passes (``fed_avg``: examples processed, or 1 with ``weighting='uniform'``),
even when the inner aggregator ignores them. As in the reference these sums are plain, neither secure nor private:
around a differentially private aggregator they reveal client-norm statistics that its ``dp_event`` (passed
through, for the inner result only) does not account for.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from fedjax_lite.aggregators.base import Aggregator, check_aggregator, client_total
from fedjax_lite.aggregators.robust import global_norm
from fedjax_lite.aggregators.wrapping import Inner, wrapper
from fedjax_lite.core.tree import PyTree

DEBUG_KEYS = ("average_client_norm", "std_dev_client_norm", "server_update_max", "server_update_norm",
              "server_update_min")
NUM_DEBUG_SCALARS = 4  # w n, w n^2, w, w^2


def client_norm_sums(value: PyTree, weight: jax.Array) -> dict[str, jax.Array]:
  """ONE client's float32 debug upload: ``{w n, w n^2, w, w^2}`` with ``n = ||value||_2``."""
  weight = jnp.asarray(weight, jnp.float32)
  norm = global_norm(value, 2.0)
  return {"weighted_norm": weight * norm, "weighted_norm_squared": weight * norm * norm, "weight": weight,
          "weight_squared": weight * weight}


def client_norm_statistics(sums: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """``(average_client_norm, std_dev_client_norm)`` from the clients' summed :func:`client_norm_sums`."""
  weight_sum, weight_square_sum = sums["weight"], sums["weight_squared"]
  has_weight = weight_sum != 0
  safe_weight_sum = jnp.where(has_weight, weight_sum, 1.0)
  mean_norm = jnp.where(has_weight, sums["weighted_norm"] / safe_weight_sum, 0.0)
  mean_norm_squared = jnp.where(has_weight, sums["weighted_norm_squared"] / safe_weight_sum, 0.0)
  biased_variance = jnp.maximum(mean_norm_squared - mean_norm * mean_norm, 0.0)
  squared_weight_sum = weight_sum * weight_sum
  denominator = squared_weight_sum - weight_square_sum
  defined = denominator > 0
  correction = jnp.where(defined, squared_weight_sum / jnp.where(defined, denominator, 1.0), 0.0)
  return mean_norm, jnp.sqrt(correction * biased_variance)


def server_update_statistics(result: PyTree) -> dict[str, jax.Array]:
  """``server_update_{max,norm,min}`` of an aggregate, over all coordinates of all leaves, in float32."""
  leaves = [jnp.asarray(leaf, jnp.float32) for leaf in jax.tree.leaves(result)]
  if not leaves:
    raise ValueError("add_debug_measurements needs an inner aggregator whose result has at least one array leaf.")
  return {
      "server_update_max": jnp.max(jnp.stack([jnp.max(leaf, initial=-jnp.inf) for leaf in leaves])),
      "server_update_norm": global_norm(leaves, 2.0),
      "server_update_min": jnp.min(jnp.stack([jnp.min(leaf, initial=jnp.inf) for leaf in leaves])),
  }


def merge_measurements(inner_measurements: PyTree, debug_measurements: dict[str, jax.Array]) -> dict:
  """The inner measurements with the debug keys added; a non-dict is kept under ``'inner'``."""
  if isinstance(inner_measurements, Mapping):
    clashes = sorted(set(inner_measurements) & set(debug_measurements))
    if clashes:
      raise ValueError(f"the inner aggregator's measurements already have the debug keys {clashes}; apply "
                       "add_debug_measurements once.")
    return {**inner_measurements, **debug_measurements}
  return {"inner": inner_measurements, **debug_measurements}


def add_debug_measurements(inner: Aggregator) -> Aggregator:
  """Wraps ``inner`` to also measure client norms and the aggregate (TFF ``tff.learning.add_debug_measurements``).

  Adds ``average_client_norm``, ``std_dev_client_norm``, ``server_update_max``, ``server_update_norm`` and
  ``server_update_min`` (float32; formulas in the module docstring) to the inner measurements when they are a dict,
  else returns ``{'inner': <inner measurements>, <debug keys>}``. State, result and the inner aggregator's random
  keys are unchanged. Combines as ``inner`` does (streams exactly when it sums).

  Args:
    inner: any aggregator, e.g. ``mean()`` or ``coordinate_median()``.

  Example::

    aggregator = add_debug_measurements(mean())
    process = fed_avg(model, client_learning_rate=0.1, aggregator=aggregator)
    # metrics['aggregator'] == {'mean_value': (), 'mean_weight': (), 'average_client_norm': ..., ...}
  """
  # The inner aggregator keeps the wrapper's keys, template, state and client parameters: its result is unchanged.
  inner = Inner(check_aggregator(inner, "inner"))

  def client(client_params, value, weight, rng):
    return {"inner": inner.client(client_params, value, weight, rng), "debug": client_norm_sums(value, weight)}

  def server(state, combined, rng, context):
    inner_output = inner.server(state, combined["inner"], rng, context)
    average, std_dev = client_norm_statistics(client_total(combined["debug"], inner.combine))
    debug = {"average_client_norm": average, "std_dev_client_norm": std_dev,
             **server_update_statistics(inner_output.result)}
    debug = {key: debug[key] for key in DEBUG_KEYS}
    return inner_output._replace(measurements=merge_measurements(inner_output.measurements, debug))

  return wrapper(inner, client, server, own_upload_bits=NUM_DEBUG_SCALARS * 32)
