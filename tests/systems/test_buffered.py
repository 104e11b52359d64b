"""FedBuff's event order (systems.BufferedSchedule): invariants over generated durations and configurations
(hypothesis, derandomized), and the synchronous special case.

The full re-derivation of the order against a NumPy priority queue, with the model, is in
tests/algorithms/test_fed_buff.py; these are the properties every order must have.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedjax_lite import systems
from fedjax_lite.systems import buffered
from fedjax_lite.core.sampling import sample_clients
from tests.algorithms.test_fed_buff import reference_event_order


@settings(max_examples=80, deadline=None, derandomize=True)
@given(num_clients=st.integers(1, 12), data=st.data(), seed=st.integers(0, 5),
       dropout=st.sampled_from([0.0, 0.3, "windows"]))
def test_event_order_invariants(num_clients, data, seed, dropout):
  buffer_size = data.draw(st.integers(1, min(6, num_clients)))
  concurrency = data.draw(st.integers(1, num_clients - buffer_size + 1))
  max_staleness = data.draw(st.integers(0, 4))
  # Durations on a coarse grid, so that ties (several arrivals at one instant) happen often.
  durations = np.array(data.draw(st.lists(st.integers(1, 6), min_size=num_clients, max_size=num_clients)), float)
  if dropout == "windows":  # one window per client on a 12 s period, at least as long as the longest task
    starts = data.draw(st.lists(st.integers(0, 5), min_size=num_clients, max_size=num_clients))
    availability = systems.AvailabilityWindows.from_windows([[(float(a), a + 6.0)] for a in starts], 12.0)
  else:
    availability = systems.RandomDropout(dropout)
  schedule = systems.BufferedSchedule(durations, concurrency=concurrency, buffer_size=buffer_size,
                                      max_staleness=max_staleness, seed=seed, availability=availability)
  previous_time, applied = 0.0, 0
  for expected_step in range(6):
    step = schedule.next_step()
    assert step.step == expected_step and step.clients.shape == (buffer_size,)
    assert np.all((step.staleness >= 0) & (step.staleness <= max_staleness))
    np.testing.assert_array_equal(step.staleness, step.step - step.versions)
    assert step.time_seconds >= previous_time and np.all(step.arrival_seconds <= step.time_seconds)
    np.testing.assert_allclose(step.arrival_seconds - step.start_seconds, durations[step.clients])
    assert step.num_arrivals == buffer_size + step.num_dropped_stale
    previous_time, applied = step.time_seconds, applied + buffer_size
    in_flight = schedule.in_flight
    # A new client starts for every arrival (every place filled, unless no free client is online).
    assert len(in_flight["clients"]) + schedule.idle_places == concurrency
    assert dropout == "windows" or schedule.idle_places == 0
    if dropout == "windows":  # only online clients start, and none trains past its window's end
      for client, start, arrival in zip(step.clients, step.start_seconds, step.arrival_seconds):
        assert availability.online_for([client], start)[0] >= arrival - start
    assert len(set(in_flight["clients"].tolist())) == len(in_flight["clients"])  # one task at a time per client
    assert len(set(step.clients.tolist())) == buffer_size  # and contributes at most once to a server step
    assert np.all(in_flight["versions"] <= schedule.version)
  assert (schedule.num_started + schedule.idle_places
          == concurrency + schedule.num_arrivals + schedule.num_dropped_offline)
  assert schedule.num_arrivals >= applied + schedule.num_dropped_stale  # plus those still in the buffer


def test_equal_durations_and_concurrency_equal_to_k_are_synchronous_rounds():
  schedule = systems.BufferedSchedule(np.full(10, 2.5), concurrency=4, buffer_size=4, max_staleness=0, seed=3)
  for round_num in range(4):
    step = schedule.next_step()
    np.testing.assert_array_equal(step.clients, sample_clients(10, 4, seed=3, round_num=round_num))
    assert np.all(step.staleness == 0) and step.time_seconds == 2.5 * (round_num + 1)
    assert step.num_arrivals == 4 and step.num_dropped_stale == 0


def test_metrics_and_default_staleness_bound():
  schedule = systems.BufferedSchedule([1.0, 3.0, 2.0], concurrency=2, buffer_size=1, max_staleness=0)
  metrics = systems.step_metrics(schedule.next_step())
  assert set(metrics) == {f"fedbuff/{key}" for key in ("server_steps", "arrivals", "dropped_stale", "dropped_offline",
                                                        "mean_staleness", "max_staleness", "idle_places",
                                                        "elapsed_seconds", "elapsed_hours")}
  assert metrics["fedbuff/server_steps"] == 1 and metrics["fedbuff/elapsed_hours"] == metrics[
      "fedbuff/elapsed_seconds"] / 3600.0
  assert systems.default_max_staleness(20, 10) == 8 and systems.default_max_staleness(5, 10) == 4


@pytest.mark.parametrize("dropout, max_staleness", [(0.0, 1), (0.3, 1), (0.5, 3)])
def test_event_order_equals_the_numpy_priority_queue(dropout, max_staleness):
  durations = np.array([1.0, 2.5, 1.3, 4.0, 0.7, 9.0, 1.3, 2.0])
  config = dict(concurrency=5, buffer_size=2, max_staleness=max_staleness)
  updates, dropped, offline = reference_event_order(durations, **config, seed=7, num_updates=12, dropout=dropout)
  schedule = systems.BufferedSchedule(durations, **config, seed=7, availability=systems.RandomDropout(dropout))
  steps = [schedule.next_step() for _ in range(12)]
  assert [list(zip(s.clients.tolist(), s.versions.tolist())) for s in steps] == [
      [(client, version) for client, version in update] for update in updates]
  assert sum(s.num_dropped_stale for s in steps) == dropped
  assert sum(s.num_dropped_offline for s in steps) == offline
  assert (offline > 0) == (dropout > 0)


# Periodic windows (period 20 s) for the 8 clients of the priority-queue test: some always-on-ish, some with two
# short windows, one with a single window shorter than its task (it is always aborted); none ends at the period, so
# the reference needs no wrap-around rule.
PERIOD = 20.0
WINDOWS = [[(0.0, 19.0)], [(2.0, 6.0), (11.0, 17.5)], [(0.5, 9.0)], [(3.0, 15.0)], [(1.0, 3.0), (8.0, 12.0)],
           [(4.0, 5.0)], [(0.0, 10.0), (12.5, 19.5)], [(6.0, 18.0)]]


@pytest.mark.parametrize("concurrency, max_staleness", [(5, 1), (3, 2), (6, 3)])
def test_windows_event_order_equals_the_numpy_priority_queue(concurrency, max_staleness):
  """Only online clients start, a window closing mid-task aborts it, idle places wait for the next arrival or the
  next window to open: the order equals the NumPy/heapq re-derivation's, with aborted tasks and idle places both
  exercised."""
  durations = np.array([1.0, 2.5, 1.3, 4.0, 0.7, 9.0, 1.3, 2.0])
  config = dict(concurrency=concurrency, buffer_size=2, max_staleness=max_staleness)
  idle = []
  updates, dropped, offline = reference_event_order(durations, **config, seed=7, num_updates=20,
                                                    windows=WINDOWS, period=PERIOD, idle=idle)
  availability = systems.AvailabilityWindows.from_windows(WINDOWS, period_seconds=PERIOD)
  schedule = systems.BufferedSchedule(durations, **config, seed=7, availability=availability)
  steps = [schedule.next_step() for _ in range(20)]
  assert [list(zip(s.clients.tolist(), s.versions.tolist())) for s in steps] == [
      [(client, version) for client, version in update] for update in updates]
  assert schedule.num_dropped_stale == dropped  # totals over the same instants (the 20th update's included)
  assert schedule.num_dropped_offline == offline > 0  # tasks aborted by a closing window
  assert [s.idle_places for s in steps] == idle
  for step in steps:  # every applied client was online for its whole task
    for client, start, arrival in zip(step.clients, step.start_seconds, step.arrival_seconds):
      assert availability.online_for([client], start)[0] >= arrival - start
  if concurrency == 6:
    assert max(idle) > 0, "the example must exercise idle places"


def test_windows_wake_up_after_a_night_without_clients():
  """Every client offline at night (hours 0 to 8 of each day): the places stay idle, no client starts, and the
  first tasks start when the first window opens (a wake-up instant with no arrival)."""
  windows = [[(8 * 3600.0 + 60.0 * k, 20 * 3600.0)] for k in range(4)]
  availability = systems.AvailabilityWindows.from_windows(windows, period_seconds=86400.0)
  schedule = systems.BufferedSchedule(np.full(4, 600.0), concurrency=2, buffer_size=1, max_staleness=4,
                                      availability=availability)
  assert schedule.idle_places == 2 and len(schedule.in_flight["clients"]) == 0
  step = schedule.next_step()
  assert step.start_seconds[0] == 8 * 3600.0 and step.time_seconds == 8 * 3600.0 + 600.0
  # The one client online at 8:00 started at once, the second place waited for client 1's window at 8:01.
  assert schedule.in_flight["start_seconds"].tolist() == [8 * 3600.0 + 60.0, 8 * 3600.0 + 600.0]


def test_windows_that_end_for_good_stop_the_order_with_a_clear_error():
  availability = systems.AvailabilityWindows.from_windows([[(0.0, 5.0)], [(0.0, 5.0)]])  # not periodic
  schedule = systems.BufferedSchedule([3.0, 3.0], concurrency=1, buffer_size=1, max_staleness=0,
                                      availability=availability)
  assert schedule.next_step().time_seconds == 3.0  # the second task is aborted at 5 s; no one is online again
  with pytest.raises(RuntimeError, match="no free client is ever online again"):
    schedule.next_step()


def test_schedule_arguments():
  with pytest.raises(ValueError, match="windows for 2 clients, task_seconds 3"):
    systems.BufferedSchedule([1.0, 2.0, 3.0], concurrency=1, buffer_size=1, max_staleness=0,
                             availability=systems.diurnal_availability(2, seed=0))
  with pytest.raises(ValueError, match=r"supports AlwaysOn\(\), RandomDropout\(p\) and AvailabilityWindows"):
    systems.BufferedSchedule([1.0, 2.0], concurrency=1, buffer_size=1, max_staleness=0, availability=object())
  with pytest.raises(ValueError, match=r"concurrency \+ buffer_size - 1 \(2 \+ 2 - 1\) must be <= the number of "
                                       r"clients \(2\)"):
    systems.BufferedSchedule([1.0, 2.0], concurrency=2, buffer_size=2, max_staleness=0)
  schedule = systems.BufferedSchedule([1.0, 2.0], concurrency=1, buffer_size=1, max_staleness=0)
  schedule.next_step()
  with pytest.raises(ValueError, match="step"):
    schedule.planned(0)  # already taken


def test_next_online_of_windows():
  windows = systems.AvailabilityWindows.from_windows([[(10.0, 20.0), (30.0, 40.0)], [(0.0, 5.0)], []],
                                                     period_seconds=50.0)
  for time, expected in [(0.0, [10.0, 0.0, np.inf]), (5.0, [5.0, 45.0, np.inf]), (25.0, [5.0, 25.0, np.inf]),
                         (45.0, [15.0, 5.0, np.inf]), (99.5, [10.5, 0.5, np.inf])]:
    np.testing.assert_array_equal(windows.next_online([0, 1, 2], time), expected)
  once = systems.AvailabilityWindows.from_windows([[(10.0, 20.0)], [(0.0, 5.0)]])
  np.testing.assert_array_equal(once.next_online([0, 1], 7.0), [3.0, np.inf])


def test_a_window_ending_within_a_rounding_unit_of_now_has_ended():
  """Regression: at ``t = 1000.5`` client 1's periodic window ``[0.3, 0.5 + 1e-15)`` has ``1e-15`` s left, less than
  a rounding unit of ``t``: starting it would schedule its abort at ``t`` itself and the clock would never move
  again (the schedule looped forever on a diurnal population). It counts as offline, so the start at 1000.5 draws
  from client 0 alone (seed 1 would draw client 1 from both)."""
  windows = [[(0.0, 100.0)], [(0.3, 0.5 + 1e-15)], [(50.0, 60.0)]]
  availability = systems.AvailabilityWindows.from_windows(windows, period_seconds=100.0)
  assert 0 < availability.online_for([1], 1000.5)[0] and 1000.5 + availability.online_for([1], 1000.5)[0] == 1000.5
  schedule = systems.BufferedSchedule([1000.5, 5.0, 5.0], concurrency=1, buffer_size=1, max_staleness=0, seed=1,
                                      availability=availability)
  assert schedule.next_step().time_seconds == 1000.5
  assert schedule.in_flight["clients"].tolist() == [0] and schedule.in_flight["arrival_seconds"][0] > 1000.5


@settings(max_examples=60, deadline=None, derandomize=True)
@given(data=st.data(), seed=st.integers(0, 5))
def test_generated_windows_equal_the_numpy_priority_queue(data, seed):
  """Random durations and one or two windows per client on a 20 s period (none reaching the period's end, so the
  reference needs no wrap-around): the order, the counts and the idle places equal the re-derivation's. (Every
  client has a window as long as its task, so updates keep coming.)"""
  num_clients = data.draw(st.integers(2, 8))
  buffer_size = data.draw(st.integers(1, min(3, num_clients)))
  concurrency = data.draw(st.integers(1, num_clients - buffer_size + 1))
  max_staleness = data.draw(st.integers(0, 3))
  durations = np.array(data.draw(st.lists(st.integers(1, 6), min_size=num_clients, max_size=num_clients)), float)
  windows = []  # a window of 6-9 s (as long as any task) starting in [0, 5], and maybe a short one in [15, 19]
  for _ in range(num_clients):
    start = float(data.draw(st.integers(0, 5)))
    windows.append([(start, start + data.draw(st.integers(6, 9)))])
    if data.draw(st.booleans()):
      windows[-1].append((15.0, 15.0 + data.draw(st.integers(1, 4))))
  idle = []
  config = dict(concurrency=concurrency, buffer_size=buffer_size, max_staleness=max_staleness)
  updates, dropped, offline = reference_event_order(durations, **config, seed=seed, num_updates=8, windows=windows,
                                                    period=20.0, idle=idle)
  schedule = systems.BufferedSchedule(durations, **config, seed=seed,
                                      availability=systems.AvailabilityWindows.from_windows(windows, 20.0))
  steps = [schedule.next_step() for _ in range(8)]
  assert [list(zip(s.clients.tolist(), s.versions.tolist())) for s in steps] == [
      [(client, version) for client, version in update] for update in updates]
  # Totals over the same simulated instants (the reference, like the schedule, finishes the 8th update's instant).
  assert (schedule.num_dropped_stale, schedule.num_dropped_offline) == (dropped, offline)
  assert [s.idle_places for s in steps] == idle


def test_an_order_that_never_updates_stops_with_a_clear_error(monkeypatch):
  """Every window shorter than every task: each task is aborted, no update ever comes; after the stall limit (made
  small here) the schedule says why instead of simulating forever."""
  monkeypatch.setattr(buffered, "STALLED_INSTANTS", 50)
  availability = systems.AvailabilityWindows.from_windows([[(0.0, 2.0)], [(1.0, 3.0)], [(5.0, 6.0)]], 10.0)
  schedule = systems.BufferedSchedule([4.0, 4.0, 4.0], concurrency=2, buffer_size=1, max_staleness=0,
                                      availability=availability)
  with pytest.raises(RuntimeError, match="no server update in 100 simulated instants .* aborted"):
    schedule.next_step()
