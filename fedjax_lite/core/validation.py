"""Argument checks shared by every public constructor: each error names the argument and the allowed range."""

from __future__ import annotations

import math
from typing import Any, Iterable

import jax
import numpy as np


def _is_real_number(value: Any) -> bool:
  return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def is_traced(value: Any) -> bool:
  """True for a value being traced by a JAX transformation (e.g. a hyperparameter under ``jax.vmap``).

  Such a value has no concrete number to check: constructors accept it unchecked, so that an aggregator can be
  built inside ``jax.vmap`` over one of its hyperparameters; the caller vouches for its range.
  """
  return isinstance(value, jax.core.Tracer)


def as_number(value: Any) -> Any:
  """A 0-d numpy or JAX array (not traced) as a Python number; anything else unchanged."""
  if isinstance(value, (np.ndarray, jax.Array)) and not is_traced(value) and np.ndim(value) == 0:
    return np.asarray(value).item()
  return value


def check_int(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None,
              allow_none: bool = False) -> int | None:
  """An int (not bool) within ``[minimum, maximum]``; returns it as a Python int."""
  if value is None and allow_none:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be an int{' or None' if allow_none else ''}, got {type(value).__name__} {value!r}.")
  if minimum is not None and value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}.")
  if maximum is not None and value > maximum:
    raise ValueError(f"{name} must be <= {maximum}, got {value}.")
  return int(value)


def check_float(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    allow_none: bool = False,
) -> float | None:
  """A finite real number within the interval given by ``low``/``high`` and their inclusiveness; returns a float."""
  if value is None and allow_none:
    return None
  if is_traced(value):
    return value
  value = as_number(value)
  if not _is_real_number(value):
    raise TypeError(f"{name} must be a real number{' or None' if allow_none else ''}, got {type(value).__name__}.")
  try:
    finite = math.isfinite(float(value))
  except OverflowError:
    finite = False
  if not finite:
    raise ValueError(f"{name} must be finite, got {value}.")
  interval = (("[" if low_inclusive else "(") + ("-inf" if low is None else f"{low}") + ", "
              + ("inf" if high is None else f"{high}") + ("]" if high_inclusive else ")"))
  if low is not None and (value < low or (value == low and not low_inclusive)):
    raise ValueError(f"{name} must be in {interval}, got {value}.")
  if high is not None and (value > high or (value == high and not high_inclusive)):
    raise ValueError(f"{name} must be in {interval}, got {value}.")
  return float(value)


def check_positive(name: str, value: Any, *, allow_none: bool = False) -> float | None:
  """A finite number > 0."""
  return check_float(name, value, low=0.0, low_inclusive=False, allow_none=allow_none)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
  """One of ``choices``."""
  choices = tuple(choices)
  # Compare types too, so that True does not pass for 1 nor 1.0 for 1.
  if not any(type(value) is type(choice) and value == choice for choice in choices):
    raise ValueError(f"{name} must be one of {choices}, got {value!r}.")
