"""Which clients of a round are malicious: an exact fraction of the real client slots, chosen by seed.

Every attack in :mod:`fedjax_lite.attacks` corrupts the clients that :func:`choose_malicious` marks. The choice is
a pure function of ``(seed, round_num, client slot)``: slot ``i`` of round ``t`` gets the score ``u_i``, element
``i`` of ``uniform(fold_in(key(seed), t), [slots])``, and the ``k = floor(fraction * n)`` REAL slots (``n`` of
them, ``client_mask``) with the smallest scores are malicious (ties to the lower slot). So a round has exactly
``k`` attackers wherever they sit, padding slots are never chosen, every real slot is equally likely to be chosen,
and the same seed replays the same attack in a resumed or repeated run. Because cohorts are sampled at random each
round, a malicious *slot* is a random client of the population; the attackers are not a fixed subset of it (the
usual threat model of the Byzantine-robustness papers cited here, where any ``f`` of the ``n`` workers of a step may
be Byzantine).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lite.core import validation


def check_fraction(fraction: float) -> float:
  """A malicious fraction in ``[0, 1)`` (at least one honest client remains whenever a round has a client)."""
  return validation.check_float("fraction", fraction, low=0.0, high=1.0, high_inclusive=False)


def check_seed(seed: int) -> int:
  return validation.check_int("seed", seed, minimum=0)


def num_malicious(fraction: float, num_real: jax.Array, num_slots: int) -> jax.Array:
  """``floor(fraction * num_real)`` as int32, computed in float64 on the host (``0.3 * 10`` is 3, not 2)."""
  table = np.array([math.floor(fraction * n) for n in range(num_slots + 1)], np.int32)
  return jnp.asarray(table)[num_real]


def choose_malicious(seed: int, round_num: jax.Array | int, client_mask: jax.Array, fraction: float) -> jax.Array:
  """Boolean ``[clients]``: the ``floor(fraction * n)`` real slots of round ``round_num`` that attack.

  See the module docstring for the rule. Jittable (``round_num`` and ``client_mask`` may be traced; ``seed`` and
  ``fraction`` are static).

  Args:
    seed: the attack's seed, an int ``>= 0`` (independent of the run's seed).
    round_num: the round, an int (traced or not).
    client_mask: boolean ``[clients]``, True for real clients.
    fraction: the malicious fraction in ``[0, 1)``.
  """
  seed = check_seed(seed)
  fraction = check_fraction(fraction)
  client_mask = jnp.asarray(client_mask)
  if client_mask.ndim != 1 or client_mask.dtype != jnp.bool_:
    raise ValueError(f"client_mask must be a 1-d boolean array, got shape {client_mask.shape} and dtype "
                     f"{client_mask.dtype}.")
  num_slots = client_mask.shape[0]
  round_key = jax.random.fold_in(jax.random.key(seed), jnp.asarray(round_num, jnp.int32))
  # Padding scores 2 (above every uniform draw in [0, 1)), so real slots come first; the stable sort sends ties to
  # the lower slot.
  scores = jnp.where(client_mask, jax.random.uniform(round_key, (num_slots,)), 2.0)
  order = jnp.argsort(scores, stable=True)
  rank = jnp.zeros((num_slots,), jnp.int32).at[order].set(jnp.arange(num_slots, dtype=jnp.int32))
  count = num_malicious(fraction, jnp.sum(client_mask, dtype=jnp.int32), num_slots)
  return (rank < count) & client_mask
