"""Pytree arithmetic used across a round (norms, finiteness, weighted sums, sizes).

Where optax already provides an operation (``optax.tree.add``, ``scale``, ``norm``, ``zeros_like``, ...), the
library calls it directly; this module holds only what optax lacks.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any  # a pytree of arrays; the one definition, imported wherever a signature names one


def tree_all_finite(tree: PyTree) -> jax.Array:
  """Returns a boolean scalar: True iff every element of every leaf is finite (no NaN, no +-Inf)."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.asarray(True)
  return jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]).all()


def tree_select(condition: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
  """Leaf-wise ``jnp.where(condition, on_true, on_false)`` for a scalar ``condition``."""
  return jax.tree.map(lambda a, b: jnp.where(condition, a, b), on_true, on_false)


def tree_scale_by_weight(tree: PyTree, weight: jax.Array) -> PyTree:
  """Multiplies every leaf by ``weight`` cast to that leaf's dtype (``x * cast(w, dtype(x))`` as in TFF)."""
  return jax.tree.map(lambda leaf: leaf * jnp.asarray(weight).astype(leaf.dtype), tree)


def tree_sum_over_clients(tree: PyTree) -> PyTree:
  """Sums every leaf over its leading (client) axis."""
  return jax.tree.map(lambda leaf: jnp.sum(leaf, axis=0), tree)


def tree_num_elements(tree: PyTree) -> int:
  """The total number of elements in the leaves of ``tree`` (a static Python int)."""
  return int(sum(np.prod(np.shape(leaf), dtype=np.int64) for leaf in jax.tree.leaves(tree)))


def dtype_bits(dtype: Any) -> int:
  """Bits per element of ``dtype`` as the reference's sizing counts them (bool = 1 bit)."""
  dtype = np.dtype(dtype)
  if dtype == np.bool_:
    return 1
  return dtype.itemsize * 8


def tree_size_bits(tree: PyTree) -> int:
  """Bits of a pytree's logical (in-memory) size: ``sum(numel * bits(dtype))`` over leaves."""
  return int(
      sum(
          np.prod(np.shape(leaf), dtype=np.int64) * dtype_bits(jnp.result_type(leaf))
          for leaf in jax.tree.leaves(tree)
      )
  )
