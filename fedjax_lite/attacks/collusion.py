"""Colluding attacks that use the honest clients' statistics: "a little is enough" and inner-product manipulation.

Both model an omniscient adversary controlling the ``f`` malicious clients of a round, who sees the ``h = n - f``
honest updates ``u_1 .. u_h`` before aggregation and makes all ``f`` malicious clients send the SAME crafted
update. Statistics are per coordinate ``j`` over the honest REAL clients: ``mu_j = (1/h) sum_i u_ij`` and the
population standard deviation ``sigma_j = sqrt((1/h) sum_i (u_ij - mu_j)^2)``. Since ``f < n`` (the malicious
fraction is below 1) a round with a real client always has an honest one; a mask with none gives NaN (0/0), never a
finite number.

* :func:`a_little_is_enough` (Baruch, Baruch & Goldberg 2019, "A Little Is Enough: Circumventing Defenses For
  Distributed Learning", NeurIPS): ``u' = mu - z * sigma``, a small shift inside the honest spread that
  coordinate-wise and distance-based defenses (median, trimmed mean, Krum) cannot tell from honest noise. The
  paper's ``z_max``: with ``s = floor(n/2 + 1) - f`` honest clients the attackers need on their side,
  ``z = Phi^-1((n - s) / n)`` (``Phi`` the standard normal CDF); ``s`` is taken at least 1.
* :func:`inner_product_manipulation` (Xie, Koyejo & Gupta 2020, "Fall of Empires: Breaking Byzantine-tolerant SGD
  by Inner Product Manipulation", UAI): ``u' = -epsilon * mu``, which makes the aggregate's inner product with the
  true mean negative once the defense keeps enough malicious copies (small ``epsilon`` ~ 0.1 hides among honest
  updates for Krum and the median; large ``epsilon`` overwhelms a mean).

Updates are pseudo-gradients (the server moves AGAINST them), so subtracting ``z sigma`` from the mean, as the
paper does with gradients, moves the model the wrong way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtri

from fedjax_lite.attacks.base import UpdateAttack, select_clients
from fedjax_lite.core import validation
from fedjax_lite.core.tree import PyTree


def honest_mean_and_std(updates: PyTree, honest: jax.Array) -> tuple[PyTree, PyTree]:
  """Per-coordinate mean and population standard deviation over the ``honest`` slots (float32 or wider)."""
  count = jnp.sum(honest, dtype=jnp.int32)

  def stats(leaf):
    accumulate = jnp.promote_types(leaf.dtype, jnp.float32)
    chosen = honest.reshape((honest.shape[0],) + (1,) * (leaf.ndim - 1))
    leaf = leaf.astype(accumulate)
    total = jnp.sum(jnp.where(chosen, leaf, 0), axis=0)
    mean = total / count.astype(accumulate)
    variance = jnp.sum(jnp.where(chosen, jnp.square(leaf - mean), 0), axis=0) / count.astype(accumulate)
    return mean, jnp.sqrt(variance)

  pairs = jax.tree.map(stats, updates)
  outer = jax.tree.structure(updates)
  means, stds = jax.tree.transpose(outer, jax.tree.structure((0, 0)), pairs)
  return means, stds


def alie_z(num_real: jax.Array, num_malicious: jax.Array) -> jax.Array:
  """The paper's ``z_max = Phi^-1((n - s) / n)`` with ``s = max(floor(n/2 + 1) - f, 1)`` (float32)."""
  n = jnp.asarray(num_real, jnp.float32)
  s = jnp.maximum(jnp.floor(n / 2 + 1) - jnp.asarray(num_malicious, jnp.float32), 1.0)
  return ndtri((n - s) / jnp.maximum(n, 1.0))


def _broadcast_to_clients(value: PyTree, updates: PyTree) -> PyTree:
  return jax.tree.map(lambda v, u: jnp.broadcast_to(v, u.shape), value, updates)


def a_little_is_enough(z: float | None = None) -> UpdateAttack:
  """Every malicious client sends ``mu - z * sigma`` of the honest updates (Baruch et al. 2019).

  Args:
    z: the shift in honest standard deviations, ``>= 0``; None (default) for the paper's ``z_max`` computed each
      round from the real and malicious counts (module docstring).
  """
  z = validation.check_float("z", z, low=0.0, allow_none=True)

  def apply(updates, malicious, client_mask, rng):
    del rng
    honest = jnp.asarray(client_mask, bool) & ~malicious
    mean, std = honest_mean_and_std(updates, honest)
    if z is None:
      shift = alie_z(jnp.sum(client_mask, dtype=jnp.int32), jnp.sum(malicious, dtype=jnp.int32))
    else:
      shift = jnp.asarray(z, jnp.float32)
    crafted = jax.tree.map(lambda m, s: m - shift.astype(m.dtype) * s, mean, std)
    return select_clients(malicious, _broadcast_to_clients(crafted, updates), updates)

  return UpdateAttack(name="a little is enough", apply=apply)


def inner_product_manipulation(epsilon: float = 0.1) -> UpdateAttack:
  """Every malicious client sends ``-epsilon * mu`` of the honest updates (Xie et al. 2020).

  Args:
    epsilon: ``> 0``; the paper uses 0.1 against Krum and the median and larger values (e.g. 10-100) against the
      mean.
  """
  epsilon = validation.check_positive("epsilon", epsilon)

  def apply(updates, malicious, client_mask, rng):
    del rng
    honest = jnp.asarray(client_mask, bool) & ~malicious
    mean, _ = honest_mean_and_std(updates, honest)
    crafted = jax.tree.map(lambda m: -epsilon * m, mean)
    return select_clients(malicious, _broadcast_to_clients(crafted, updates), updates)

  return UpdateAttack(name="inner product manipulation", apply=apply)
