"""Float tolerances derived from the computation, not from what passed on one machine.

Two programs that compute the same float32 sum in different orders (by-size dealing, devices, fused multiply-add
contraction) can differ by the rounding error of the sum. For ``s = x_1 + ... + x_n`` computed in any order,
the forward error is at most ``gamma_{n-1} * sum |x_i| <= (n - 1) * eps * n * max |x_i|`` (Higham, "Accuracy and
Stability of Numerical Algorithms", 2002, eq. 4.4); the difference of two such results is at most twice that.
We use the tighter, usual estimate ``ulps * num_terms * eps * scale``, with ``scale`` the largest magnitude in
play (e.g. the largest parameter of a leaf), and a small ``ulps`` factor for the few extra roundings (a division by
the total weight, an add of the result to the parameters). Machines differ only in order and contraction, never
by more than this.
"""

from __future__ import annotations

import chex
import jax
import numpy as np


def float_atol(num_terms: int, scale: float, *, dtype=np.float32, ulps: float = 2.0) -> float:
  """``ulps * num_terms * eps(dtype) * scale``: the absolute tolerance of a ``num_terms``-term float sum."""
  return float(ulps * max(num_terms, 1) * np.finfo(dtype).eps * scale)


def assert_trees_close_to_rounding(actual, desired, *, num_terms: int, ulps: float = 2.0) -> None:
  """Leaf by leaf, ``|actual - desired| <= float_atol(num_terms, max |desired leaf|)`` (see the module docstring);
  NaN must match NaN (e.g. the means of padding slots), and integer leaves must be equal."""
  chex.assert_trees_all_equal_shapes_and_dtypes(actual, desired)

  def check(path, a, d):
    a, d = np.asarray(a), np.asarray(d)
    scale = float(np.max(np.abs(d[np.isfinite(d)]), initial=0.0)) if np.issubdtype(d.dtype, np.floating) else 0.0
    atol = float_atol(num_terms, scale, dtype=d.dtype if np.issubdtype(d.dtype, np.floating) else np.float32,
                      ulps=ulps)
    np.testing.assert_allclose(a, d, rtol=0, atol=atol, err_msg=f"leaf {jax.tree_util.keystr(path)}")

  jax.tree_util.tree_map_with_path(check, actual, desired)
