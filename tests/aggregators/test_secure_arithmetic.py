"""The secure sums' encodings and decodings equal the int64/float64 formulas bit for bit: the FLOAT mode levels and
decoded sums against NumPy float64 (IEEE, written from the formulas), INT mode and the modular sum against NumPy
int64; and the x64 region is the only place with 64-bit values."""

from __future__ import annotations

import fractions

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedjax_lite.aggregators import secure
from fedjax_lite.aggregators.secure import secure_modular_sum, secure_sum

M = 2**32 - 1
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)
TINY = np.finfo(np.float32).tiny  # smallest normal float32; XLA:CPU flushes anything smaller to 0
KEY = jax.random.key(0)


@jax.jit
def QUANTIZE(values, upper, lower):  # noqa: N802 (a jitted function)
  """The FLOAT mode levels as the client computes them: uint32 limbs [2, *shape]."""
  return secure.in_x64(lambda v, u, l: secure._to_limbs(secure._quantize(v, u, l), 2), values, upper, lower,
                       float64=True)


def quantize(values, upper, lower) -> np.ndarray:
  values = jnp.asarray(values)
  limbs = np.asarray(QUANTIZE(values, jnp.asarray(upper, values.dtype), jnp.asarray(lower, values.dtype)))
  assert limbs.dtype == np.uint32 and limbs.shape == (2,) + values.shape and limbs.max(initial=0) <= 0xFFFF
  return limbs[0].astype(np.int64) + (limbs[1].astype(np.int64) << 16)


def limbs_of(levels) -> np.ndarray:
  """uint32 [4, n] 16-bit limbs of non-negative int64 sums below 2^64."""
  levels = np.asarray(levels, np.uint64)
  return np.stack([((levels >> np.uint64(16 * k)) & np.uint64(0xFFFF)).astype(np.uint32) for k in range(4)])


DEQUANTIZE = jax.jit(lambda limb_sums, count, upper, lower: secure.in_x64(
    lambda s, n, u, l: secure._dequantize(secure._from_limbs(s, 62), n.astype(jnp.int64), u, l).astype(u.dtype),
    limb_sums, count, upper, lower, float64=True))


def dequantize(summed, count, upper, lower, dtype) -> np.ndarray:
  """The FLOAT mode server decoding of int64 sums ``summed`` (as the server forms them from limb sums)."""
  return np.asarray(DEQUANTIZE(limbs_of(summed), jnp.int32(count), jnp.asarray(upper, dtype),
                               jnp.asarray(lower, dtype)))


# ------------------------------------------------------------------------------------------ references


def np_quantize(values, upper, lower):
  """The FLOAT mode client formula in NumPy float64/int64 (IEEE)."""
  dtype = values.dtype
  upper64, lower64 = np.float64(dtype.type(upper)), np.float64(dtype.type(lower))
  width = upper64 - lower64
  scale = M / width if width > 0 else 0.0
  clipped = np.clip(values, dtype.type(lower), dtype.type(upper)).astype(np.float64)
  return np.clip(np.round(clipped * scale).astype(np.int64) - np.int64(np.round(lower64 * scale)), 0, M)


def np_dequantize(summed, count, upper, lower, dtype):
  """The FLOAT mode server formula in NumPy float64, then cast to ``dtype`` (bfloat16 through float32, as XLA)."""
  upper64, lower64 = np.float64(dtype(upper)), np.float64(dtype(lower))
  width = upper64 - lower64
  scale = M / width if width > 0 else 0.0
  with np.errstate(invalid="ignore", over="ignore"):
    decoded = (summed.astype(np.float64) + np.float64(count) * np.round(lower64 * scale)) * (width / M)
    decoded = np.float64(count) * lower64 * np.ones_like(decoded) if upper64 == lower64 else decoded
    decoded = np.full_like(decoded, np.nan) if upper64 < lower64 else decoded
    if dtype == jnp.bfloat16:
      return decoded.astype(np.float32).astype(dtype)
    return decoded.astype(dtype)


