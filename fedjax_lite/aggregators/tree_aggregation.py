"""Tree aggregation for DP-FTRL (Kairouz, McMahan, Song, Thakkar, Thakurta & Xu 2021, "Practical and Private
(Deep) Learning without Sampling or Shuffling", arXiv:2103.00039; TFF ``DifferentiallyPrivateFactory.
tree_aggregation`` over tf-privacy's ``TreeResidualSumQuery``).

Where clients cannot be sampled uniformly (they arrive in an order the server does not control), DP-FTRL releases
noisy PREFIX sums of the clipped client contributions through a binary tree: the sum over rounds ``[0, n)`` is
covered by at most ``log2(n) + 1`` dyadic blocks, each carrying its own Gaussian noise ``N(0, (z C)^2 I)``, so the
noise on any prefix has variance ``popcount(n) (z C)^2`` instead of growing linearly. Each round returns the
RESIDUAL, the difference of consecutive noisy prefix sums, divided by ``m``::

  result_t = (sum_i clip_C(x_i) + noise_prefix(t + 1) - noise_prefix(t)) / m

which, fed to server SGD, makes the model follow the noisy prefix sums (FTRL). The node of level ``l`` covering
``[k 2^l, (k+1) 2^l)`` draws its noise from a key folded from the tree's key, ``l`` and ``k``: it is regenerated
when needed instead of stored, and the residual only draws the nodes that differ between the two prefixes (two
on average). The tree restarts every ``rounds_per_tree`` rounds (e.g. once per epoch of clients, each client at
most once per tree) with a fresh key taken from that round's randomness.

Accounting: ``fedjax_lite.privacy.tree_run_events(z, rounds_per_tree)`` (dp_accounting's
``SingleEpochTreeAggregationDpEvent``). This implements the plain tree (not Honaker's variance-reduced "efficient"
estimator that TFF uses by default).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_lite.aggregators.base import Aggregator
from fedjax_lite.aggregators.robust import clip_to, global_norm
from fedjax_lite.core import validation
from fedjax_lite.core.process import MeasuredOutput
from fedjax_lite.core.tree import PyTree
from fedjax_lite.privacy.mechanisms import gaussian_noise


def _node_noise(tree_key: jax.Array, level: int, index: jax.Array, template: PyTree, stddev) -> PyTree:
  return gaussian_noise(jax.random.fold_in(jax.random.fold_in(tree_key, level), index), template, stddev)


def residual_noise(tree_key: jax.Array, count: jax.Array, num_levels: int, template: PyTree, stddev) -> PyTree:
  """``noise_prefix(count) - noise_prefix(count - 1)`` for ``count >= 1``.

  ``noise_prefix(n)`` sums the node of level ``l`` with index ``(n >> l) - 1`` for every set bit ``l`` of ``n``.
  Nodes shared by ``n`` and ``n - 1`` cancel and are skipped (``lax.cond``), so typically two nodes are drawn.
  """
  previous = count - 1
  total = jax.tree.map(jnp.zeros_like, template)
  for level in range(num_levels):
    in_current = ((count >> level) & 1) == 1
    in_previous = ((previous >> level) & 1) == 1
    index_current = (count >> level) - 1
    index_previous = (previous >> level) - 1
    same_node = in_current & in_previous & (index_current == index_previous)

    def add_current(tree, level=level, index=index_current):
      return jax.tree.map(jnp.add, tree, _node_noise(tree_key, level, index, template, stddev))

    def subtract_previous(tree, level=level, index=index_previous):
      return jax.tree.map(jnp.subtract, tree, _node_noise(tree_key, level, index, template, stddev))

    total = jax.lax.cond(in_current & ~same_node, add_current, lambda tree: tree, total)
    total = jax.lax.cond(in_previous & ~same_node, subtract_previous, lambda tree: tree, total)
  return total


def tree_aggregation(noise_multiplier: float, clients_per_round: float, clip: float, *,
                     rounds_per_tree: int) -> Aggregator:
  """DP-FTRL's tree-aggregated residual mean; see the module docstring. Unweighted.

  Args:
    noise_multiplier: ``z >= 0``: every tree node carries ``N(0, (z C)^2 I)``.
    clients_per_round: ``m > 0``, the fixed normalizer.
    clip: ``C > 0``, the L2 clip of each client's value.
    rounds_per_tree: rounds before the tree restarts (>= 1), e.g. the rounds of one epoch of clients.
  """
  validation.check_float("noise_multiplier", noise_multiplier, low=0.0)
  validation.check_positive("clients_per_round", clients_per_round)
  validation.check_positive("clip", clip)
  validation.check_int("rounds_per_tree", rounds_per_tree, minimum=1)
  num_levels = int(rounds_per_tree).bit_length()

  def init(value_template):
    return {"round_in_tree": jnp.zeros((), jnp.int32), "tree_key": jax.random.key(0)}

  def broadcast(state):
    return ()

  def client(client_params, value, weight, rng):
    return clip_to(value, global_norm(value, 2.0), jnp.asarray(clip, jnp.float32))

  def server(state, total, rng, context):
    fresh_tree = state["round_in_tree"] == 0
    tree_key = jax.random.key_data(state["tree_key"])
    tree_key = jax.random.wrap_key_data(jnp.where(fresh_tree, jax.random.key_data(jax.random.fold_in(rng, 0)),
                                                  tree_key))
    stddev = jnp.asarray(noise_multiplier * clip, jnp.float32)
    noise = residual_noise(tree_key, state["round_in_tree"] + 1, num_levels, total, stddev)
    result = jax.tree.map(lambda s, n: (s + n) / jnp.asarray(clients_per_round, s.dtype), total, noise)
    next_round = jnp.where(state["round_in_tree"] + 1 >= rounds_per_tree, 0, state["round_in_tree"] + 1)
    return MeasuredOutput(state={"round_in_tree": next_round.astype(jnp.int32), "tree_key": tree_key},
                          result=result, measurements={"dp_query_metrics": {}, "dp": ()})

  return Aggregator(init, broadcast, client, server)
