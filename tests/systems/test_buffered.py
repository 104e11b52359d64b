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
from fedjax_lite.core.sampling import sample_clients
from tests.algorithms.test_fed_buff import reference_event_order


@settings(max_examples=80, deadline=None, derandomize=True)
@given(num_clients=st.integers(1, 12), data=st.data(), seed=st.integers(0, 5),
       dropout=st.sampled_from([0.0, 0.3]))
def test_event_order_invariants(num_clients, data, seed, dropout):
  buffer_size = data.draw(st.integers(1, min(6, num_clients)))
  concurrency = data.draw(st.integers(1, num_clients - buffer_size + 1))
  max_staleness = data.draw(st.integers(0, 4))
  # Durations on a coarse grid, so that ties (several arrivals at one instant) happen often.
  durations = np.array(data.draw(st.lists(st.integers(1, 6), min_size=num_clients, max_size=num_clients)), float)
  schedule = systems.BufferedSchedule(durations, concurrency=concurrency, buffer_size=buffer_size,
                                      max_staleness=max_staleness, seed=seed,
                                      availability=systems.RandomDropout(dropout))
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
    assert len(in_flight["clients"]) == concurrency  # a new client starts for every arrival
    assert len(set(in_flight["clients"].tolist())) == concurrency  # a client trains one task at a time
    assert len(set(step.clients.tolist())) == buffer_size  # and contributes at most once to a server step
    assert np.all(in_flight["versions"] <= schedule.version)
  assert schedule.num_started == concurrency + schedule.num_arrivals + schedule.num_dropped_offline
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
                                                        "mean_staleness", "max_staleness", "elapsed_seconds",
                                                        "elapsed_hours")}
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


def test_windows_are_refused():
  with pytest.raises(ValueError, match="on/off windows are not supported"):
    systems.BufferedSchedule([1.0, 2.0], concurrency=1, buffer_size=1, max_staleness=0,
                             availability=systems.diurnal_availability(2, seed=0))
  with pytest.raises(ValueError, match=r"concurrency \+ buffer_size - 1 \(2 \+ 2 - 1\) must be <= the number of "
                                       r"clients \(2\)"):
    systems.BufferedSchedule([1.0, 2.0], concurrency=2, buffer_size=2, max_staleness=0)

