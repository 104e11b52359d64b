"""Tests for fedjax_lite.models.pooling: same values as nn.max_pool, same gradients when no window has ties."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lite.models import max_pool, max_pool_2x2


def random_normal(seed: int, shape) -> np.ndarray:
  """Test data from NumPy (a new shape through eager ``jax.random`` costs a compile of its own)."""
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def reference_pool(x, window):
  return nn.max_pool(x, (window, window), strides=(window, window), padding="VALID")


def pool_value_and_grad(pool, window):
  """A jitted ``(x, cotangent) -> (pool(x), d/dx of sum(pool(x) * cotangent))``."""
  objective = lambda x, cotangent: jnp.sum(pool(x, window) * cotangent)
  return jax.jit(lambda x, cotangent: (pool(x, window), jax.grad(objective)(x, cotangent)))


@pytest.mark.parametrize(
    "shape", [(2, 8, 8, 3), (2, 7, 9, 3), (5, 6, 4), (2, 3, 10, 6, 2)], ids=["even", "odd", "unbatched", "2batch"]
)
def test_max_pool_2x2_matches_flax(shape):
  x = random_normal(0, shape)
  np.testing.assert_array_equal(jax.jit(max_pool_2x2)(x), jax.jit(reference_pool, static_argnums=1)(x, 2))


@pytest.mark.parametrize("window", [1, 3, 4])
def test_max_pool_other_windows_match_flax(window):
  x = random_normal(1, (2, 13, 11, 3))
  np.testing.assert_array_equal(
      jax.jit(max_pool, static_argnums=1)(x, window), jax.jit(reference_pool, static_argnums=1)(x, window)
  )


@pytest.mark.parametrize("shape, window", [((2, 8, 8, 3), 2), ((2, 7, 9, 3), 2), ((2, 9, 10, 2), 3)])
def test_gradient_matches_flax_without_ties(shape, window):
  x = random_normal(2, shape)  # continuous values: no ties
  out_shape = jax.eval_shape(lambda v: reference_pool(v, window), x).shape
  cotangent = random_normal(3, out_shape)
  expected_value, expected_grad = pool_value_and_grad(reference_pool, window)(x, cotangent)
  actual_value, actual_grad = pool_value_and_grad(max_pool, window)(x, cotangent)
  np.testing.assert_array_equal(actual_value, expected_value)
  np.testing.assert_array_equal(actual_grad, expected_grad)


def test_gradient_on_ties_is_split_among_tied_maxima():
  x = jnp.zeros((1, 2, 2, 1))  # one window, four tied maxima
  ones = jnp.ones((1, 1, 1, 1))
  ours = pool_value_and_grad(max_pool, 2)(x, ones)[1]
  theirs = pool_value_and_grad(reference_pool, 2)(x, ones)[1]
  np.testing.assert_allclose(ours, jnp.full(x.shape, 0.25))
  assert float(jnp.sum(theirs)) == pytest.approx(1.0) and int(jnp.sum(theirs != 0)) == 1


def test_integer_inputs():
  x = jnp.arange(16, dtype=jnp.int32).reshape(1, 4, 4, 1)
  np.testing.assert_array_equal(max_pool_2x2(x)[0, ..., 0], [[5, 7], [13, 15]])


def test_rejects_bad_arguments():
  x = jnp.ones((1, 4, 4, 1))
  for window in (0, 2.0, True):
    with pytest.raises(ValueError, match="window"):
      max_pool(x, window)
  with pytest.raises(ValueError, match="x"):
    max_pool_2x2(jnp.ones((4, 4)))
  with pytest.raises(ValueError, match="window"):
    max_pool(jnp.ones((1, 2, 5, 1)), 3)
