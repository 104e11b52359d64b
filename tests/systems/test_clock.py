"""The simulated clock: per-client task times and the most steps within a limit, against plain-Python loops."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedjax_lite import systems
from tests.systems import reference


def random_systems(draw, num_clients):
  floats = lambda low, high: st.floats(low, high, allow_nan=False, allow_infinity=False)
  return systems.ClientSystems(
      seconds_per_example=draw(st.lists(floats(0.0, 0.3), min_size=num_clients, max_size=num_clients)),
      download_bits_per_second=draw(st.lists(floats(1e3, 1e8), min_size=num_clients, max_size=num_clients)),
      upload_bits_per_second=draw(st.lists(floats(1e3, 1e8), min_size=num_clients, max_size=num_clients)),
      seconds_per_step=draw(st.lists(floats(0.0, 0.5), min_size=num_clients, max_size=num_clients)))


@st.composite
def tasks(draw):
  num_clients = draw(st.integers(1, 6))
  population = random_systems(draw, num_clients)
  size = draw(st.integers(0, 12))
  clients = np.asarray(draw(st.lists(st.integers(0, num_clients - 1), min_size=size, max_size=size)), np.int64)
  batch_size = draw(st.integers(1, 8))
  full_steps = np.asarray(draw(st.lists(st.integers(0, 40), min_size=size, max_size=size)), np.int64)
  # n with only the last batch partial: (K - 1) * B < n <= K * B (n = 0 when K = 0).
  partial = np.asarray(draw(st.lists(st.integers(0, batch_size - 1), min_size=size, max_size=size)), np.int64)
  num_examples = np.where(full_steps > 0, full_steps * batch_size - partial, 0)
  bits = (draw(st.integers(0, 10**9)), draw(st.integers(0, 10**9)))
  return population, clients, full_steps, num_examples, batch_size, bits


@settings(max_examples=60, deadline=None, derandomize=True)
@given(task=tasks(), seconds=st.floats(0.0, 300.0))
def test_steps_within_equals_a_linear_scan(task, seconds):
  population, clients, full_steps, num_examples, batch_size, (down, up) = task
  got = systems.steps_within(population, clients, seconds=seconds, full_steps=full_steps, num_examples=num_examples,
                             batch_size=batch_size, download_bits=down, upload_bits=up)
  expected = [reference.steps_within(population, c, seconds, k, n, batch_size, down, up)
              for c, k, n in zip(clients, full_steps, num_examples)]
  np.testing.assert_array_equal(got, np.asarray(expected, np.int64).reshape(-1))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(task=tasks())
def test_client_timings_equal_the_formula_exactly(task):
  population, clients, full_steps, num_examples, batch_size, (down, up) = task
  timings = systems.client_timings(population, clients, steps=full_steps, num_examples=num_examples,
                                   download_bits=down, upload_bits=up)
  expected = [reference.task_time(population, c, k, n, batch_size, down, up)
              for c, k, n in zip(clients, full_steps, num_examples)]
  np.testing.assert_array_equal(timings.total_seconds, np.asarray(expected, np.float64).reshape(-1))


def test_a_worked_example():
  """d = u = 1 s (10^6 bits at 10^6 bit/s), 1/8 s per example and 1/4 s per step, batch 4, a client of 10
  examples: 3 steps (4 + 4 + 2 examples): T(s) = 1 + (s/4 + min(4s, 10)/8) + 1."""
  population = systems.constant_systems(1, seconds_per_example=0.125, download_bits_per_second=1e6,
                                        seconds_per_step=0.25)
  timings = systems.client_timings(population, [0], steps=[3], num_examples=[10], download_bits=10**6,
                                   upload_bits=10**6)
  assert timings.download_seconds[0] == 1.0 and timings.upload_seconds[0] == 1.0
  assert timings.compute_seconds[0] == 0.75 + 1.25
  kwargs = dict(full_steps=[3], num_examples=[10], batch_size=4, download_bits=10**6, upload_bits=10**6)
  assert systems.steps_within(population, [0], seconds=4.0, **kwargs)[0] == 3  # T(3) = 4.0 exactly
  assert systems.steps_within(population, [0], seconds=3.99, **kwargs)[0] == 2  # T(2) = 3.5
  assert systems.steps_within(population, [0], seconds=2.0, **kwargs)[0] == 0  # T(0) = 2
  assert systems.steps_within(population, [0], seconds=1.5, **kwargs)[0] == -1


def test_simulated_clock():
  clock = systems.SimulatedClock()
  assert clock.advance(1800.0) == 1800.0 and clock.advance(5400.0) == 7200.0 and clock.elapsed_hours == 2.0
  with pytest.raises(ValueError, match="seconds"):
    clock.advance(-1.0)
  with pytest.raises(ValueError, match="elapsed_seconds"):
    systems.SimulatedClock(float("nan"))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(clients=[3]), ValueError, r"clients must lie in \[0, 2\)"),
    (dict(clients=[0.5]), TypeError, "integer"),
    (dict(steps=[1, 2]), ValueError, "steps"),
    (dict(steps=[-1]), ValueError, "steps"),
    (dict(num_examples=[1.5]), ValueError, "num_examples"),
    (dict(download_bits=-1), ValueError, "download_bits"),
    (dict(upload_bits=2.0), TypeError, "upload_bits"),
])
def test_client_timings_validation(kwargs, error, match):
  arguments = dict(clients=[0], steps=[1], num_examples=[1], download_bits=1, upload_bits=1) | kwargs
  with pytest.raises(error, match=match):
    systems.client_timings(systems.constant_systems(2), arguments.pop("clients"), **arguments)
