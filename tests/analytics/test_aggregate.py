"""Federated means and sums with any aggregator: exact without noise, 5-sigma bounds with DP noise."""

from __future__ import annotations

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lite.aggregators import coordinate_median, gaussian_fixed, mean, secure_sum
from fedjax_lite.analytics import aggregate_client_statistics, federated_mean, federated_sum
from fedjax_lite.core import Runner
from fedjax_lite.core.packing import pack_clients
from fedjax_lite.privacy import PrivacyLedger, sampled_run_events

READINGS = np.array([20.5, 21.25, 19.75, 22.0, 99.0], np.float32)  # the last slot is padding
MASK = np.array([True, True, True, True, False])


def test_mean_of_sensor_readings_is_exact():
  output = jax.jit(federated_mean().compute)(READINGS, client_mask=MASK)
  # Four dyadic rationals: the float32 sum and the division by 4 are exact.
  assert float(output.result) == np.mean(READINGS[:4])
  weights = np.array([1.0, 2.0, 3.0, 4.0, 5.0], np.float32)
  weighted = jax.jit(federated_mean().compute)({"t": READINGS}, weights, MASK)
  np.testing.assert_allclose(weighted.result["t"], np.average(READINGS[:4], weights=weights[:4]), rtol=4 * 2 ** -23)
  assert isinstance(federated_mean().dp_event(), dp_accounting.NonPrivateDpEvent)


def test_sum_with_a_secure_sum():
  query = federated_sum(secure_sum(100.0, 0.0))
  output = jax.jit(query.compute)(READINGS, client_mask=MASK, rng=jax.random.key(0))
  # The simulated secure sum quantizes each value to 32 bits over [0, 100]: error <= 4 clients x 100 / (2^32 - 1).
  np.testing.assert_allclose(output.result, READINGS[:4].astype(np.float64).sum(), atol=4 * 100 / (2 ** 32 - 1) + 1e-4)


def test_dp_mean_noise_has_the_calibrated_spread():
  # 2000 coordinates, 4 clients, norms below the clip: result = (sum + N(0, (z C)^2)) / m with z = 1, C = 100,
  # m = 4: noise sd 25 per coordinate. The mean error is within 5 sd / sqrt(2000), the sample sd within 5 x its
  # own sd (~ sd / sqrt(2 x 2000)).
  values = np.random.default_rng(0).normal(size=(4, 2000)).astype(np.float32)
  query = federated_mean(gaussian_fixed(1.0, 4.0, 100.0))
  output = jax.jit(query.compute)(values, rng=jax.random.key(1))
  error = np.asarray(output.result, np.float64) - values.astype(np.float64).sum(0) / 4
  assert abs(error.mean()) < 5 * 25 / np.sqrt(2000)
  assert abs(error.std() - 25) < 5 * 25 / np.sqrt(2 * 2000)
  assert query.dp_event() == dp_accounting.GaussianDpEvent(1.0)
  ledger = PrivacyLedger(sampled_run_events(query.dp_event(), sampling="all"), delta=1e-5)
  assert 0 < ledger.epsilon_after(1) < ledger.epsilon_after(2) < np.inf


def test_client_statistics_from_packed_data_stream_and_stack_alike(population):
  round_data = pack_clients(population, [0, 2, 3, 5], batch_size=4, num_steps=5, cohort_size=6, shuffle=False)

  def statistic(client_data):  # the client's mean of feature 0 over its real examples, weighted by its count
    total = jnp.sum(jnp.where(client_data["mask"], client_data["x"][..., 0], 0.0))
    count = jnp.sum(client_data["mask"])
    return total / jnp.maximum(count, 1), count

  x, real = np.asarray(round_data["x"][..., 0], np.float64), np.asarray(round_data["mask"])
  per_client = (x * real).sum((1, 2)) / np.maximum(real.sum((1, 2)), 1)
  counts = real.sum((1, 2))
  expected_mean = (per_client * counts).sum() / counts.sum()
  streamed = jax.jit(lambda d: aggregate_client_statistics(statistic, mean(), mean().init(jnp.zeros(())), d,
                                                           jax.random.key(0), runner=Runner("vmap")))(round_data)
  # float32 sums of at most 17 terms of size ~4: a few dozen ulps.
  np.testing.assert_allclose(streamed.result, expected_mean, rtol=64 * 2 ** -23)
  median = aggregate_client_statistics(statistic, coordinate_median(), (), round_data, jax.random.key(0),
                                       runner=Runner("vmap"))
  np.testing.assert_allclose(median.result, np.median(per_client[counts > 0]), rtol=64 * 2 ** -23)


def test_argument_checks():
  with pytest.raises(TypeError, match="aggregator"):
    federated_mean("mean")
  with pytest.raises(ValueError, match="client_mask"):
    federated_mean().compute(READINGS, client_mask=MASK[:3])
  with pytest.raises(ValueError, match="weights"):
    federated_mean().compute(READINGS, np.ones(3))
  with pytest.raises(TypeError, match="statistic_fn"):
    aggregate_client_statistics(None, mean(), (), {"num_examples": np.ones(2)}, jax.random.key(0))
