"""Test helpers for aggregators: run ``next`` jitted, and run the streaming path client by client."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lite.aggregators.base import STACK, AggregationContext, as_template, client_total, split_rng


def one_client(values):
  """The first client's value: a template of one client's value."""
  return jax.tree.map(lambda v: v[0], values)


def stacked_version(aggregator):
  """``aggregator`` (sum-combined) as a stack-combined aggregator: the runner stacks the same contributions and the
  server sums them itself before the original server part. Same result, the other combine path."""

  def server(state, stacked, rng, context):
    return aggregator.server(state, client_total(stacked, STACK), rng, context)

  return aggregator._replace(combine=STACK, server=server)


@functools.cache
def jitted_next(aggregator):
  """``jax.jit(aggregator.next)``, one per aggregator: ``aggregator.next`` is a new bound method at every access,
  so a fresh ``jax.jit`` of it would trace and compile again on every call (seconds for the secure sums)."""
  return jax.jit(aggregator.next)


def run_next(aggregator, state, values, weights, rng, client_mask=None):
  return jitted_next(aggregator)(state, values, jnp.asarray(weights, jnp.float32), rng, client_mask)


def run_streaming(aggregator, state, values, weights, rng, client_mask=None):
  """The streaming path: a running sum of each real client's contribution (in client order), then the server step.

  Clients are sliced on the host (numpy) and every device computation is one of a few jitted programs, so the loop
  compiles nothing per client.
  """
  clients_key, server_key = jax.jit(split_rng)(rng)
  assert aggregator.combine == "sum", "the streaming path needs a sum-combined aggregator"
  client_params = aggregator.broadcast(state)
  client = jax.jit(aggregator.client)
  client_key = jax.jit(jax.random.fold_in)
  add = jax.jit(lambda total, contribution: jax.tree.map(jnp.add, total, contribution))
  host_values, host_weights = jax.tree.map(np.asarray, values), np.asarray(weights, np.float32)
  total = None
  for index in range(host_weights.shape[0]):
    if client_mask is not None and not bool(client_mask[index]):
      continue
    contribution = client(client_params, jax.tree.map(lambda v: v[index], host_values), host_weights[index],
                          client_key(clients_key, index))
    total = contribution if total is None else add(total, contribution)
  context = AggregationContext(as_template(one_client(values)), int(host_weights.shape[0]))
  return jax.jit(lambda s, t, k: aggregator.server(s, t, k, context))(state, total, server_key)


def brute_force_sensitivity(coefficients, n, min_separation):
  """The L2 sensitivity of the first ``n`` rounds of the lower-triangular Toeplitz strategy with these first
  ``coefficients``, by enumeration: max over every set of rounds at least ``min_separation`` apart of ||sum of
  those columns of C||_2 (NumPy, float64)."""
  coefficients = np.pad(np.asarray(coefficients, np.float64), (0, n))[:n]
  lag = np.arange(n)[:, None] - np.arange(n)[None, :]
  matrix = np.where(lag >= 0, coefficients[np.clip(lag, 0, n - 1)], 0.0)
  best = 0.0
  for size in range(1, n + 1):
    for rounds in itertools.combinations(range(n), size):
      if all(b - a >= min_separation for a, b in zip(rounds, rounds[1:])):
        best = max(best, float(np.linalg.norm(matrix[:, list(rounds)].sum(axis=1))))
  return best
