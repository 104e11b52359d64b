"""Federated heavy hitters with a private count sketch: which items do the most clients hold?

Every client holds up to ``m`` items from the domain ``{0, ..., D - 1}`` (``items [clients, m]`` int32 with
``item_mask``; e.g. the words it typed). The server wants the items held by the most clients.

Count sketch (Charikar, Chen & Farach-Colton 2002, "Finding Frequent Items in Data Streams", ICALP). ``R`` rows
(``depth``) of ``W`` counters (``width``); row ``r`` has a bucket hash ``h_r: [D] -> [W]`` and a sign hash
``s_r: [D] -> {-1, +1}``. Client ``i`` sketches its set of DISTINCT items ``X_i`` (an item held twice counts once:
the query counts clients, not occurrences): ``S_i[r, w] = sum_{x in X_i, h_r(x) = w} s_r(x)``. The server sums the
clipped sketches and adds Gaussian noise (Pagh & Thorup 2022, "Improved Utility Analysis of Private CountSketch",
NeurIPS, analyse exactly this release):

``S = sum_{real i} clip_C(S_i) + N(0, (z C)^2 I)``, ``clip_C(S) = S * min(1, C / ||S||_F)``,

and estimates the number of clients holding ``x`` as ``n(x) = median_r s_r(x) S[r, h_r(x)]``. Without noise and
clipping ``n(x)`` is the true count plus the signed collisions in each row, whose median is unbiased-ish and
exact when ``x`` collides with nothing. The heavy hitters are the ``k`` items of largest ``n(x)`` (ties to the
lower item id), found by estimating every item of the domain (``O(R D)``; for huge domains use a tree of sketches
over prefixes, as in the trie-based protocol of Zhu, Kairouz, McMahan, Sun & Li 2020, "Federated Heavy Hitters
Discovery with Differential Privacy", AISTATS).

Privacy: a client with ``m`` distinct items has ``||S_i||_F <= sqrt(R) m`` (all in one cell per row) and
``sqrt(R m)`` without collisions; the default ``C = sqrt(R m)`` is exact for the latter, clipping scales down the
rare colliding ones. Adding or removing one client moves ``S`` by at most ``C``: one release is
``GaussianDpEvent(z)``. ``clip=None`` (no clipping) is allowed only without noise.

Hashes: fully random tables drawn once from ``numpy.random.default_rng(seed)`` (``Query.hash_tables``: buckets
``[R, D]`` and signs ``[R, D]``), so a test or a client can reproduce them exactly. Items outside ``[0, D)`` are
ignored.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lite.analytics.base import gaussian_event, l2_clip, real_mask
from fedjax_lite.core import validation
from fedjax_lite.privacy.mechanisms import gaussian_noise


class HeavyHitters(NamedTuple):
  """What the heavy-hitters query's ``compute`` returns.

  Attributes:
    items: int32 ``[k]``, the ``k`` items of largest estimated count, largest first (ties to the lower id).
    counts: float32 ``[k]``, their estimated counts.
    sketch: float32 ``[depth, width]``, the released (noisy) sketch.
  """

  items: jax.Array
  counts: jax.Array
  sketch: jax.Array


class SketchQuery(NamedTuple):
  """A count-sketch heavy-hitters query: ``compute``, ``dp_event`` and the hash tables it uses.

  Attributes:
    compute: ``(items, rng, item_mask=None, client_mask=None) -> HeavyHitters``.
    dp_event: ``() -> DpEvent`` of one release.
    estimate: ``sketch -> float32 [D]``, the estimated count of every item.
    hash_tables: ``(buckets int32 [R, D], signs float32 [R, D])``.
  """

  compute: Any
  dp_event: Any
  estimate: Any
  hash_tables: tuple[np.ndarray, np.ndarray]


def client_sketch(items: jax.Array, item_mask: jax.Array, buckets: jax.Array, signs: jax.Array,
                  width: int) -> jax.Array:
  """ONE client's count sketch of its DISTINCT in-domain items, float32 ``[depth, width]``."""
  domain_size = buckets.shape[1]
  valid = item_mask & (items >= 0) & (items < domain_size)
  # Distinct items: sort (invalid ones last, as domain_size) and keep the first of each run.
  keyed = jnp.sort(jnp.where(valid, items, domain_size))
  first = jnp.concatenate([jnp.ones((1,), bool), keyed[1:] != keyed[:-1]]) & (keyed < domain_size)
  safe = jnp.where(first, keyed, 0)
  row_buckets = buckets[:, safe]  # [depth, m]
  row_signs = jnp.where(first[None, :], signs[:, safe], 0.0)
  one_hot = row_buckets[:, :, None] == jnp.arange(width)[None, None, :]  # [depth, m, width]
  return jnp.sum(jnp.where(one_hot, row_signs[:, :, None], 0.0), axis=1)


