"""Noise mechanisms: additive Gaussian noise on pytrees, with explicit keys.

Every differentially private aggregator draws its noise here, so the mechanism (and its key handling) is written
once. Each leaf gets its own key (``fold_in(rng, leaf_index)``); the noise has the leaf's shape and dtype.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def gaussian_noise(rng: jax.Array, template: PyTree, stddev: jax.Array | float) -> PyTree:
  """Independent ``N(0, stddev^2)`` noise shaped like ``template`` (arrays or ``jax.ShapeDtypeStruct``s)."""
  leaves, treedef = jax.tree.flatten(template)
  noise = [
      jax.random.normal(jax.random.fold_in(rng, index), jnp.shape(leaf), jnp.result_type(leaf))
      * jnp.asarray(stddev, jnp.result_type(leaf))
      for index, leaf in enumerate(leaves)
  ]
  return jax.tree.unflatten(treedef, noise)


def add_gaussian_noise(rng: jax.Array, tree: PyTree, stddev: jax.Array | float) -> PyTree:
  """``tree + N(0, stddev^2 I)``, the Gaussian mechanism (Dwork & Roth 2014, §3.5.3) applied to every leaf."""
  return jax.tree.map(jnp.add, tree, gaussian_noise(rng, tree, stddev))
