"""The built-in populations: log-normal speeds and bandwidths with FedScale's defaults, constants, the record."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from fedjax_lite import systems
from fedjax_lite.core import sampling
from fedjax_lite.systems import generators

N = 20000


def test_lognormal_log_moments_match_the_parameters():
  """log(x) ~ Normal(log(median), sigma): over 20,000 clients the sample mean is within 5 standard errors
  (sigma / sqrt(N)) of log(median) and the sample standard deviation within 5 of its own (sigma / sqrt(2 (N - 1)))."""
  population = systems.lognormal_systems(N, seed=11)
  for values, median, sigma in [
      (population.seconds_per_example, 0.005 * math.e, 0.6),
      (population.download_bits_per_second, 6.1e6, 1.1)]:
    logs = np.log(values)
    assert abs(logs.mean() - math.log(median)) < 5 * sigma / math.sqrt(N)
    assert abs(logs.std(ddof=1) - sigma) < 5 * sigma / math.sqrt(2 * (N - 1))
  np.testing.assert_array_equal(population.upload_bits_per_second, population.download_bits_per_second)
  # The bandwidth default puts about a quarter of devices under 3 Mbit/s (module docstring): P = 0.2617.
  p = stats.norm.cdf(math.log(3e6 / 6.1e6) / 1.1)
  fraction = np.mean(population.download_bits_per_second < 3e6)
  assert abs(fraction - p) < 5 * math.sqrt(p * (1 - p) / N) and abs(p - 0.26) < 0.005


def test_lognormal_is_a_kolmogorov_smirnov_fit():
  """KS statistic of the log-speeds against Normal(log median, sigma): below the 1e-4 critical value
  (sqrt(-log(1e-4 / 2) / (2 N)) = 0.0157 at N = 20,000)."""
  population = systems.lognormal_systems(N, seed=12, seconds_per_example_median=0.02, seconds_per_example_sigma=0.3)
  # A frozen distribution's cdf, not the name "norm" with args: newer scipy maps the name to a one-argument ufunc.
  statistic = stats.kstest(np.log(population.seconds_per_example),
                           stats.norm(loc=math.log(0.02), scale=0.3).cdf).statistic
  assert statistic < math.sqrt(-math.log(1e-4 / 2) / (2 * N))


def test_lognormal_draws_follow_the_documented_stream_and_options():
  population = systems.lognormal_systems(10, seed=5, upload_ratio=0.25, seconds_per_step=0.1,
                                         availability=systems.RandomDropout(0.1))
  normals = sampling.round_generator(5, 0, generators.SYSTEMS_STREAM).standard_normal((2, 10))
  np.testing.assert_array_equal(population.seconds_per_example, 0.005 * math.e * np.exp(0.6 * normals[0]))
  np.testing.assert_array_equal(population.download_bits_per_second, 6.1e6 * np.exp(1.1 * normals[1]))
  np.testing.assert_array_equal(population.upload_bits_per_second, 0.25 * population.download_bits_per_second)
  np.testing.assert_array_equal(population.seconds_per_step, np.full(10, 0.1))
  assert population.availability == systems.RandomDropout(0.1)
  zero_spread = systems.lognormal_systems(4, seconds_per_example_sigma=0.0, bandwidth_sigma=0.0)
  np.testing.assert_array_equal(zero_spread.download_bits_per_second, np.full(4, 6.1e6))


def test_constant_systems_and_record_validation():
  population = systems.constant_systems(3, seconds_per_example=0.5, download_bits_per_second=2e6,
                                        upload_bits_per_second=1e6)
  assert population.num_clients == 3 and population.upload_bits_per_second.tolist() == [1e6] * 3
  with pytest.raises(ValueError, match="upload_bits_per_second"):
    systems.ClientSystems([0.1, 0.1], [1.0, 1.0], [1.0, 0.0])
  with pytest.raises(ValueError, match="3 clients"):
    systems.ClientSystems([0.1, 0.1], [1.0, 1.0, 1.0], [1.0, 1.0])
  with pytest.raises(ValueError, match="seconds_per_example"):
    systems.ClientSystems([float("nan")], [1.0], [1.0])
  with pytest.raises(TypeError, match="availability"):
    systems.ClientSystems([0.1], [1.0], [1.0], availability=0.1)
  with pytest.raises(ValueError, match="availability describes 2"):
    systems.ClientSystems([0.1], [1.0], [1.0], availability=systems.AvailabilityWindows.from_windows([[], []]))
  with pytest.raises(ValueError, match="seconds_per_example_median"):
    systems.lognormal_systems(3, seconds_per_example_median=0.0)
  assert not population.seconds_per_example.flags.writeable
  with pytest.raises(ValueError, match="population has 4"):
    population.check_population(4)
  described = population.describe()
  assert described["num_clients"] == 3 and described["availability"] == {"kind": "always_on"}