def assert_same_bits(actual, desired):
  actual, desired = np.asarray(actual), np.asarray(desired)
  assert actual.dtype == desired.dtype, (actual.dtype, desired.dtype)
  same = (actual == desired) | (np.isnan(actual.astype(np.float32)) & np.isnan(desired.astype(np.float32)))
  same &= np.signbit(actual.astype(np.float32)) == np.signbit(desired.astype(np.float32))
  bad = np.flatnonzero(~same)
  assert bad.size == 0, f"{bad.size} differ, e.g. {actual.ravel()[bad[:5]]} vs {desired.ravel()[bad[:5]]}"


def normal_or_zero(x) -> bool:
  """No subnormal float32 (XLA:CPU flushes them to zero, IEEE NumPy does not)."""
  x = np.abs(np.asarray(x, np.float32))
  return bool(((x == 0) | (x >= TINY) | ~np.isfinite(x)).all())


# ------------------------------------------------------------------------------------------ FLOAT mode: quantize

bound_values = st.one_of(
    st.floats(-1024.0, 1024.0, width=32),
    st.floats(-2.0**-10, 2.0**-10, width=32),
    st.floats(-(2.0**127), 2.0**127, width=32),
    st.sampled_from([0.0, 1.0, -1.0, 3.0, -3.0, 0.1, 2.0**-126, 2.0**100, -(2.0**-100)]),
)


@st.composite
def float_case(draw):
  """Bounds ``L <= U`` (sometimes equal, adjacent, or of one sign) and values around and between them."""
  a, b = draw(bound_values), draw(bound_values)
  lower, upper = np.float32(min(a, b)), np.float32(max(a, b))
  kind = draw(st.sampled_from(["any", "adjacent", "equal", "narrow"]))
  if kind == "adjacent":
    upper = np.nextafter(lower, np.float32(np.inf))
  elif kind == "equal":
    upper = lower
  elif kind == "narrow":
    upper = np.float32(lower + np.spacing(lower) * draw(st.integers(1, 300)))
  span = float(upper) - float(lower)
  middle = draw(st.lists(st.floats(0.0, 1.0), min_size=8, max_size=8))
  values = [float(lower) + t * span for t in middle] + [
      lower, upper, np.nextafter(lower, np.float32(np.inf)), np.nextafter(upper, np.float32(-np.inf)),
      float(lower) - span, float(upper) + span, 0.0, -0.0]
  with np.errstate(over="ignore"):
    values = np.clip(np.nan_to_num(np.asarray(values, np.float32)), -3e38, 3e38).astype(np.float32)
  return values, upper, lower


@SETTINGS
@given(case=float_case())
def test_quantize_equals_the_float64_formula(case):
  values, upper, lower = case
  if normal_or_zero(values) and normal_or_zero([upper, lower]):
    np.testing.assert_array_equal(quantize(values, upper, lower), np_quantize(values, upper, lower))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_quantize_half_precision_values(dtype):
  rng = np.random.default_rng(3)
  for upper, lower in [(7.5, -3.25), (1.0, 0.0), (0.01, -0.02), (50000.0, -100.0)]:
    values = rng.uniform(lower * 1.2 - 0.1, upper * 1.2 + 0.1, 160).astype(dtype)
    np.testing.assert_array_equal(quantize(values, upper, lower), np_quantize(values, upper, lower))


def test_quantize_ties_round_half_to_even():
  # Bounds [-3, 3]: s = M / 6 = 715827882.5, so x = 1 is the tie 715827882.5 -> 715827882 and round(L s) =
  # round(-2147483647.5) = -2147483648; x = 3 gives round(2147483647.5) = 2147483648 -> q clipped to M.
  q = quantize(np.array([1.0, -1.0, 3.0, -3.0, 0.0], np.float32), 3.0, -3.0)
  np.testing.assert_array_equal(q, [715827882 + 2**31, 2**31 - 715827882, M, 0, 2**31])


