"""The secure sums' former int64/float64 arithmetic (under ``jax.enable_x64``), kept only as a test reference.

:mod:`fedjax_lite.aggregators.exact_arithmetic` computes the same numbers in 32-bit JAX; these functions are the
previous implementation it is checked against, bit for bit. Tests only: the library never enables x64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_lite.aggregators.secure import COUNT_BITS, FLOAT_QUANTIZATION_LEVELS, LIMB_BITS, group_bits


def _to_limbs(summand: jax.Array, num_limbs: int) -> jax.Array:
  """uint32 ``[num_limbs, *shape]`` 16-bit limbs of a non-negative int64 ``summand`` (call inside an x64 block)."""
  mask = (1 << LIMB_BITS) - 1
  return jnp.stack([((summand >> (LIMB_BITS * k)) & mask).astype(jnp.uint32) for k in range(num_limbs)])


def _from_limbs(limb_sums: jax.Array, modulus_bits: int) -> jax.Array:
  """``(sum_k limb_sums[k] * 2^(16 k)) mod 2^modulus_bits`` as int64 (call inside an x64 block).

  uint64 arithmetic wraps modulo ``2^64``, a multiple of ``2^modulus_bits``, so the reduction is exact however
  large the limb sums are.
  """
  total = jnp.zeros(limb_sums.shape[1:], jnp.uint64)
  for k in range(limb_sums.shape[0]):
    total = total + (limb_sums[k].astype(jnp.uint64) << (LIMB_BITS * k))
  return (total & ((1 << modulus_bits) - 1)).astype(jnp.int64)


def _quantize(value: jax.Array, upper: jax.Array, lower: jax.Array) -> jax.Array:
  """FLOAT mode client step for one leaf: ``q = clip(round(clip(x,L,U) s) - round(L s), 0, M)`` as int64.

  ``upper``/``lower`` are in the value's dtype; call inside an x64 block.
  """
  clipped = jnp.clip(value, lower, upper).astype(jnp.float64)
  scale = _scale(upper, lower)
  shift = jnp.round(lower.astype(jnp.float64) * scale).astype(jnp.int64)
  levels = jnp.round(clipped * scale).astype(jnp.int64) - shift
  return jnp.clip(levels, 0, FLOAT_QUANTIZATION_LEVELS)


def _scale(upper: jax.Array, lower: jax.Array) -> jax.Array:
  """``s = M / (U - L)`` in float64, 0 when ``U <= L`` (call inside an x64 block)."""
  width = upper.astype(jnp.float64) - lower.astype(jnp.float64)
  return jnp.where(width > 0, FLOAT_QUANTIZATION_LEVELS / jnp.where(width > 0, width, 1.0), 0.0)


def _dequantize(summed_levels: jax.Array, count: jax.Array, upper: jax.Array, lower: jax.Array) -> jax.Array:
  """FLOAT mode server step: ``(S + n round(L s)) (U - L) / M`` in float64 (``n L`` if ``U == L``, NaN if
  ``U < L``); call inside an x64 block."""
  upper64, lower64 = upper.astype(jnp.float64), lower.astype(jnp.float64)
  count64 = count.astype(jnp.float64)
  scale = _scale(upper, lower)
  shift = jnp.round(lower64 * scale)
  decoded = (summed_levels.astype(jnp.float64) + count64 * shift) * ((upper64 - lower64) / FLOAT_QUANTIZATION_LEVELS)
  decoded = jnp.where(upper64 == lower64, count64 * lower64, decoded)
  return jnp.where(upper64 < lower64, jnp.nan, decoded)


def _decode_counts(limb_sums: jax.Array, num_client_slots: int | None) -> jax.Array:
  """The exact counts from 1-bit secure sums, int32 (call inside an x64 block)."""
  return _from_limbs(limb_sums, group_bits(COUNT_BITS, num_client_slots)).astype(jnp.int32)
