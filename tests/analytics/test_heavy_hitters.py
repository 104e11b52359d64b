"""Count-sketch heavy hitters against a NumPy count sketch; the noise's spread; argument checks."""

from __future__ import annotations

import dp_accounting
import jax
import numpy as np
import pytest

from fedjax_lite.analytics import count_sketch_heavy_hitters

DOMAIN, CLIENTS, ITEMS = 300, 400, 3


def population(seed: int = 0):
  rng = np.random.default_rng(seed)
  weights = 1.0 / np.arange(1, DOMAIN + 1) ** 1.2  # Zipf-like popularity
  items = rng.choice(DOMAIN, size=(CLIENTS, ITEMS), p=weights / weights.sum()).astype(np.int32)
  item_mask = rng.random((CLIENTS, ITEMS)) < 0.9
  client_mask = np.arange(CLIENTS) < CLIENTS - 20  # 20 padding slots
  return items, item_mask, client_mask


def numpy_sketch(items, item_mask, client_mask, buckets, signs, width):
  sketch = np.zeros((buckets.shape[0], width))
  for row_items, row_mask, real in zip(items, item_mask, client_mask):
    if real:
      for item in set(row_items[row_mask].tolist()):  # distinct items
        for r in range(buckets.shape[0]):
          sketch[r, buckets[r, item]] += signs[r, item]
  return sketch


def test_matches_numpy_without_noise():
  items, item_mask, client_mask = population()
  query = count_sketch_heavy_hitters(DOMAIN, 8, depth=5, width=64, max_items_per_client=ITEMS, clip=None)
  result = jax.jit(query.compute)(items, jax.random.key(0), item_mask, client_mask)
  buckets, signs = query.hash_tables
  expected = numpy_sketch(items, item_mask, client_mask, buckets, signs, 64)
  np.testing.assert_array_equal(result.sketch, expected)  # integer counts in float32: exact
  estimates = np.median(signs * np.take_along_axis(expected, buckets, axis=1), axis=0)
  np.testing.assert_array_equal(query.estimate(result.sketch), estimates)
  order = np.argsort(-estimates, kind="stable")[:8]
  np.testing.assert_array_equal(result.counts, estimates[order])
  np.testing.assert_array_equal(result.items, order)  # ties to the lower item id, as a stable sort
  # The most popular item is held by far more clients than any collision can fake: it is found, nearly exactly.
  true_counts = np.array([sum(item in set(row[m].tolist()) for row, m, real in zip(items, item_mask, client_mask)
                              if real) for item in range(DOMAIN)])
  assert int(result.items[0]) == int(np.argmax(true_counts))
  assert isinstance(query.dp_event(), dp_accounting.NonPrivateDpEvent)


def test_noise_has_the_calibrated_spread():
  # depth 5 x width 400 cells, z = 1, default clip sqrt(5 x 3): noise sd sqrt(15) per cell. The mean error within
  # 5 sd / sqrt(2000), the sample sd within 5 x its own sd (~ sd / sqrt(2 x 2000)). No client is clipped: a
  # client's sketch has norm sqrt(5 x distinct items) <= sqrt(15) unless two of its items share a cell.
  items, item_mask, client_mask = population(1)
  query = count_sketch_heavy_hitters(DOMAIN, 5, depth=5, width=400, max_items_per_client=ITEMS, noise_multiplier=1.0)
  exact = count_sketch_heavy_hitters(DOMAIN, 5, depth=5, width=400, max_items_per_client=ITEMS)
  noisy = np.asarray(jax.jit(query.compute)(items, jax.random.key(1), item_mask, client_mask).sketch, np.float64)
  clean = np.asarray(jax.jit(exact.compute)(items, jax.random.key(1), item_mask, client_mask).sketch, np.float64)
  sd = np.sqrt(15.0)
  error = noisy - clean
  assert abs(error.mean()) < 5 * sd / np.sqrt(2000)
  assert abs(error.std() - sd) < 5 * sd / np.sqrt(2 * 2000)
  assert query.dp_event() == dp_accounting.GaussianDpEvent(1.0)


def test_argument_checks():
  with pytest.raises(ValueError, match="num_heavy_hitters"):
    count_sketch_heavy_hitters(10, 11)
  with pytest.raises(ValueError, match="clip"):
    count_sketch_heavy_hitters(10, 2, noise_multiplier=1.0, clip=None)
  with pytest.raises(ValueError, match="clip"):
    count_sketch_heavy_hitters(10, 2, clip="auto")
  query = count_sketch_heavy_hitters(10, 2, max_items_per_client=2)
  with pytest.raises(ValueError, match="items must be"):
    query.compute(np.zeros((4, 3), np.int32), jax.random.key(0))
  with pytest.raises(TypeError, match="integers"):
    query.compute(np.zeros((4, 2), np.float32), jax.random.key(0))
