"""Who attacks: exactly floor(fraction * n) real slots per round, from (seed, round, slot), uniform over slots."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lite.attacks import choose_malicious

MASK = np.array([True, False, True, True, True, False, True, True, True, True])  # 8 real of 10 slots


@pytest.mark.parametrize("fraction,expected", [(0.0, 0), (0.1, 0), (0.3, 2), (0.5, 4), (0.99, 7)])
def test_exact_count_and_never_padding(fraction, expected):
  for round_num in range(2):
    malicious = np.asarray(choose_malicious(0, round_num, MASK, fraction))
    assert malicious.sum() == expected  # floor(fraction * 8)
    assert not (malicious & ~MASK).any()


def test_float64_floor_of_the_count():
  # 0.3 * 10 is 3.0000000000000004 in float64 (3 attackers); a float32 product could round below 3.
  assert int(np.sum(choose_malicious(0, 0, np.ones(10, bool), 0.3))) == 3
  assert int(np.sum(choose_malicious(0, 0, np.ones(10, bool), 0.7))) == 7


@functools.lru_cache(maxsize=None)
def rounds_of(seed: int, num_rounds: int = 2000) -> np.ndarray:
  """``choose_malicious`` for rounds ``0 .. num_rounds - 1`` (2 of the 8 real slots), one compiled program."""
  return np.asarray(jax.jit(jax.vmap(lambda r: choose_malicious(seed, r, MASK, 0.3)))(jnp.arange(num_rounds)))


def test_pure_function_of_seed_and_round_and_jittable():
  by_round = rounds_of(3)
  for round_num in (0, 1, 1999):  # eager calls agree with the jitted, vmapped ones
    np.testing.assert_array_equal(choose_malicious(3, round_num, MASK, 0.3), by_round[round_num])
  other_seed = np.stack([np.asarray(choose_malicious(4, round_num, MASK, 0.3)) for round_num in range(10)])
  assert (by_round[:10] != other_seed).any()
  assert len({tuple(row) for row in by_round[:200].tolist()}) > 20  # the attackers change every round


def test_every_real_slot_is_equally_likely():
  # 2 of 8 real slots per round: each is malicious with probability 1/4. Over 2000 rounds the count of one slot is
  # Binomial(2000, 1/4): mean 500, standard deviation 19.4; allow 5 standard deviations.
  counts = rounds_of(3).sum(axis=0)
  assert (counts[~MASK] == 0).all()
  assert np.all(np.abs(counts[MASK] - 500) <= 5 * np.sqrt(2000 * 0.25 * 0.75))


def test_argument_checks():
  with pytest.raises(ValueError, match="fraction"):
    choose_malicious(0, 0, MASK, 1.0)
  with pytest.raises(ValueError, match="fraction"):
    choose_malicious(0, 0, MASK, -0.1)
  with pytest.raises(ValueError, match="seed"):
    choose_malicious(-1, 0, MASK, 0.1)
  with pytest.raises(ValueError, match="client_mask"):
    choose_malicious(0, 0, np.ones((2, 5), bool), 0.1)