def test_quantize_exact_rational_reference_within_one_level():
  """Float64 deviates from the real-number q by at most one level, and rarely."""
  rng = np.random.default_rng(5)
  upper, lower = np.float32(7.3), np.float32(-2.9)
  values = rng.uniform(-2.9, 7.3, 2000).astype(np.float32)
  q = quantize(values, upper, lower)
  width = fractions.Fraction(float(upper)) - fractions.Fraction(float(lower))
  shift = round(fractions.Fraction(float(lower)) * M / width)  # Python rounds Fractions half to even
  exact = np.array([min(max(round(fractions.Fraction(float(x)) * M / width) - shift, 0), M) for x in values])
  assert np.abs(q - exact).max() <= 1
  assert np.mean(q != exact) < 0.01


def test_non_finite_bounds_give_zero_levels_and_nan_sums():
  for upper, lower in [(np.inf, 0.0), (1.0, -np.inf), (np.nan, 0.0), (np.inf, -np.inf)]:
    np.testing.assert_array_equal(quantize(np.ones(3, np.float32), upper, lower), 0)
    assert np.isnan(dequantize([5], 2, upper, lower, jnp.float32)).all()


# ------------------------------------------------------------------------------------------ FLOAT mode: dequantize


@SETTINGS
@given(case=float_case(), count=st.integers(0, 2**16),
       levels=hnp.arrays(np.int64, 6, elements=st.integers(0, 2**48 - 1)))
def test_dequantize_equals_the_float64_formula(case, count, levels):
  _, upper, lower = case
  levels = np.minimum(levels, count * M)  # a real sum of count levels
  got = dequantize(levels, count, upper, lower, jnp.float32)
  expected = np_dequantize(levels, count, upper, lower, np.float32)
  if normal_or_zero(expected) and normal_or_zero([upper, lower]):
    assert_same_bits(got, expected)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_dequantize_half_precision(dtype):
  rng = np.random.default_rng(11)
  for upper, lower in [(7.5, -3.25), (1.0, 0.0), (0.01, -0.02), (0.5, 0.5), (-1.0, 1.0)]:
    count = 700
    levels = rng.integers(0, count * M, 60, dtype=np.int64)
    assert_same_bits(dequantize(levels, count, upper, lower, dtype), np_dequantize(levels, count, upper, lower, dtype))


def test_quantize_then_dequantize_round_trip():
  rng = np.random.default_rng(2)
  values = rng.uniform(-4, 9, (300, 6)).astype(np.float32)
  levels = np_quantize(values, 7.5, -3.25)
  np.testing.assert_array_equal(quantize(values, 7.5, -3.25), levels)
  assert_same_bits(dequantize(levels.sum(0), 300, 7.5, -3.25, jnp.float32),
                   np_dequantize(levels.sum(0), 300, 7.5, -3.25, np.float32))


def test_dequantize_special_cases():
  np.testing.assert_array_equal(dequantize([0], 3, 0.75, 0.75, jnp.float32), [2.25])
  assert np.signbit(dequantize([0], 0, -0.5, -0.5, jnp.float32)[0])  # 0 * (-0.5) = -0.0
  assert np.isnan(dequantize([7], 3, -1.0, 1.0, jnp.float32)).all()
  # Overflow to Inf, as IEEE (NumPy) rounds float64 to float32.
  big = dequantize([3 * M], 3, 3e38, 2e38, jnp.float32)
  assert_same_bits(big, np_dequantize(np.array([3 * M]), 3, 3e38, 2e38, np.float32))
  assert np.isinf(big).all()


# ------------------------------------------------------------------------------------------ INT mode


@pytest.mark.parametrize("dtype,lower,upper", [
    (jnp.int32, -(2**31), 2**31 - 1), (jnp.int32, -1000, 2**20), (jnp.int8, -128, 100), (jnp.uint32, 5, 2**32 - 1),
    (jnp.int16, -3, 9)])
