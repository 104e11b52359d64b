"""Checks on compiled HLO text that catch convolutions XLA:CPU will run on its slow generic emitter.

Where this sits: used by the guard test of :mod:`fedjax_lite.models.conv` and by a runner that wants to warn at
first compile. XLA:CPU runs a convolution on its library kernels only in the canonical layout
``dim_labels=b01f_01io->b01f`` (NHWC inputs, HWIO kernel, NHWC outputs). Its ``ConvCanonicalization`` pass
rewrites the entry computation's convolutions into that form but not those inside while-loop bodies, conditionals
or called computations (jax-ml/jax#12868), so any other ``dim_labels`` left in the *optimized* HLO
(``jax.jit(f).lower(...).compile().as_text()``) marks a conv that runs about 10x slower.
"""

from __future__ import annotations

import re

CANONICAL_CONV_DIM_LABELS = "b01f_01io->b01f"

# An HLO instruction whose opcode is `convolution`: `%name = <shape> convolution(<operands>), ...`.
_CONVOLUTION_INSTRUCTION = re.compile(r"=\s*\S+\s+convolution\(")
_DIM_LABELS = re.compile(r"dim_labels=([^,\s}]+)")


def convolution_instructions(compiled_hlo_text: str) -> list[str]:
  """Every ``convolution`` instruction line in an HLO module's text, stripped, in order of appearance."""
  return [line.strip() for line in compiled_hlo_text.splitlines() if _CONVOLUTION_INSTRUCTION.search(line)]


def non_canonical_convolutions(compiled_hlo_text: str) -> list[str]:
  """The ``convolution`` instruction lines whose ``dim_labels`` are not ``b01f_01io->b01f``.

  Args:
    compiled_hlo_text: the optimized HLO, e.g. ``jax.jit(f).lower(*args).compile().as_text()``. (Unoptimized
      text from ``lower(...).as_text()`` is StableHLO and holds no ``dim_labels``; pass the compiled text.)

  Returns:
    The offending lines (stripped); empty when every convolution is canonical or there are none. A convolution
    with no ``dim_labels`` attribute counts as offending.
  """
  if not isinstance(compiled_hlo_text, str):
    raise TypeError(f"compiled_hlo_text must be a str, got {type(compiled_hlo_text).__name__}.")
  offending = []
  for line in convolution_instructions(compiled_hlo_text):
    match = _DIM_LABELS.search(line)
    if match is None or match.group(1) != CANONICAL_CONV_DIM_LABELS:
      offending.append(line)
  return offending
