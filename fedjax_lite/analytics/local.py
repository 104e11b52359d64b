"""Histograms and heavy hitters under LOCAL differential privacy: k-ary randomized response and its unbiased decoder.

Each client holds ONE value (a reading to bin, or an item id) and reports ONE category through k-ary randomized
response (``fedjax_lite.privacy.local``): its true category with probability ``p_keep = e^eps / (e^eps + k - 1)``,
otherwise one of the other ``k - 1`` uniformly. A value outside the bins (or outside the item domain, or NaN) is the
extra category "none", so every real client reports and the report reveals nothing beyond ``eps`` -- not even
whether the value was in range. The server counts the reports of the real clients (``n_j``, ``N`` of them) and
decodes the unbiased estimate of every true count, ``(n_j - N p_other) / (p_keep - p_other)``, dropping "none".

Each client's guarantee is pure ``eps``-LDP: ``dp_event()`` is dp_accounting's ``RandomizedResponseDpEvent`` under
``REPLACE_ONE`` adjacency (read it with ``privacy.epsilon_of(event, delta, accountant='pld',
neighboring_relation=NeighboringRelation.REPLACE_ONE)``). Client ``i`` draws its report with
``fold_in(rng, i)``. Estimates are noisy (variance about ``N p_other (1 - p_other) / (p_keep - p_other)^2`` per
count) and may be negative; this is the price of trusting nobody, compared with the central
:func:`~fedjax_lite.analytics.private_histogram`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_lite.analytics.base import Query, real_mask
from fedjax_lite.analytics.histogram import check_bin_edges
from fedjax_lite.core import validation
from fedjax_lite.privacy.local import decode_randomized_response, randomized_response, randomized_response_event


def _reported_counts(categories: jax.Array, mask: jax.Array, rng: jax.Array, epsilon: float,
                     num_categories: int) -> tuple[jax.Array, jax.Array]:
  """Every slot's randomized report, counted over the real ones: (counts [k], number of real clients)."""
  keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(categories.shape[0], dtype=jnp.int32))
  reports = jax.vmap(lambda key, c: randomized_response(key, c, epsilon, num_categories))(keys, categories)
  one_hot = (reports[:, None] == jnp.arange(num_categories)[None, :]) & mask[:, None]
  return jnp.sum(one_hot, axis=0, dtype=jnp.float32), jnp.sum(mask, dtype=jnp.float32)


def randomized_response_histogram(bin_edges, *, epsilon: float) -> Query:
  """A histogram of ONE value per client under ``epsilon``-local DP (module docstring).

  ``compute(values, rng, client_mask=None) -> float32 [bins]``, the unbiased estimated counts (``numpy.histogram``'s
  bins: ``[e_b, e_{b+1})``, the last one closed).

  Example::

    query = randomized_response_histogram(np.linspace(0, 40, 9, dtype=np.float32), epsilon=2.0)
    counts = jax.jit(query.compute)(temperatures, jax.random.key(0))
  """
  edges = check_bin_edges(bin_edges)
  validation.check_positive("epsilon", epsilon)
  num_bins = edges.shape[0] - 1

  def compute(values, rng, client_mask=None):
    values = jnp.asarray(values)
    if values.ndim != 1:
      raise ValueError(f"values must be [clients] (one value per client), got shape {values.shape}.")
    values = values.astype(jnp.float32) if not jnp.issubdtype(values.dtype, jnp.floating) else values
    mask = real_mask(values.shape[0], client_mask)
    edges_array = jnp.asarray(edges, values.dtype)
    index = jnp.searchsorted(edges_array, values, side="right") - 1
    index = jnp.where(values == edges_array[-1], num_bins - 1, index)
    inside = (values >= edges_array[0]) & (values <= edges_array[-1])  # False for NaN
    categories = jnp.where(inside, index, num_bins).astype(jnp.int32)
    counts, num_reports = _reported_counts(categories, mask, rng, epsilon, num_bins + 1)
    return decode_randomized_response(counts, num_reports, epsilon)[:num_bins]

  return Query(compute=compute, dp_event=lambda: randomized_response_event(epsilon, num_bins + 1))


class LocalHeavyHitters(NamedTuple):
  """What :func:`randomized_response_heavy_hitters`' ``compute`` returns.

  Attributes:
    items: int32 ``[k]``, the items of largest estimated count, largest first (ties to the lower id).
    counts: float32 ``[k]``, their estimated counts.
    estimates: float32 ``[D]``, the unbiased estimated count of every item of the domain.
  """

  items: jax.Array
  counts: jax.Array
  estimates: jax.Array


def randomized_response_heavy_hitters(domain_size: int, num_heavy_hitters: int, *, epsilon: float) -> Query:
  """The ``k`` items held by the most clients (ONE item each), under ``epsilon``-local DP (module docstring).

  ``compute(items, rng, client_mask=None) -> LocalHeavyHitters``; ``items`` int ``[clients]`` in ``[0, D)`` (others
  report as "none"). Decoding estimates all ``D`` items (``O(D)`` per client for the report's one-hot count);
  meant for domains of up to ~10^4 items, where the central :func:`count_sketch_heavy_hitters` is the alternative.
  """
  domain_size = validation.check_int("domain_size", domain_size, minimum=1)
  num_heavy_hitters = validation.check_int("num_heavy_hitters", num_heavy_hitters, minimum=1, maximum=domain_size)
  validation.check_positive("epsilon", epsilon)

  def compute(items, rng, client_mask=None) -> LocalHeavyHitters:
    items = jnp.asarray(items)
    if items.ndim != 1 or not jnp.issubdtype(items.dtype, jnp.integer):
      raise ValueError(f"items must be an int array [clients] (one item per client), got shape {items.shape} and "
                       f"dtype {items.dtype}.")
    mask = real_mask(items.shape[0], client_mask)
    categories = jnp.where((items >= 0) & (items < domain_size), items, domain_size).astype(jnp.int32)
    counts, num_reports = _reported_counts(categories, mask, rng, epsilon, domain_size + 1)
    estimates = decode_randomized_response(counts, num_reports, epsilon)[:domain_size]
    top_counts, top_items = jax.lax.top_k(estimates, num_heavy_hitters)
    return LocalHeavyHitters(top_items.astype(jnp.int32), top_counts, estimates)

  return Query(compute=compute, dp_event=lambda: randomized_response_event(epsilon, domain_size + 1))