@pytest.mark.parametrize("modulus_bits", [3, 32, 37, None])
def test_int_mode_encodes_and_decodes_as_the_int64_formula(dtype, lower, upper, modulus_bits):
  info = np.iinfo(dtype)
  rng = np.random.default_rng(7)
  values = rng.integers(info.min, info.max, (50, 7), endpoint=True, dtype=np.int64).astype(dtype)
  values[0, :2] = [info.min, info.max]
  aggregator = secure_sum(upper, lower, modulus_bits=modulus_bits)
  shifted = np.clip(values.astype(np.int64), lower, upper) - lower
  limbs = np.asarray(jax.jit(aggregator.client)((), values[0], jnp.float32(1.0), KEY)["value"])
  num_limbs = limbs.shape[0]
  assert limbs.dtype == np.uint32 and limbs.shape == (secure._num_limbs((upper - lower).bit_length()), 7)
  np.testing.assert_array_equal(sum(limbs[k].astype(np.int64) << (16 * k) for k in range(num_limbs)), shifted[0])
  result = jax.jit(aggregator.next)((), values, jnp.ones(50), KEY).result
  modulus = 2**(modulus_bits or 62)
  expected = (shifted.sum(0) % modulus + 50 * lower).astype(dtype)  # the int64 -> dtype cast wraps
  assert result.dtype == dtype
  np.testing.assert_array_equal(np.asarray(result), expected)


# ------------------------------------------------------------------------------------------ modular sum


@pytest.mark.parametrize("modulus,symmetric_range,dtype", [
    (7, False, jnp.int32), (1000, True, jnp.int32), (2**31 - 1, False, jnp.int32), (2**31, True, jnp.int32),
    (2**32, False, jnp.uint32), (3 * 2**30 + 1, False, jnp.uint32), (2**16, False, jnp.int32),
    (100, True, jnp.int8)])
def test_modular_sum_encodes_and_decodes_as_the_int64_formula(modulus, symmetric_range, dtype):
  group_modulus = 2 * modulus - 1 if symmetric_range else modulus
  info = np.iinfo(dtype)
  values = np.random.default_rng(9).integers(info.min, info.max, (40, 6), endpoint=True,
                                             dtype=np.int64).astype(dtype)
  values[0, :2] = [info.min, info.max]
  aggregator = secure_modular_sum(modulus, symmetric_range=symmetric_range)
  residues = values.astype(np.int64) % group_modulus
  limbs = np.asarray(jax.jit(aggregator.client)((), values[0], jnp.float32(1.0), KEY))
  assert limbs.dtype == np.uint32
  np.testing.assert_array_equal(sum(limbs[k].astype(np.int64) << (16 * k) for k in range(limbs.shape[0])),
                                residues[0])
  result = jax.jit(aggregator.next)((), values, jnp.ones(40), KEY).result
  expected = residues.sum(0) % group_modulus
  if symmetric_range:
    expected = np.where(expected >= modulus, expected - group_modulus, expected)
  assert result.dtype == dtype
  np.testing.assert_array_equal(np.asarray(result, np.int64), expected)


@pytest.mark.parametrize("modulus_bits", [1, 15, 16, 17, 31, 32, 33, 47, 48, 49, 61, 62])
def test_limb_sums_recombine_to_the_exact_reduction(modulus_bits):
  limb_sums = np.random.default_rng(modulus_bits).integers(0, 2**32, (4, 40), dtype=np.uint64).astype(np.uint32)
  limb_sums[:, 0], limb_sums[:, 1] = 0xFFFFFFFF, 0  # the largest and the smallest limb sums

  def words(sums):  # the int64 result as two uint32 words, to leave the region
    total = secure._from_limbs(sums, modulus_bits)
    return (total >> 32).astype(jnp.uint32), (total & 0xFFFFFFFF).astype(jnp.uint32)

  hi, lo = secure.in_x64(words, jnp.asarray(limb_sums), float64=False)
  got = (np.asarray(hi).astype(np.uint64) << np.uint64(32)) | np.asarray(lo).astype(np.uint64)
  for j in range(limb_sums.shape[1]):
    assert int(got[j]) == sum(int(limb_sums[k, j]) << (16 * k) for k in range(4)) % 2**modulus_bits
