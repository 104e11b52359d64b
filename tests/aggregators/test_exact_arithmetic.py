"""The 32-bit secure-sum arithmetic equals the int64/float64 formulas: against NumPy re-implementations (IEEE float64)
and against secure.py's x64 functions (called inside ``jax.enable_x64``, test-only), bit for bit."""

from __future__ import annotations

import fractions
import functools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedjax_lite.aggregators import exact_arithmetic as ea
from fedjax_lite.aggregators import secure
from tests.aggregators import x64_reference

M = 2**32 - 1
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)
TINY = np.finfo(np.float32).tiny  # smallest normal float32; XLA:CPU flushes anything smaller to 0

_QUANTIZE = jax.jit(ea.quantize_float)
_DEQUANTIZE = jax.jit(ea.dequantize, static_argnums=4)
QUANTIZE_SIZE, DEQUANTIZE_SIZE = 16, 6  # one compilation per dtype: every call pads to these sizes


def QUANTIZE(values, upper, lower):  # noqa: N802 (a jitted function)
  values = np.asarray(values)
  upper, lower = np.asarray(upper, values.dtype), np.asarray(lower, values.dtype)  # no weak-type retracing
  padded = np.zeros((-(-values.size // QUANTIZE_SIZE) * QUANTIZE_SIZE,), values.dtype)
  padded[:values.size] = values.ravel()
  chunks = [_QUANTIZE(chunk, upper, lower) for chunk in padded.reshape(-1, QUANTIZE_SIZE)]
  return np.concatenate([np.asarray(c) for c in chunks], axis=1)[:, :values.size].reshape((2,) + values.shape)


def DEQUANTIZE(summed, count, upper, lower, dtype):  # noqa: N802
  upper, lower = np.asarray(upper, dtype), np.asarray(lower, dtype)  # no weak-type retracing
  hi, lo = np.asarray(summed.hi).ravel(), np.asarray(summed.lo).ravel()
  size = -(-hi.size // DEQUANTIZE_SIZE) * DEQUANTIZE_SIZE
  hi, lo = np.pad(hi, (0, size - hi.size)), np.pad(lo, (0, size - lo.size))
  chunks = [np.asarray(_DEQUANTIZE(ea.Words(h, l), count, upper, lower, dtype))
            for h, l in zip(hi.reshape(-1, DEQUANTIZE_SIZE), lo.reshape(-1, DEQUANTIZE_SIZE))]
  return np.concatenate(chunks)[:np.asarray(summed.hi).size].reshape(np.shape(summed.hi))


# ------------------------------------------------------------------------------------------ references


def np_quantize(values, upper, lower):
  """The FLOAT mode client formula in NumPy float64/int64 (IEEE, no flushing)."""
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


def x64_quantize(values, upper, lower):
  with jax.enable_x64(True):
    dtype = values.dtype
    return np.asarray(jax.jit(x64_reference._quantize)(jnp.asarray(values), jnp.asarray(upper, dtype),
                                                jnp.asarray(lower, dtype)))


@functools.partial(jax.jit, static_argnums=4)
def _x64_dequantize(summed, count, upper, lower, dtype):
  return x64_reference._dequantize(summed, count, upper, lower).astype(dtype)


def x64_dequantize(summed, count, upper, lower, dtype):
  with jax.enable_x64(True):
    out = _x64_dequantize(
        jnp.asarray(summed, jnp.int64), jnp.asarray(count, jnp.int64), jnp.asarray(upper, dtype),
        jnp.asarray(lower, dtype), dtype)
    return np.asarray(out)


def levels_of(limbs) -> np.ndarray:
  limbs = np.asarray(limbs)
  assert limbs.dtype == np.uint32 and limbs.shape[0] == 2 and limbs.max(initial=0) <= 0xFFFF
  return limbs[0].astype(np.int64) + (limbs[1].astype(np.int64) << 16)


def words(values) -> ea.Words:
  values = np.asarray(values, np.uint64)
  return ea.Words(jnp.asarray((values >> 32).astype(np.uint32)), jnp.asarray((values & 0xFFFFFFFF).astype(np.uint32)))


def as_int(w: ea.Words) -> np.ndarray:
  return (np.asarray(w.hi).astype(np.uint64) << 32) | np.asarray(w.lo).astype(np.uint64)


def assert_same_bits(actual, desired):
  actual, desired = np.asarray(actual), np.asarray(desired)
  assert actual.dtype == desired.dtype, (actual.dtype, desired.dtype)
  same = (actual == desired) | (np.isnan(actual.astype(np.float32)) & np.isnan(desired.astype(np.float32)))
  same &= np.signbit(actual.astype(np.float32)) == np.signbit(desired.astype(np.float32))
  bad = np.flatnonzero(~same)
  assert bad.size == 0, f"{bad.size} differ, e.g. {actual.ravel()[bad[:5]]} vs {desired.ravel()[bad[:5]]}"


def normal_or_zero(x) -> np.ndarray:
  x = np.abs(np.asarray(x, np.float32))
  return (x == 0) | (x >= TINY)


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
def test_quantize_equals_float64_formula_and_x64_code(case):
  values, upper, lower = case
  q = levels_of(QUANTIZE(values, upper, lower))
  np.testing.assert_array_equal(q, np_quantize(values, upper, lower))
  if normal_or_zero(values).all() and normal_or_zero([upper, lower]).all():  # XLA:CPU flushes subnormals
    np.testing.assert_array_equal(q, x64_quantize(values, upper, lower))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_quantize_half_precision_values(dtype):
  rng = np.random.default_rng(3)
  for upper, lower in [(7.5, -3.25), (1.0, 0.0), (0.01, -0.02), (50000.0, -100.0)]:
    values = rng.uniform(lower * 1.2 - 0.1, upper * 1.2 + 0.1, 160).astype(dtype)
    q = levels_of(QUANTIZE(jnp.asarray(values), upper, lower))
    np.testing.assert_array_equal(q, np_quantize(values, upper, lower))
    np.testing.assert_array_equal(q, x64_quantize(values, upper, lower))


def test_quantize_ties_round_half_to_even():
  # Bounds [-3, 3]: s = M / 6 = 715827882.5, so x = 1 is the tie 715827882.5 -> 715827882 and round(L s) =
  # round(-2147483647.5) = -2147483648; x = 3 gives round(2147483647.5) = 2147483648 -> q clipped to M.
  q = levels_of(QUANTIZE(jnp.array([1.0, -1.0, 3.0, -3.0, 0.0], jnp.float32), 3.0, -3.0))
  np.testing.assert_array_equal(q, [715827882 + 2**31, 2**31 - 715827882, M, 0, 2**31])


def test_quantize_exact_rational_reference_within_one_level():
  """Float64 (and so this module) deviates from the real-number q by at most one level, and rarely."""
  rng = np.random.default_rng(5)
  upper, lower = np.float32(7.3), np.float32(-2.9)
  values = rng.uniform(-2.9, 7.3, 2000).astype(np.float32)
  q = levels_of(QUANTIZE(values, upper, lower))
  width = fractions.Fraction(float(upper)) - fractions.Fraction(float(lower))
  shift = round(fractions.Fraction(float(lower)) * M / width)  # Python rounds Fractions half to even
  exact = np.array([min(max(round(fractions.Fraction(float(x)) * M / width) - shift, 0), M) for x in values])
  assert np.abs(q - exact).max() <= 1
  assert np.mean(q != exact) < 0.01


def test_quantize_subnormals_follow_ieee_where_xla_cpu_flushes():
  upper, lower = np.float32(4e-39), np.float32(-4e-39)  # subnormal bounds
  values = np.array([1e-39, -2e-39, 3.9e-39, 0.0], np.float32)
  q = levels_of(QUANTIZE(values, upper, lower))
  np.testing.assert_array_equal(q, np_quantize(values, upper, lower))
  assert len(set(q.tolist())) == 4  # distinct levels, not all flushed to one


def test_non_finite_bounds_give_zero_levels_and_nan_sums():
  for upper, lower in [(np.inf, 0.0), (1.0, -np.inf), (np.nan, 0.0)]:
    np.testing.assert_array_equal(levels_of(QUANTIZE(jnp.ones(3), upper, lower)), 0)
    assert np.isnan(np.asarray(DEQUANTIZE(words([5]), jnp.int32(2), upper, lower, jnp.float32))).all()


# ------------------------------------------------------------------------------------------ FLOAT mode: dequantize


@SETTINGS
@given(case=float_case(), count=st.integers(0, 2**16),
       levels=hnp.arrays(np.int64, 6, elements=st.integers(0, 2**48 - 1)))
def test_dequantize_equals_float64_formula_and_x64_code(case, count, levels):
  _, upper, lower = case
  levels = np.minimum(levels, count * M)  # a real sum of count levels
  got = DEQUANTIZE(words(levels), jnp.int32(count), upper, lower, jnp.float32)
  assert_same_bits(got, np_dequantize(levels, count, upper, lower, np.float32))
  if normal_or_zero(got).all() and normal_or_zero([upper, lower]).all():
    assert_same_bits(got, x64_dequantize(levels, count, upper, lower, jnp.float32))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_dequantize_half_precision(dtype):
  rng = np.random.default_rng(11)
  for upper, lower in [(7.5, -3.25), (1.0, 0.0), (0.01, -0.02), (0.5, 0.5), (-1.0, 1.0)]:
    count = 700
    levels = rng.integers(0, count * M, 60, dtype=np.int64)
    got = DEQUANTIZE(words(levels), jnp.int32(count), upper, lower, dtype)
    assert_same_bits(got, np_dequantize(levels, count, upper, lower, dtype))
    assert_same_bits(got, x64_dequantize(levels, count, upper, lower, dtype))


def test_quantize_then_dequantize_round_trip():
  rng = np.random.default_rng(2)
  values = rng.uniform(-4, 9, (300, 6)).astype(np.float32)
  limb_sums = jnp.asarray(QUANTIZE(values, 7.5, -3.25).sum(axis=1, dtype=np.uint32))  # [2, 6]
  summed = ea.limbs_to_modular(limb_sums, 41)
  got = np.asarray(DEQUANTIZE(summed, jnp.int32(300), 7.5, -3.25, jnp.float32))
  np.testing.assert_array_equal(as_int(summed), np_quantize(values, 7.5, -3.25).sum(0))
  assert_same_bits(got, x64_dequantize(np_quantize(values, 7.5, -3.25).sum(0), 300, 7.5, -3.25, jnp.float32))


def test_dequantize_special_cases():
  np.testing.assert_array_equal(DEQUANTIZE(words([0]), jnp.int32(3), 0.75, 0.75, jnp.float32), [2.25])
  assert np.signbit(DEQUANTIZE(words([0]), jnp.int32(0), -0.5, -0.5, jnp.float32)[0])  # 0 * (-0.5) = -0.0
  assert np.isnan(np.asarray(DEQUANTIZE(words([7]), jnp.int32(3), -1.0, 1.0, jnp.float32))).all()
  # Overflow to Inf and gradual underflow, as IEEE (NumPy) rounds float64 to float32.
  big = DEQUANTIZE(words([3 * M]), jnp.int32(3), 3e38, 2e38, jnp.float32)
  assert_same_bits(big, np_dequantize(np.array([3 * M]), 3, 3e38, 2e38, np.float32))
  assert np.isinf(np.asarray(big)).all()
  tiny = DEQUANTIZE(words([1234567]), jnp.int32(1), 1e-38, 0.0, jnp.float32)
  assert_same_bits(tiny, np_dequantize(np.array([1234567]), 1, 1e-38, 0.0, np.float32))
  assert 0 < float(tiny[0]) < TINY


# ------------------------------------------------------------------------------------------ INT mode


@pytest.mark.parametrize("dtype,lower,upper", [
    (jnp.int32, -(2**31), 2**31 - 1), (jnp.int32, -1000, 2**20), (jnp.int8, -128, 100), (jnp.uint32, 5, 2**32 - 1),
    (jnp.int16, -3, 9)])
def test_int_mode_encode_and_decode_equal_the_int64_code(dtype, lower, upper):
  info = np.iinfo(dtype)
  rng = np.random.default_rng(7)
  values = rng.integers(info.min, info.max, (50, 7), endpoint=True, dtype=np.int64).astype(dtype)
  values[0, :2] = [info.min, info.max]
  num_limbs = secure._num_limbs((upper - lower).bit_length())
  limbs = jax.jit(ea.to_limbs_int, static_argnums=3)(values, np.asarray(lower, dtype), np.asarray(upper, dtype),
                                                      num_limbs)
  shifted = np.clip(values.astype(np.int64), lower, upper) - lower
  assert limbs.dtype == jnp.uint32 and limbs.shape == (num_limbs, 50, 7)
  np.testing.assert_array_equal(sum(np.asarray(limbs[k], np.int64) << (16 * k) for k in range(num_limbs)), shifted)
  limb_sums = jnp.sum(limbs, axis=1, dtype=jnp.uint32)
  for modulus_bits in (3, 32, 37, 62):
    summed = ea.limbs_to_modular(limb_sums, modulus_bits)
    np.testing.assert_array_equal(as_int(summed), shifted.sum(0) % 2**modulus_bits)
    got = jax.jit(ea.int_decode, static_argnums=3)(summed, jnp.int32(50), np.asarray(lower, dtype), dtype)
    with jax.enable_x64(True):
      expected = (x64_reference._from_limbs(jnp.asarray(limb_sums), modulus_bits)
                  + 50 * jnp.asarray(lower, dtype).astype(jnp.int64)).astype(dtype)
    assert got.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


@SETTINGS
@given(limb_sums=hnp.arrays(np.uint32, (4, 5)), modulus_bits=st.integers(1, 62))
def test_limbs_to_modular_is_the_exact_reduction(limb_sums, modulus_bits):
  got = as_int(ea.limbs_to_modular(jnp.asarray(limb_sums), modulus_bits))
  for j in range(5):
    exact = sum(int(limb_sums[k, j]) << (16 * k) for k in range(4)) % 2**modulus_bits
    assert int(got[j]) == exact


def test_decode_counts():
  limb_sums = jnp.array([[0, 1, 65536, 12345]], jnp.uint32)
  counts = ea.decode_counts(limb_sums, secure.group_bits(1, 2**16))
  assert counts.dtype == jnp.int32
  np.testing.assert_array_equal(counts, [0, 1, 65536, 12345])
  with jax.enable_x64(True):
    np.testing.assert_array_equal(counts, x64_reference._decode_counts(limb_sums, None))


# ------------------------------------------------------------------------------------------ modular sum


@pytest.mark.parametrize("modulus,symmetric_range,dtype", [
    (7, False, jnp.int32), (1000, True, jnp.int32), (2**31 - 1, False, jnp.int32), (2**31, True, jnp.int32),
    (2**32, False, jnp.uint32), (3 * 2**30 + 1, False, jnp.uint32), (2**16, False, jnp.int32),
    (100, True, jnp.int8)])
def test_modular_encode_and_decode_equal_the_int64_code(modulus, symmetric_range, dtype):
  group_modulus = 2 * modulus - 1 if symmetric_range else modulus
  num_limbs = secure._num_limbs((group_modulus - 1).bit_length())
  info = np.iinfo(dtype)
  values = np.random.default_rng(9).integers(info.min, info.max, (40, 6), endpoint=True,
                                             dtype=np.int64).astype(dtype)
  values[0, :2] = [info.min, info.max]
  limbs = jax.jit(ea.modular_limbs, static_argnums=(1, 2))(values, group_modulus, num_limbs)
  residues = values.astype(np.int64) % group_modulus
  np.testing.assert_array_equal(sum(np.asarray(limbs[k], np.int64) << (16 * k) for k in range(num_limbs)), residues)
  limb_sums = jnp.sum(limbs, axis=1, dtype=jnp.uint32)
  got = jax.jit(ea.modular_decode, static_argnums=(1, 2, 3))(limb_sums, modulus, symmetric_range, dtype)
  expected = residues.sum(0) % group_modulus
  if symmetric_range:
    expected = np.where(expected >= modulus, expected - group_modulus, expected)
  assert got.dtype == dtype
  np.testing.assert_array_equal(np.asarray(got, np.int64), expected)


@SETTINGS
@given(limb_sums=hnp.arrays(np.uint32, (3, 4)), group_modulus=st.integers(2, 2**32))
def test_modular_residue_is_the_exact_remainder(limb_sums, group_modulus):
  got = np.asarray(ea.modular_residue(jnp.asarray(limb_sums), group_modulus))
  for j in range(4):
    assert int(got[j]) == sum(int(limb_sums[k, j]) << (16 * k) for k in range(3)) % group_modulus


# ------------------------------------------------------------------------------------------ 32 bits, arguments


def test_traced_code_has_no_64_bit_values():
  def dtypes_of(fn, *args):
    jaxpr = jax.make_jaxpr(fn)(*args)
    found = set()

    def visit(jaxpr):
      for eqn in jaxpr.eqns:
        found.update(str(v.aval.dtype) for v in eqn.outvars)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
          visit(sub)

    visit(jaxpr.jaxpr)
    return found

  found = dtypes_of(ea.quantize_float, jnp.ones(3), jnp.float32(2.0), jnp.float32(-1.0))
  found |= dtypes_of(lambda s, n, u, l: ea.dequantize(s, n, u, l, jnp.float32), words([1, 2]), jnp.int32(1),
                     jnp.float32(2.0), jnp.float32(-1.0))
  found |= dtypes_of(lambda s: ea.modular_decode(s, 2**31, True, jnp.int32), jnp.ones((2, 3), jnp.uint32))
  assert not {"int64", "uint64", "float64"} & found, found


def test_bad_arguments():
  with pytest.raises(TypeError, match="floating dtype"):
    ea.quantize_float(jnp.ones(2, jnp.int32), 1.0, 0.0)
  with pytest.raises(TypeError, match="dtype"):
    ea.dequantize(words([1]), jnp.int32(1), 1.0, 0.0, jnp.int32)
  with pytest.raises(TypeError, match="integer dtype"):
    ea.to_limbs_int(jnp.ones(2), 0, 1, 1)
  with pytest.raises(ValueError, match="num_limbs"):
    ea.to_limbs_int(jnp.ones(2, jnp.int32), 0, 1, 0)
  with pytest.raises(ValueError, match="modulus_bits"):
    ea.limbs_to_modular(jnp.ones((1, 2), jnp.uint32), 63)
  with pytest.raises(TypeError, match="uint32"):
    ea.limbs_to_modular(jnp.ones((1, 2), jnp.int32), 8)
  with pytest.raises(ValueError, match="group_modulus"):
    ea.modular_residue(jnp.ones((1, 2), jnp.uint32), 2**32 + 1)
  with pytest.raises(ValueError, match="group_modulus"):
    ea.modular_limbs(jnp.ones(2, jnp.int32), 1, 1)
