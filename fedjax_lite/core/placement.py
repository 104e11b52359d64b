"""Placement helpers for writing a federated round by hand, in the reference tutorial's four parts.

Values "at the clients" carry a leading client axis; values "at the server" do not::

    client_params = broadcast(params, num_clients)                      # 1. distributor
    deltas, weights = map_clients(client_update, client_params, data)  # 2. client work
    delta = federated_mean(deltas, weights)                            # 3. aggregation
    params = server_update(params, delta)                              # 4. finalizer

``map_clients`` follows the runner's strategy (``vmap`` on accelerators; a sequential ``lax.map`` on CPU, where
``vmap`` over per-client convolutions is slow). For production rounds use the algorithms, which stream the
aggregation instead of materializing every client's update. (We evaluated Google's ``drjax`` for this layer: its
``map_fn`` is a ``vmap``, the slow choice on CPU, and it patches the calling module; these few functions keep the
strategy choice.)
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from fedjax_lite.core import validation
from fedjax_lite.core.runner import Runner
from fedjax_lite.core.tree import PyTree, tree_scale_by_weight


def broadcast(value: PyTree, num_clients: int) -> PyTree:
  """The server value placed at ``num_clients`` clients: every leaf gets a leading client axis."""
  validation.check_int("num_clients", num_clients, minimum=1)
  num_clients = int(num_clients)
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_clients,) + jnp.shape(x)), value)


def map_clients(fn: Callable[..., PyTree], *client_values: PyTree, runner: Runner | None = None) -> PyTree:
  """Applies ``fn`` to each client's slice of ``client_values`` (all with the leading client axis)."""
  strategy = (runner or Runner()).resolved_strategy()
  if strategy == "vmap":
    return jax.vmap(fn)(*client_values)
  batch_size = (runner.chunk_size if runner is not None else None) if strategy == "chunked" else None
  return jax.lax.map(lambda args: fn(*args), client_values, batch_size=batch_size)


def federated_sum(client_values: PyTree) -> PyTree:
  """``sum_i x_i`` over the client axis."""
  return jax.tree.map(lambda x: jnp.sum(x, axis=0), client_values)


def federated_mean(client_values: PyTree, weights: jax.Array | None = None) -> PyTree:
  """``sum_i w_i x_i / sum_i w_i`` over the client axis (unweighted when ``weights`` is None)."""
  if weights is None:
    return jax.tree.map(lambda x: jnp.mean(x, axis=0), client_values)
  weights = jnp.asarray(weights, jnp.float32)
  weighted = jax.vmap(tree_scale_by_weight)(client_values, weights)
  total_weight = jnp.sum(weights)
  return jax.tree.map(lambda x: jnp.sum(x, axis=0) / total_weight.astype(x.dtype), weighted)
