"""Tests for fedjax_lite.core.validation: the shared argument checkers.

Each checker must accept exactly its boundary values (inclusive vs exclusive), reject bools where a number is
expected, reject NaN and Inf, and name the argument in every error.
"""

import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedjax_lite.core.validation import check_choice, check_float, check_int, check_positive

# check_int ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1, 5, 10, np.int64(1), np.int32(10), np.uint8(7)])
def test_check_int_accepts_inclusive_range(value):
  check_int("num_rounds", value, minimum=1, maximum=10)


@pytest.mark.parametrize("value, match", [(0, ">= 1, got 0"), (11, "<= 10, got 11"), (-5, ">= 1"),
                                          (np.int64(11), "<= 10")])
def test_check_int_rejects_outside_range(value, match):
  with pytest.raises(ValueError, match=f"num_rounds must be {match}"):
    check_int("num_rounds", value, minimum=1, maximum=10)


@pytest.mark.parametrize("value", [True, False, np.bool_(True)])
def test_check_int_rejects_bools(value):
  with pytest.raises(TypeError, match="num_rounds must be an int"):
    check_int("num_rounds", value, minimum=0)


@pytest.mark.parametrize("value", [1.0, 2.5, "3", None, [1], np.float32(1.0), float("nan"), float("inf")])
def test_check_int_rejects_non_ints(value):
  with pytest.raises(TypeError, match="seed"):
    check_int("seed", value)


def test_check_int_unbounded_and_none():
  check_int("offset", -(10**30))
  check_int("offset", 10**30)
  check_int("max_steps", None, allow_none=True)
  with pytest.raises(TypeError, match="max_steps must be an int or None"):
    check_int("max_steps", "x", allow_none=True)
  with pytest.raises(TypeError, match="max_steps must be an int, got NoneType"):
    check_int("max_steps", None)


@settings(max_examples=100, deadline=None)
@given(value=st.integers(-1000, 1000), minimum=st.integers(-100, 100), span=st.integers(0, 200))
def test_check_int_property(value, minimum, span):
  maximum = minimum + span
  if minimum <= value <= maximum:
    check_int("n", value, minimum=minimum, maximum=maximum)
  else:
    with pytest.raises(ValueError, match="n must be"):
      check_int("n", value, minimum=minimum, maximum=maximum)


# check_float ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0.0, 0.5, 1.0, 0, 1, np.float32(0.25), np.float64(1.0), np.int64(0)])
def test_check_float_inclusive_bounds_accept_endpoints(value):
  check_float("momentum", value, low=0.0, high=1.0)


@pytest.mark.parametrize("value", [-1e-12, 1.0000001, -1, 2, np.float32(-0.5)])
def test_check_float_inclusive_bounds_reject_outside(value):
  with pytest.raises(ValueError, match=r"momentum must be in \[0.0, 1.0\]"):
    check_float("momentum", value, low=0.0, high=1.0)


@pytest.mark.parametrize("value, low_inclusive, high_inclusive, ok", [
    (0.0, False, True, False),
    (1.0, False, True, True),
    (0.0, True, False, True),
    (1.0, True, False, False),
    (0.0, False, False, False),
    (1.0, False, False, False),
    (0.5, False, False, True),
    (1e-300, False, False, True),
    (np.nextafter(1.0, 0.0), False, False, True),
])
def test_check_float_exclusive_bounds(value, low_inclusive, high_inclusive, ok):
  kwargs = dict(low=0.0, high=1.0, low_inclusive=low_inclusive, high_inclusive=high_inclusive)
  if ok:
    check_float("rate", value, **kwargs)
  else:
    interval = ("[" if low_inclusive else "(") + "0.0, 1.0" + ("]" if high_inclusive else ")")
    with pytest.raises(ValueError, match=f"rate must be in {re.escape(interval)}, got {value}"):
      check_float("rate", value, **kwargs)


def test_check_float_one_sided():
  check_float("clip_norm", 1e30, low=0.0)
  check_float("shift", -1e30, high=0.0)
  with pytest.raises(ValueError, match=r"clip_norm must be in \[0.0, inf\]"):
    check_float("clip_norm", -1.0, low=0.0)
  with pytest.raises(ValueError, match=r"shift must be in \[-inf, 0.0\)"):
    check_float("shift", 0.0, high=0.0, high_inclusive=False)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), np.float32("nan"), np.float64("inf"),
                                   np.float16("-inf")])
