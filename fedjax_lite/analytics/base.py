"""The shape of a federated analytics query: a jittable ``compute`` and the ``DpEvent`` of one release.

Each query of :mod:`fedjax_lite.analytics` is built once from its static configuration (bin edges, noise, sketch
size...) and returns a :class:`Query` whose ``compute`` is pure and jittable (vectorized over clients with
``vmap``; padding slots marked by a client mask contribute nothing) and whose ``dp_event()`` is the
``dp_accounting`` event of ONE call of ``compute``: feed it to
:func:`fedjax_lite.privacy.sampled_run_events` and a :class:`fedjax_lite.privacy.PrivacyLedger` to read the epsilon
of a number of releases. A query without noise reports ``NonPrivateDpEvent`` (infinite epsilon), never a silent
zero.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_lite.core.tree import PyTree


class Query(NamedTuple):
  """A federated analytics query.

  Attributes:
    compute: the jittable computation (its arguments depend on the query; see its builder).
    dp_event: ``() -> dp_accounting.DpEvent`` of one call of ``compute``.
  """

  compute: Callable[..., Any]
  dp_event: Callable[[], Any]


def gaussian_event(noise_multiplier: float):
  """``GaussianDpEvent(z)`` for ``z > 0``; ``NonPrivateDpEvent`` for ``z = 0`` (no noise, no guarantee)."""
  import dp_accounting

  if noise_multiplier == 0:
    return dp_accounting.NonPrivateDpEvent()
  return dp_accounting.GaussianDpEvent(float(noise_multiplier))


def real_mask(num_slots: int, client_mask: jax.Array | None) -> jax.Array:
  """Boolean ``[num_slots]``: ``client_mask`` after a shape check, or all True."""
  if client_mask is None:
    return jnp.ones((num_slots,), bool)
  client_mask = jnp.asarray(client_mask)
  if client_mask.shape != (num_slots,) or client_mask.dtype != jnp.bool_:
    raise ValueError(f"client_mask must be a boolean array of shape ({num_slots},) (one entry per client slot), got "
                     f"shape {client_mask.shape} and dtype {client_mask.dtype}.")
  return client_mask


def l2_clip(tree: PyTree, clip: float | None) -> PyTree:
  """``tree * min(1, clip / ||tree||_2)`` over all leaves (float32); unchanged when ``clip`` is None."""
  if clip is None:
    return tree
  leaves = jax.tree.leaves(tree)
  norm = jnp.sqrt(sum(jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in leaves))
  scale = jnp.minimum(1.0, clip / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny))
  return jax.tree.map(lambda leaf: (leaf * scale).astype(leaf.dtype), tree)
