"""Canary clients for privacy auditing: fixed updates that take part in every round beside the real clients.

``insert_canaries(inner, canaries)`` runs the inner aggregator's CLIENT part on each canary (so a canary is
clipped, and privatized, exactly like a real client of the round, with its own key) and adds the contributions to
the round's sum before the inner server part: the round then aggregates ``real clients + canaries``. Each canary
takes part with probability ``participation_probability`` per round (independently, from the server's key; 1:
every round), as the real clients of a Poisson-sampled run do. With ``num_groups = b > 1`` the canaries follow the
cyclic participation of ``core.CyclicSampler`` and DP-FTRL: canary ``i`` belongs to group ``i mod b``, and round
``t`` (counted in the wrapper's state) draws only group ``t mod b`` -- each canary takes part at most once every
``b`` rounds, the pattern a matrix-factorization or tree accountant assumes (``algorithms.dp_ftrl`` inserts its
canaries so). Used by ``fedjax_lite.privacy.audit`` (Andrew et al. 2024, one-shot empirical privacy estimation).
Sum-combined inner aggregators only (a stacked one would need the canaries inside its client axis); the inner's
weights see each canary with weight 1.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp

from fedjax_lite.aggregators.base import SUM, Aggregator, check_aggregator
from fedjax_lite.aggregators.wrapping import Inner, wrapper
from fedjax_lite.core import validation

from fedjax_lite.core.tree import PyTree

CANARY_STREAM = 0xCA9A


def insert_canaries(inner: Aggregator, canaries: PyTree, *, participation_probability: float = 1.0,
                    num_groups: int = 1) -> Aggregator:
  """``inner`` with the stacked ``canaries`` (leading canary axis, each shaped like one client's value) added as
  extra clients (module docstring): each round, every canary of the round's group (all of them when
  ``num_groups = 1``) independently with probability ``participation_probability``.

  With ``num_groups > 1`` the state is ``{'inner': inner's state, 'round': int32 rounds done}``; with 1 it is the
  inner's state, unchanged.
  """
  inner = Inner(check_aggregator(inner, "inner", combine=SUM))
  validation.check_float("participation_probability", participation_probability, low=0.0, high=1.0,
                         low_inclusive=False)
  leaves = jax.tree.leaves(canaries)
  if not leaves:
    raise ValueError("canaries must have at least one array leaf with a leading canary axis.")
  num_canaries = leaves[0].shape[0]
  validation.check_int("num_groups", num_groups, minimum=1)

  def with_canaries(state, combined, rng, round_num):
    canary_key, join_key = jax.random.split(jax.random.fold_in(rng, CANARY_STREAM))
    keys = jax.vmap(lambda i: jax.random.fold_in(canary_key, i))(jnp.arange(num_canaries, dtype=jnp.int32))
    joins = jax.random.uniform(join_key, (num_canaries,)) < participation_probability
    if round_num is not None:
      joins = joins & (jnp.arange(num_canaries, dtype=jnp.int32) % num_groups == round_num % num_groups)
    contributions = jax.vmap(inner.client, in_axes=(None, 0, None, 0))(
        inner.broadcast(state), canaries, jnp.float32(1.0), keys)
    return jax.tree.map(lambda c, t: t + jnp.sum(jnp.where(joins.reshape((-1,) + (1,) * (c.ndim - 1)), c,
                                                           jnp.zeros((), c.dtype)), axis=0),
                        contributions, combined)

  if num_groups == 1:
    def server(state, combined, rng, context):
      return inner.server(state, with_canaries(state, combined, rng, None), rng, context)

    return wrapper(inner, inner.client, server)

  def init(value_template):
    return {"inner": inner.init(value_template), "round": jnp.zeros((), jnp.int32)}

  def broadcast(state):
    return inner.broadcast(state["inner"])

  def grouped_server(state, combined, rng, context):
    total = with_canaries(state["inner"], combined, rng, state["round"])
    out = inner.server(state["inner"], total, rng, context)
    return out._replace(state={"inner": out.state, "round": state["round"] + 1})

  return wrapper(inner, inner.client, grouped_server, init=init, broadcast=broadcast)