def count_sketch_heavy_hitters(
    domain_size: int,
    num_heavy_hitters: int,
    *,
    depth: int = 5,
    width: int = 256,
    max_items_per_client: int = 1,
    noise_multiplier: float = 0.0,
    clip: float | str | None = "default",
    seed: int = 0,
) -> SketchQuery:
  """The ``k`` items held by the most clients, from a (private) count sketch (module docstring).

  Args:
    domain_size: ``D >= 1``, items are ints in ``[0, D)``.
    num_heavy_hitters: ``k`` in ``[1, D]``.
    depth: ``R >= 1`` rows (odd values give a proper median).
    width: ``W >= 1`` counters per row.
    max_items_per_client: ``m >= 1``, the number of items a client contributes (the second axis of ``items``);
      sets the default clip.
    noise_multiplier: ``z >= 0``.
    clip: ``C > 0``, the Frobenius bound of one client's sketch; ``'default'`` for ``sqrt(R m)``; None for no
      clipping (only with ``z = 0``).
    seed: the hash tables' seed.

  Example::

    query = count_sketch_heavy_hitters(domain_size=5000, num_heavy_hitters=10, noise_multiplier=1.0)
    top = jax.jit(query.compute)(client_words[:, None], jax.random.key(0))  # top.items, top.counts
  """
  domain_size = validation.check_int("domain_size", domain_size, minimum=1)
  num_heavy_hitters = validation.check_int("num_heavy_hitters", num_heavy_hitters, minimum=1, maximum=domain_size)
  depth = validation.check_int("depth", depth, minimum=1)
  width = validation.check_int("width", width, minimum=1)
  max_items_per_client = validation.check_int("max_items_per_client", max_items_per_client, minimum=1)
  noise_multiplier = validation.check_float("noise_multiplier", noise_multiplier, low=0.0)
  seed = validation.check_int("seed", seed, minimum=0)
  if isinstance(clip, str):
    if clip != "default":
      raise ValueError(f"clip must be a positive number, 'default' or None, got {clip!r}.")
    clip = math.sqrt(depth * max_items_per_client)
  clip = validation.check_positive("clip", clip, allow_none=True)
  if clip is None and noise_multiplier > 0:
    raise ValueError("clip must be a positive number when noise_multiplier > 0 (the noise is z * clip).")

  generator = np.random.default_rng(seed)
  buckets_np = generator.integers(0, width, size=(depth, domain_size)).astype(np.int32)
  signs_np = (2 * generator.integers(0, 2, size=(depth, domain_size)) - 1).astype(np.float32)

  def estimate(sketch: jax.Array) -> jax.Array:
    buckets, signs = jnp.asarray(buckets_np), jnp.asarray(signs_np)
    per_row = signs * jnp.take_along_axis(sketch, buckets, axis=1)  # [depth, D]
    return jnp.median(per_row, axis=0)

  def compute(items, rng, item_mask=None, client_mask=None) -> HeavyHitters:
    items = jnp.asarray(items)
    if items.ndim != 2 or items.shape[1] != max_items_per_client:
      raise ValueError(f"items must be [clients, max_items_per_client={max_items_per_client}], got shape "
                       f"{items.shape}.")
    if not jnp.issubdtype(items.dtype, jnp.integer):
      raise TypeError(f"items must be integers, got dtype {items.dtype}.")
    item_mask = jnp.ones(items.shape, bool) if item_mask is None else jnp.asarray(item_mask)
    if item_mask.shape != items.shape or item_mask.dtype != jnp.bool_:
      raise ValueError(f"item_mask must be a boolean array of shape {items.shape}, got shape {item_mask.shape} "
                       f"and dtype {item_mask.dtype}.")
    mask = real_mask(items.shape[0], client_mask)
    buckets, signs = jnp.asarray(buckets_np), jnp.asarray(signs_np)
    sketches = jax.vmap(lambda x, m: l2_clip(client_sketch(x, m, buckets, signs, width), clip))(
        items.astype(jnp.int32), item_mask & mask[:, None])
    sketch = jnp.sum(sketches, axis=0)
    if noise_multiplier > 0:
      sketch = sketch + gaussian_noise(rng, sketch, noise_multiplier * clip)
    counts, top = jax.lax.top_k(estimate(sketch), num_heavy_hitters)
    return HeavyHitters(items=top.astype(jnp.int32), counts=counts, sketch=sketch)

  return SketchQuery(compute=compute, dp_event=lambda: gaussian_event(noise_multiplier), estimate=estimate,
                     hash_tables=(buckets_np, signs_np))