def test_check_float_rejects_non_finite(value):
  with pytest.raises(ValueError, match="noise_multiplier must be finite"):
    check_float("noise_multiplier", value)
  with pytest.raises(ValueError, match="noise_multiplier must be finite"):
    check_float("noise_multiplier", value, low=-math.inf, high=math.inf)


@pytest.mark.parametrize("value", [True, False, np.bool_(False), "1.0", None, [1.0], 1 + 2j, np.array([1.0])])
def test_check_float_rejects_non_reals(value):
  with pytest.raises(TypeError, match="learning_rate must be a real number"):
    check_float("learning_rate", value)


def test_check_float_accepts_zero_dimensional_arrays_and_passes_tracers():
  import jax
  import jax.numpy as jnp

  assert check_float("learning_rate", np.array(0.5)) == 0.5
  assert check_float("learning_rate", jnp.float32(0.25), low=0.0) == 0.25
  with pytest.raises(ValueError, match="learning_rate"):
    check_float("learning_rate", jnp.float32(-1.0), low=0.0)
  # Under a transformation the value has no concrete number: it is passed through unchecked.
  assert jax.vmap(lambda x: check_float("learning_rate", x, low=0.0) * 2)(jnp.array([-1.0, 1.0])).shape == (2,)


def test_check_float_none():
  check_float("server_lr", None, allow_none=True)
  with pytest.raises(TypeError, match="server_lr must be a real number, got NoneType"):
    check_float("server_lr", None)


def test_check_float_huge_int_is_a_value_error():
  with pytest.raises(ValueError, match="learning_rate"):
    check_float("learning_rate", 10**400)


@settings(max_examples=100, deadline=None)
@given(
    value=st.floats(allow_nan=False, allow_infinity=False, width=32),
    low=st.floats(-10, 10),
    width=st.floats(0, 10),
    low_inclusive=st.booleans(),
    high_inclusive=st.booleans(),
)
def test_check_float_property(value, low, width, low_inclusive, high_inclusive):
  high = low + width
  inside = (low < value or (low_inclusive and value == low)) and (value < high or (high_inclusive and value == high))
  kwargs = dict(low=low, high=high, low_inclusive=low_inclusive, high_inclusive=high_inclusive)
  if inside:
    check_float("x", value, **kwargs)
  else:
    with pytest.raises(ValueError, match="x must be in"):
      check_float("x", value, **kwargs)


# check_positive -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [5e-324, 1e-30, 1, 0.5, 1e300, np.float32(1e-38), np.int64(3)])
def test_check_positive_accepts(value):
  check_positive("clip_norm", value)


@pytest.mark.parametrize("value", [0, 0.0, -0.0, -1e-300, -3])
def test_check_positive_rejects_zero_and_negatives(value):
  with pytest.raises(ValueError, match=r"clip_norm must be in \(0.0, inf\]"):
    check_positive("clip_norm", value)


@pytest.mark.parametrize("value, error", [(float("inf"), ValueError), (float("nan"), ValueError), (True, TypeError),
                                          ("1", TypeError)])
def test_check_positive_rejects_non_finite_and_non_numbers(value, error):
  with pytest.raises(error, match="clip_norm"):
    check_positive("clip_norm", value)


def test_check_positive_none():
  check_positive("clip_norm", None, allow_none=True)
  with pytest.raises(TypeError, match="clip_norm"):
    check_positive("clip_norm", None)


# check_choice ---------------------------------------------------------------------------------------------------------


def test_check_choice():
  check_choice("strategy", "vmap", ("auto", "vmap", "sequential"))
  check_choice("strategy", "auto", ["auto"])
  check_choice("strategy", "sequential", (s for s in ("vmap", "sequential")))  # any iterable, even a generator
  with pytest.raises(ValueError, match=r"strategy must be one of \('auto', 'vmap'\), got 'pmap'"):
    check_choice("strategy", "pmap", ("auto", "vmap"))
  with pytest.raises(ValueError, match="strategy"):
    check_choice("strategy", "VMAP", ("auto", "vmap"))  # case-sensitive
  with pytest.raises(ValueError, match="strategy"):
    check_choice("strategy", None, ())
