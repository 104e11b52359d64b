"""Tests for fedjax_lite.core.sampling: per-round cohorts drawn from ``(seed, round_num)`` alone.

A resumed run must sample exactly the cohorts of the uninterrupted run, so a round's cohort may depend on nothing
but the seed and the round number. Also checks distinctness without replacement, uniformity over many rounds
(a chi-square statistic against a fixed threshold) and argument validation.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedjax_lite.core import sampling
from fedjax_lite.core.sampling import sample_clients

# Upper 0.1% quantiles of the chi-square distribution (scipy.stats.chi2.ppf(0.999, dof)).
CHI2_999 = {19: 43.820, 49: 85.351}


def test_returns_int64_indices_of_the_requested_size():
  cohort = sample_clients(100, 10, seed=0, round_num=0)
  assert cohort.shape == (10,)
  assert cohort.dtype == np.int64
  assert np.all((cohort >= 0) & (cohort < 100))


def test_reproducible_from_seed_and_round():
  first = sample_clients(1000, 20, seed=42, round_num=3)
  second = sample_clients(1000, 20, seed=42, round_num=3)
  np.testing.assert_array_equal(first, second)


def test_independent_of_history():
  in_sequence = [sample_clients(500, 16, seed=7, round_num=r) for r in range(8)]
  direct = sample_clients(500, 16, seed=7, round_num=7)
  np.testing.assert_array_equal(direct, in_sequence[-1])
  # And interleaving other seeds, other populations or other rounds does not perturb it either.
  sample_clients(500, 16, seed=8, round_num=7)
  sample_clients(50, 3, seed=7, round_num=2, replace=True)
  np.testing.assert_array_equal(sample_clients(500, 16, seed=7, round_num=7), direct)


def test_numpy_integer_arguments_match_python_ints():
  expected = sample_clients(300, 12, seed=5, round_num=9)
  actual = sample_clients(np.int64(300), np.int32(12), seed=np.int64(5), round_num=np.uint32(9))
  np.testing.assert_array_equal(actual, expected)


def test_differs_across_rounds():
  cohorts = {tuple(sample_clients(1000, 10, seed=0, round_num=r)) for r in range(20)}
  assert len(cohorts) == 20


def test_differs_across_seeds():
  cohorts = {tuple(sample_clients(1000, 10, seed=s, round_num=4)) for s in range(20)}
  assert len(cohorts) == 20


def test_uses_its_own_stream():
  # The cohort is not the draw that packing's shuffle stream of the same round would give.
  cohort = sample_clients(1000, 10, seed=1, round_num=1)
  packing_draw = sampling.round_generator(1, 1, sampling.PACKING_STREAM).choice(1000, size=10, replace=False)
  sampling_draw = sampling.round_generator(1, 1, sampling.SAMPLING_STREAM).choice(1000, size=10, replace=False)
  np.testing.assert_array_equal(cohort, sampling_draw)
  assert not np.array_equal(cohort, packing_draw)


def test_round_generator_is_deterministic_per_stream():
  a = sampling.round_generator(3, 4, 5).random(4)
  b = sampling.round_generator(3, 4, 5).random(4)
  c = sampling.round_generator(3, 4, 6).random(4)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), num_clients=st.integers(1, 200), seed=st.integers(0, 2**32), round_num=st.integers(0, 10**6))
def test_without_replacement_indices_are_distinct(data, num_clients, seed, round_num):
  cohort_size = data.draw(st.integers(1, num_clients))
  cohort = sample_clients(num_clients, cohort_size, seed=seed, round_num=round_num)
  assert cohort.shape == (cohort_size,)
  assert len(set(cohort.tolist())) == cohort_size
  assert cohort.min() >= 0 and cohort.max() < num_clients


def test_full_cohort_is_a_permutation():
  cohort = sample_clients(37, 37, seed=2, round_num=11)
  np.testing.assert_array_equal(np.sort(cohort), np.arange(37))


def test_with_replacement_may_exceed_population_and_repeat():
  cohort = sample_clients(3, 50, seed=0, round_num=0, replace=True)
  assert cohort.shape == (50,)
  assert np.all((cohort >= 0) & (cohort < 3))
  assert len(np.unique(cohort)) < 50  # pigeonhole: repeats are certain
  np.testing.assert_array_equal(cohort, sample_clients(3, 50, seed=0, round_num=0, replace=True))


def test_single_client_population():
  np.testing.assert_array_equal(sample_clients(1, 1, seed=0, round_num=5), [0])
  np.testing.assert_array_equal(sample_clients(1, 4, seed=0, round_num=5, replace=True), [0, 0, 0, 0])


def chi_square(counts, expected):
  return float(np.sum((counts - expected) ** 2 / expected))


def test_uniform_over_many_rounds_without_replacement():
  # 20 clients, 5 per round, 4000 rounds: each client is expected 1000 times. For sampling without replacement
  # the statistic is even smaller in expectation than a chi-square with 19 degrees of freedom (each count's
  # variance is R p (1 - p) < R p), so the chi-square 99.9% quantile is a conservative bound.
  num_clients, cohort_size, num_rounds = 20, 5, 4000
  counts = np.zeros(num_clients)
  first_slot_counts = np.zeros(num_clients)
  for round_num in range(num_rounds):
    cohort = sample_clients(num_clients, cohort_size, seed=1234, round_num=round_num)
    counts[cohort] += 1
    first_slot_counts[cohort[0]] += 1
  assert counts.sum() == num_rounds * cohort_size
  assert chi_square(counts, num_rounds * cohort_size / num_clients) < CHI2_999[19]
  # No position bias either: the first slot alone is a uniform draw (exactly chi-square, 19 dof).
  assert chi_square(first_slot_counts, num_rounds / num_clients) < CHI2_999[19]


def test_uniform_over_many_rounds_with_replacement():
  # Multinomial: 50 clients, 10 draws per round, 2000 rounds -> 400 expected each; chi-square with 49 dof.
  num_clients, cohort_size, num_rounds = 50, 10, 2000
  counts = np.zeros(num_clients)
  for round_num in range(num_rounds):
    np.add.at(counts, sample_clients(num_clients, cohort_size, seed=99, round_num=round_num, replace=True), 1)
  assert chi_square(counts, num_rounds * cohort_size / num_clients) < CHI2_999[49]


@pytest.mark.parametrize("num_clients", [0, -3, 2.0, None, "10"])
def test_rejects_bad_num_clients(num_clients):
  with pytest.raises((ValueError, TypeError), match="num_clients"):
    sample_clients(num_clients, 1, seed=0, round_num=0)


@pytest.mark.parametrize("cohort_size", [0, -1, 1.0, None])
def test_rejects_bad_cohort_size(cohort_size):
  with pytest.raises((ValueError, TypeError), match="cohort_size"):
    sample_clients(10, cohort_size, seed=0, round_num=0)


def test_rejects_cohort_larger_than_population_without_replacement():
  with pytest.raises((ValueError, TypeError), match="cohort_size \\(11\\) must be <= num_clients \\(10\\)"):
    sample_clients(10, 11, seed=0, round_num=0)
  assert sample_clients(10, 10, seed=0, round_num=0).shape == (10,)  # the boundary is allowed


@pytest.mark.parametrize("seed", [-1, 1.5, None, "0"])
def test_rejects_bad_seed(seed):
  with pytest.raises((ValueError, TypeError), match="seed"):
    sample_clients(10, 2, seed=seed, round_num=0)


@pytest.mark.parametrize("round_num", [-1, 2.0, None])
def test_rejects_bad_round_num(round_num):
  with pytest.raises((ValueError, TypeError), match="round_num"):
    sample_clients(10, 2, seed=0, round_num=round_num)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_clients=True, cohort_size=1, seed=0, round_num=0), "num_clients"),
        (dict(num_clients=5, cohort_size=True, seed=0, round_num=0), "cohort_size"),
        (dict(num_clients=5, cohort_size=2, seed=True, round_num=0), "seed"),
        (dict(num_clients=5, cohort_size=2, seed=0, round_num=True), "round_num"),
    ],
    ids=["num_clients", "cohort_size", "seed", "round_num"],
)
def test_rejects_bools(kwargs, name):
  with pytest.raises((ValueError, TypeError), match=name):
    sample_clients(**kwargs)


def test_cyclic_sampler_fixed_groups_min_separation_and_poisson_within_groups():
  full = sampling.CyclicSampler(23, 5, seed=3)
  groups = full.groups
  assert sorted(np.concatenate(groups).tolist()) == list(range(23))
  assert {len(g) for g in groups} == {4, 5} and full.cohort_capacity == 5
  last_round = {}
  for round_num in range(40):
    cohort = full(round_num)
    np.testing.assert_array_equal(cohort, np.sort(groups[round_num % 5]))
    for client in cohort:
      assert round_num - last_round.get(client, -5) >= full.min_separation
      last_round[client] = round_num
  assert full.max_participations(40) == 8 and full.max_participations(41) == 9
  poisson = sampling.CyclicSampler(2000, 4, sampling_probability=0.25, seed=1)
  sizes = []
  for round_num in range(8):
    cohort = poisson(round_num)
    assert set(cohort.tolist()) <= set(poisson.groups[round_num % 4].tolist())
    np.testing.assert_array_equal(cohort, poisson(round_num))  # reproducible from (seed, round) alone
    sizes.append(len(cohort))
  # Binomial(500, 0.25): mean 125, sd 9.7; the mean of 8 rounds is within 4 sd (3.4) of 125.
  assert abs(np.mean(sizes) - 125) < 14 and poisson.expected_clients_per_round == 125
  assert poisson.cohort_capacity >= max(sizes)
  with pytest.raises(ValueError, match="num_groups"):
    sampling.CyclicSampler(3, 4)
