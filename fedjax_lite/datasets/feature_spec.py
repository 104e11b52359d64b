"""How one feature of the reference's files is parsed: its list kind, its shape, the dtype it is stored in.

The reference parses its ``tf.train.Example`` rows with ``tf.io.FixedLenFeature(shape, dtype)``; a
:class:`FeatureSpec` says the same thing without TensorFlow, plus the (possibly narrower) numpy dtype the
converted cache stores (e.g. CIFAR-100's pixels arrive as int64 and are stored as uint8, as the reference casts).
A ``'bytes'`` feature with ``shape=()`` is one byte string per example (text) and is cached as CSR bytes.
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
  """A fixed-length feature: ``kind`` in ``'float' | 'int64' | 'bytes'``, per-example ``shape``, cached ``dtype``."""

  kind: str
  shape: tuple[int, ...] = ()
  dtype: Any = None

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

  @property
  def size(self) -> int:
    """Values per example."""
    return math.prod(self.shape)

  def describe(self) -> str:
    return f"{self.kind}{list(self.shape)}" + ("" if self.dtype is None else f" as {self.dtype}")
