"""How one feature of the reference's files is parsed: its list kind, its shape, the dtype it is stored in.

The reference parses its ``tf.train.Example`` rows with ``tf.io.FixedLenFeature(shape, dtype)``; a
:class:`FeatureSpec` says the same thing without TensorFlow, plus the (possibly narrower) numpy dtype the
converted cache stores (e.g. CIFAR-100's pixels arrive as int64 and are stored as uint8, as the reference casts).
A ``'bytes'`` feature with ``shape=()`` is one byte string per example (text) and is cached as CSR bytes.

Integer values are never cast silently: an ``'int64'`` value must fit the cached dtype (CIFAR-100's pixels in
``[0, 255]`` for ``uint8``), and a class label (``num_classes`` set) must lie in ``[0, num_classes)``;
:meth:`FeatureSpec.out_of_range` finds the values that do not, for the readers' one-line errors.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

__all__ = ["FeatureSpec"]

_KINDS = ("float", "int64", "bytes")


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
  """A fixed-length feature: ``kind`` in ``'float' | 'int64' | 'bytes'``, per-example ``shape``, cached ``dtype``.

  ``num_classes`` (``'int64'`` only) marks a class label: every value must lie in ``[0, num_classes)``.
  """

  kind: str
  shape: tuple[int, ...] = ()
  dtype: Any = None
  num_classes: int | None = None

  def __post_init__(self):
    if self.kind not in _KINDS:
      raise ValueError(f"kind must be one of {_KINDS}, got {self.kind!r}.")
    object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
    if self.kind == "bytes":
      if self.shape != ():
        raise ValueError("a 'bytes' feature holds one byte string per example: shape must be ().")
      object.__setattr__(self, "dtype", None)
    else:
      default = np.float32 if self.kind == "float" else np.int64
      object.__setattr__(self, "dtype", np.dtype(default if self.dtype is None else self.dtype))
    if self.num_classes is not None:
      if self.kind != "int64" or not np.issubdtype(self.dtype, np.integer):
        raise ValueError("num_classes applies to an 'int64' feature cached as an integer dtype (a class label).")
      if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {self.num_classes!r}.")

  @property
  def size(self) -> int:
    """Values per example."""
    return math.prod(self.shape)

  def describe(self) -> str:
    return (f"{self.kind}{list(self.shape)}" + ("" if self.dtype is None else f" as {self.dtype}")
            + ("" if self.num_classes is None else f", labels of {self.num_classes} classes"))

  def value_range(self) -> tuple[int, int] | None:
    """The inclusive ``(low, high)`` an integer value must lie in (``None`` for float and bytes features)."""
    if self.dtype is None or not np.issubdtype(self.dtype, np.integer):
      return None
    info = np.iinfo(self.dtype)
    if self.num_classes is not None:
      return max(0, int(info.min)), min(int(info.max), self.num_classes - 1)
    return int(info.min), int(info.max)

  def expected_values(self) -> str:
    """What a value of this feature must be, for messages: ``'a class label in [0, 62)'``."""
    if self.num_classes is not None:
      return f"a class label in [0, {self.num_classes}) (the dataset has {self.num_classes} classes)"
    low, high = self.value_range()
    return f"an integer in [{low}, {high}] (stored as {self.dtype})"

  def out_of_range(self, values: np.ndarray) -> np.ndarray | None:
    """The flat indices of ``values`` that this integer feature cannot hold unchanged, or ``None`` if all fit.

    A float value counts as out of range unless it is a whole number within the range (``1.7`` would
    otherwise become ``1``, ``NaN`` some arbitrary integer).
    """
    bounds = self.value_range()
    if bounds is None:
      return None
    values = np.asarray(values).reshape(-1)
    if values.dtype == np.bool_:
      values = values.astype(np.int8)
    if np.issubdtype(values.dtype, np.integer):
      bad = (values < bounds[0]) | (values > bounds[1])
    elif np.issubdtype(values.dtype, np.floating):
      with np.errstate(invalid="ignore"):
        bad = ~((values >= bounds[0]) & (values <= bounds[1]) & (np.floor(values) == values))
    else:
      return np.arange(values.size)
    return np.flatnonzero(bad) if bad.any() else None
