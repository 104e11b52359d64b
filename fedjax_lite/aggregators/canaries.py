"""Canary clients for privacy auditing: fixed updates that take part in every round beside the real clients.

``insert_canaries(inner, canaries)`` runs the inner aggregator's CLIENT part on each canary (so a canary is
clipped, and privatized, exactly like a real client of the round, with its own key) and adds the contributions to
the round's sum before the inner server part: the round then aggregates ``real clients + canaries``. Each canary
takes part with probability ``participation_probability`` per round (independently, from the server's key; 1:
every round), as the real clients of a Poisson-sampled run do. Used by ``fedjax_lite.privacy.audit`` (Andrew et al.
2024, one-shot empirical privacy estimation). Sum-combined inner aggregators only (a stacked one would need the
canaries inside its client axis); the inner's weights see each canary with weight 1.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp

from fedjax_lite.aggregators.base import SUM, Aggregator, check_aggregator
from fedjax_lite.core import validation

from fedjax_lite.core.tree import PyTree

CANARY_STREAM = 0xCA9A


def insert_canaries(inner: Aggregator, canaries: PyTree, *, participation_probability: float = 1.0) -> Aggregator:
  """``inner`` with the stacked ``canaries`` (leading canary axis, each shaped like one client's value) added as
  extra clients every round (module docstring)."""
  inner = check_aggregator(inner, "inner", combine=SUM)
  validation.check_float("participation_probability", participation_probability, low=0.0, high=1.0,
                         low_inclusive=False)
  leaves = jax.tree.leaves(canaries)
  if not leaves:
    raise ValueError("canaries must have at least one array leaf with a leading canary axis.")
  num_canaries = leaves[0].shape[0]

  def server(state, combined, rng, context):
    canary_key, join_key = jax.random.split(jax.random.fold_in(rng, CANARY_STREAM))
    keys = jax.vmap(lambda i: jax.random.fold_in(canary_key, i))(jnp.arange(num_canaries, dtype=jnp.int32))
    joins = jax.random.uniform(join_key, (num_canaries,)) < participation_probability
    contributions = jax.vmap(inner.client, in_axes=(None, 0, None, 0))(
        inner.broadcast(state), canaries, jnp.float32(1.0), keys)
    total = jax.tree.map(lambda c, t: t + jnp.sum(jnp.where(joins.reshape((-1,) + (1,) * (c.ndim - 1)), c,
                                                            jnp.zeros((), c.dtype)), axis=0),
                         contributions, combined)
    return inner.server(state, total, rng, context)

  return inner._replace(server=server)
