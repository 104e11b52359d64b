"""Availability models: windows against a brute-force layout of intervals, the diurnal generator's statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedjax_lite import systems
from tests.systems import reference


@st.composite
def window_sets(draw):
  period = draw(st.sampled_from([None, 24.0]))
  windows = []
  for _ in range(draw(st.integers(1, 4))):
    pairs = []
    for _ in range(draw(st.integers(0, 3))):
      start = float(draw(st.integers(0, 23)))
      end = start + float(draw(st.integers(1, 24 - int(start) if period else 10)))
      pairs.append((start, end))
    windows.append(pairs)
  return systems.AvailabilityWindows.from_windows(windows, period)


@settings(max_examples=120, deadline=None, derandomize=True)
@given(windows=window_sets(), time=st.floats(0.0, 1000.0), task=st.floats(0.0, 40.0))
def test_windows_equal_a_brute_force_layout(windows, time, task):
  """The library works in phase (``t mod period``), the reference in absolute time (windows laid out over the
  periods around ``t``): ``end - phase`` against ``(end + n P) - t``, each side one or two roundings of numbers at
  most ``t + 2P`` in magnitude, so they agree within ``4 eps (t + 2P)``; zero and infinity exactly."""
  clients = np.arange(windows.num_clients)
  online = windows.online_for(clients, time)
  expected = np.asarray([reference.windows_online_for(windows, client, time) for client in clients])
  np.testing.assert_array_equal(online == 0, expected == 0)
  np.testing.assert_array_equal(np.isinf(online), np.isinf(expected))
  finite = np.isfinite(expected)
  scale = time + 2 * (windows.period_seconds or 0.0) + float(np.max(windows.ends[np.isfinite(windows.ends)],
                                                                      initial=0.0))
  np.testing.assert_allclose(online[finite], expected[finite], rtol=0, atol=4 * np.finfo(np.float64).eps * scale)
  offline = windows.offline_at(clients, time, np.full(clients.shape, task), seed=0, round_num=0)
  np.testing.assert_array_equal(offline, [math.inf if task <= e else e for e in online])


def test_windows_merge_and_wrap_around_the_period():
  windows = systems.AvailabilityWindows.from_windows(
      [[(22.0, 24.0), (0.0, 6.0)], [(1.0, 3.0), (2.0, 5.0), (5.0, 7.0)], [(0.0, 24.0)], []], period_seconds=24.0)
  np.testing.assert_array_equal(windows.offsets, [0, 2, 3, 4, 4])
  np.testing.assert_array_equal(windows.starts, [0.0, 22.0, 1.0, 0.0])
  np.testing.assert_array_equal(windows.ends, [6.0, 24.0, 7.0, 24.0])
  np.testing.assert_array_equal(windows.online_for([0, 1, 2, 3], 23.0), [7.0, 0.0, math.inf, 0.0])
  np.testing.assert_array_equal(windows.online_for([0, 1], 24.0 * 5 + 2.0), [4.0, 5.0])  # periodic


@pytest.mark.parametrize("windows, period, match", [
    ([[(3.0, 2.0)]], None, "start < end"),
    ([[(-1.0, 2.0)]], None, "start < end"),
    ([[(0.0, 30.0)]], 24.0, "within the period"),
    ([[(0.0, 1.0, 2.0)]], None, "pair"),
    ([], None, "non-empty"),
])
def test_windows_validation(windows, period, match):
  with pytest.raises((ValueError, TypeError), match=match):
    systems.AvailabilityWindows.from_windows(windows, period)


def test_windows_without_period_may_stay_open():
  windows = systems.AvailabilityWindows.from_windows([[(5.0, math.inf)], [(0.0, 1.0)]])
  np.testing.assert_array_equal(windows.online_for([0, 1], 7.0), [math.inf, 0.0])
  with pytest.raises(ValueError, match="finite"):
    systems.AvailabilityWindows.from_windows([[(5.0, math.inf)]], period_seconds=24.0)


def test_diurnal_online_fraction_matches_its_distribution():
  """With uniform start hours, the chance a client is online at any hour is E[L] / 24 = 7 / 24 for L uniform on
  [4, 10] hours; over 20,000 clients the observed fraction is within 5 standard errors (SE = 0.0032)."""
  windows = systems.diurnal_availability(20000, seed=3, start_hour=None)
  p = 7.0 / 24.0
  for hour in (0.0, 7.5, 13.0, 23.9):
    fraction = np.mean(windows.online_for(np.arange(20000), hour * 3600.0) > 0)
    assert abs(fraction - p) < 5 * math.sqrt(p * (1 - p) / 20000), (hour, fraction)


def test_diurnal_evening_starts_make_nights_busier_than_days():
  """Starts ~ Normal(22:00, 3 h): at 02:00 a client is online when its start lies in [02:00 - L, 02:00]; at 14:00
  (12 hours from the mean start, 4 standard deviations) almost none are. The probability at 02:00, integrated
  numerically over L ~ U[4, 10] and the wrapped normal, is matched within 5 standard errors."""
  from scipy import stats

  windows = systems.diurnal_availability(20000, seed=4)
  lengths = np.linspace(4.0, 10.0, 601)
  wraps = np.arange(-3, 4) * 24.0

  def start_mass(low, high):
    return sum(stats.norm.cdf(high + w, 22.0, 3.0) - stats.norm.cdf(low + w, 22.0, 3.0) for w in wraps)

  expected = float(np.mean([start_mass(2.0 - length, 2.0) for length in lengths]))
  night = np.mean(windows.online_for(np.arange(20000), 2.0 * 3600.0) > 0)
  day = np.mean(windows.online_for(np.arange(20000), 14.0 * 3600.0) > 0)
  assert abs(night - expected) < 5 * math.sqrt(expected * (1 - expected) / 20000), (night, expected)
  assert day < 0.02 < 0.5 < night


def test_diurnal_is_reproducible_and_validated():
  a, b = systems.diurnal_availability(50, seed=1), systems.diurnal_availability(50, seed=1)
  np.testing.assert_array_equal(a.starts, b.starts)
  assert not np.array_equal(a.starts, systems.diurnal_availability(50, seed=2).starts)
  full = systems.diurnal_availability(5, seed=0, online_hours=(24.0, 24.0))
  assert np.all(np.isinf(full.online_for(np.arange(5), 1234.0)))
  with pytest.raises(ValueError, match="online_hours"):
    systems.diurnal_availability(5, online_hours=(5.0, 3.0))


def test_always_on_and_dropout_validation():
  assert np.all(np.isinf(systems.AlwaysOn().offline_at([0, 1], 0.0, [1.0, 2.0], seed=0, round_num=0)))
  with pytest.raises(ValueError, match="probability"):
    systems.RandomDropout(1.5)
  with pytest.raises(ValueError, match="task_seconds"):
    systems.RandomDropout(0.5).offline_at([0, 1], 0.0, [1.0], seed=0, round_num=0)
  never = systems.RandomDropout(0.0).offline_at(np.arange(100), 0.0, np.ones(100), seed=0, round_num=0)
  always = systems.RandomDropout(1.0).offline_at(np.arange(100), 0.0, np.ones(100), seed=0, round_num=0)
  assert np.all(np.isinf(never)) and np.all((always >= 0) & (always < 1))
