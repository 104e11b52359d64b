"""Noise mechanisms: additive Gaussian and Laplace noise on pytrees, with explicit keys.

Every differentially private aggregator draws its noise here, so the mechanism (and its key handling) is written
once. The noise for all leaves is ONE draw of ``sum(leaf sizes)`` standard normals, cut into the leaves' shapes
and cast to their dtypes: on XLA:CPU every separate random draw adds roughly half a second of compile time, so a
model with many leaves compiles much faster this way, with the same distribution.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lite.core.tree import PyTree


def gaussian_noise(rng: jax.Array, template: PyTree, stddev: jax.Array | float) -> PyTree:
  """Independent ``N(0, stddev^2)`` noise shaped like ``template`` (arrays or ``jax.ShapeDtypeStruct``s)."""
  return _scaled_draw(jax.random.normal, rng, template, stddev)


def laplace_noise(rng: jax.Array, template: PyTree, scale: jax.Array | float) -> PyTree:
  """Independent ``Laplace(0, scale)`` noise (density ``exp(-|x| / scale) / (2 scale)``) shaped like ``template``;
  the Laplace mechanism (Dwork & Roth 2014, §3.3)."""
  return _scaled_draw(jax.random.laplace, rng, template, scale)


def _scaled_draw(sampler, rng: jax.Array, template: PyTree, scale) -> PyTree:
  """ONE draw of ``sum(leaf sizes)`` float32 samples, cut into the leaves' shapes, cast and scaled."""
  leaves, treedef = jax.tree.flatten(template)
  sizes = [int(np.prod(jnp.shape(leaf), dtype=np.int64)) for leaf in leaves]
  flat = sampler(rng, (sum(sizes),), jnp.float32)
  noise, offset = [], 0
  for leaf, size in zip(leaves, sizes):
    dtype = jnp.result_type(leaf)
    piece = jax.lax.slice_in_dim(flat, offset, offset + size).reshape(jnp.shape(leaf)).astype(dtype)
    noise.append(piece * jnp.asarray(scale, dtype))
    offset += size
  return jax.tree.unflatten(treedef, noise)


def add_gaussian_noise(rng: jax.Array, tree: PyTree, stddev: jax.Array | float) -> PyTree:
  """``tree + N(0, stddev^2 I)``, the Gaussian mechanism (Dwork & Roth 2014, §3.5.3) applied to every leaf."""
  return jax.tree.map(jnp.add, tree, gaussian_noise(rng, tree, stddev))
