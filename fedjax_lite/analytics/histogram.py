"""Federated histograms with Gaussian differential privacy.

Every client holds up to ``m`` values (``values [clients, m]`` with ``value_mask [clients, m]``; a 1-d
``values [clients]`` is one value per client). With bin edges ``e_0 < e_1 < ... < e_B`` (bins ``[e_b, e_{b+1})``,
the last one closed, exactly ``numpy.histogram``'s), client ``i`` computes its count vector ``c_i`` in ``R^B``;
values outside ``[e_0, e_B]`` and NaN fall in no bin (as in ``numpy.histogram`` with explicit bins). The server
releases

``h = sum_{real i} clip(c_i) + N(0, (z C)^2 I_B)``, ``clip(c) = c * min(1, C / ||c||_2)``

(the Gaussian mechanism, Dwork & Roth 2014 §3.5.3, on a sum of L2-bounded contributions; noise from
:func:`fedjax_lite.privacy.gaussian_noise`). Adding or removing one client changes the clipped sum by at most
``C`` in L2 norm, so one release is ``GaussianDpEvent(z)`` under add-or-remove-one adjacency. A client with one
value has ``||c_i||_2 <= 1``, so ``C = 1`` (the default) keeps every count exact; a client with ``m`` values has
``||c_i||_2 <= m`` (all in one bin) and ``sqrt(m)`` when they are spread out: a smaller ``C`` trades bias on heavy
clients for less noise. ``clip=None`` disables clipping (only without noise: there is no sensitivity to scale the
noise to).

Noisy counts may be negative or fractional; :func:`~fedjax_lite.analytics.histogram_quantile` post-processes them
(which costs no privacy).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lite.analytics.base import Query, gaussian_event, l2_clip, real_mask
from fedjax_lite.core import validation
from fedjax_lite.privacy.mechanisms import gaussian_noise


def check_bin_edges(bin_edges) -> np.ndarray:
  """Strictly increasing, finite float edges, at least two; returned as float32 (exactly representable)."""
  edges = np.asarray(bin_edges, np.float64)
  if edges.ndim != 1 or edges.shape[0] < 2:
    raise ValueError(f"bin_edges must be a 1-d sequence of at least 2 edges, got shape {edges.shape}.")
  if not np.all(np.isfinite(edges)) or not np.all(np.diff(edges) > 0):
    raise ValueError("bin_edges must be finite and strictly increasing.")
  if not np.array_equal(edges.astype(np.float32).astype(np.float64), edges):
    raise ValueError("bin_edges must be exactly representable in float32 (e.g. np.linspace(...).astype(float32)).")
  return edges.astype(np.float32)


def bin_counts(values: jax.Array, value_mask: jax.Array, bin_edges: np.ndarray) -> jax.Array:
  """ONE client's float32 counts per bin (``numpy.histogram`` semantics; masked, NaN and out-of-range values
  count nowhere)."""
  edges = jnp.asarray(bin_edges, values.dtype)
  num_bins = edges.shape[0] - 1
  # side='right' puts x == e_b in bin b; the last edge belongs to the last bin.
  index = jnp.searchsorted(edges, values, side="right") - 1
  index = jnp.where(values == edges[-1], num_bins - 1, index)
  inside = value_mask & (values >= edges[0]) & (values <= edges[-1])  # False for NaN
  one_hot = (index[:, None] == jnp.arange(num_bins)[None, :]) & inside[:, None]
  return jnp.sum(one_hot, axis=0, dtype=jnp.float32)


def _as_client_values(values, value_mask, client_mask):
  values = jnp.asarray(values)
  if values.ndim == 1:
    values = values[:, None]
    value_mask = None if value_mask is None else jnp.asarray(value_mask)[:, None]
  if values.ndim != 2:
    raise ValueError(f"values must be [clients] or [clients, values_per_client], got shape {values.shape}.")
  if not jnp.issubdtype(values.dtype, jnp.floating):
    values = values.astype(jnp.float32)
  value_mask = jnp.ones(values.shape, bool) if value_mask is None else jnp.asarray(value_mask)
  if value_mask.shape != values.shape or value_mask.dtype != jnp.bool_:
    raise ValueError(f"value_mask must be a boolean array shaped like values {values.shape}, got shape "
                     f"{value_mask.shape} and dtype {value_mask.dtype}.")
  mask = real_mask(values.shape[0], client_mask)
  return values, value_mask & mask[:, None], mask


def private_histogram(bin_edges, *, noise_multiplier: float = 0.0, clip: float | None = 1.0) -> Query:
  """A federated histogram with Gaussian noise: ``sum_i clip_C(c_i) + N(0, (z C)^2 I)`` (module docstring).

  ``compute(values, rng, value_mask=None, client_mask=None) -> counts`` (float32 ``[bins]``); ``values`` are
  ``[clients]`` (one value each) or ``[clients, m]`` with ``value_mask``; ``client_mask`` marks real clients.
  ``dp_event()`` is ``GaussianDpEvent(z)`` (``NonPrivateDpEvent`` for ``z = 0``).

  Args:
    bin_edges: ``B + 1`` strictly increasing float32-exact edges.
    noise_multiplier: ``z >= 0``.
    clip: ``C > 0``, the L2 bound of one client's count vector; None (no clipping) only with ``z = 0``.

  Example::

    query = private_histogram(np.linspace(0, 40, 9, dtype=np.float32), noise_multiplier=1.0)
    counts = jax.jit(query.compute)(temperatures, jax.random.key(0))  # 8 noisy counts, each +- 1 std
  """
  edges = check_bin_edges(bin_edges)
  noise_multiplier = validation.check_float("noise_multiplier", noise_multiplier, low=0.0)
  clip = validation.check_positive("clip", clip, allow_none=True)
  if clip is None and noise_multiplier > 0:
    raise ValueError("clip must be a positive number when noise_multiplier > 0 (the noise is z * clip).")

  def compute(values, rng, value_mask=None, client_mask=None):
    values, value_mask, _ = _as_client_values(values, value_mask, client_mask)
    counts = jax.vmap(lambda v, m: l2_clip(bin_counts(v, m, edges), clip))(values, value_mask)
    total = jnp.sum(counts, axis=0)
    if noise_multiplier == 0:
      return total
    return total + gaussian_noise(rng, total, noise_multiplier * clip)

  return Query(compute=compute, dp_event=lambda: gaussian_event(noise_multiplier))
