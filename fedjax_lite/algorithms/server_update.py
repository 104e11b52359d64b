"""The server update (TFF's "finalizer"): apply the server optimizer to the aggregate, rejecting non-finite ones.

``params' = params + server_optimizer(aggregate)`` where the aggregate plays the role of a gradient (FedAvg's
averaged pseudo-gradient, FedSGD's averaged gradient). If the aggregate holds any NaN or Inf, the parameters AND
the optimizer state are kept unchanged and ``update_non_finite`` is 1 (TFF ``reject_non_finite_update``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedjax_lite.core.tree import tree_all_finite, tree_select

PyTree = Any


def apply_server_optimizer(
    server_optimizer: optax.GradientTransformation,
    params: PyTree,
    opt_state: PyTree,
    aggregate: PyTree,
    *,
    midpoint_fraction: float | None = None,
) -> tuple[PyTree, PyTree, dict[str, jax.Array]]:
  """Returns ``(new_params, new_opt_state, measurements)``.

  With ``midpoint_fraction = f`` the step is taken only part of the way: ``params + f * (stepped - params)``;
  with server SGD(1.0) the new model is then the point a fraction ``f`` of the way from the current model to the
  clients' averaged model (``f = 0.5``: the midpoint).
  """
  updates, stepped_state = server_optimizer.update(aggregate, opt_state, params)
  stepped = optax.apply_updates(params, updates)
  if midpoint_fraction is not None:
    stepped = jax.tree.map(lambda new, old: old + midpoint_fraction * (new - old), stepped, params)
  finite = tree_all_finite(aggregate)
  new_params = tree_select(finite, stepped, params)
  new_state = tree_select(finite, stepped_state, opt_state)
  return new_params, new_state, {"update_non_finite": jnp.where(finite, 0, 1).astype(jnp.int32)}
