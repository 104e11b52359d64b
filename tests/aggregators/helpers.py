"""Test helpers for aggregators: run ``next`` jitted, and run the streaming path client by client."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_lite.aggregators.base import split_rng


def run_next(aggregator, state, values, weights, rng, client_mask=None):
  return jax.jit(aggregator.next)(state, values, jnp.asarray(weights, jnp.float32), rng, client_mask)


def run_streaming(aggregator, state, values, weights, rng, client_mask=None, chunk_sizes=None):
  """Contributions summed one client (or chunk) at a time, in Python order, then the server part."""
  parts = aggregator.parts
  clients_key, server_key = split_rng(rng)
  params = parts.broadcast(state)
  num = jax.tree.leaves(values)[0].shape[0]
  total = None
  for index in range(num):
    if client_mask is not None and not bool(client_mask[index]):
      continue
    value = jax.tree.map(lambda x: x[index], values)
    contribution = parts.client(params, value, jnp.float32(weights[index]), jax.random.fold_in(clients_key, index))
    total = contribution if total is None else jax.tree.map(jnp.add, total, contribution)
  return parts.server(state, total, server_key)
