"""Planning a synchronous round with systems: dropout, over-selection with a deadline, partial work.

``plan_round`` against the plain-Python, event-driven re-derivation of ``reference.py`` on generated populations,
policies and availability models (exact: the same float64 formula), plus worked examples with exact numbers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedjax_lite import systems
from fedjax_lite.core import sampling
from fedjax_lite.systems import availability as availability_lib
from tests.systems import reference
from tests.systems.test_clock import random_systems


@st.composite
def rounds(draw):
  num_clients = draw(st.integers(1, 8))
  population = random_systems(draw, num_clients)
  kind = draw(st.sampled_from(["always", "dropout", "windows"]))
  if kind == "dropout":
    population = population.replace(availability=systems.RandomDropout(draw(st.sampled_from([0.0, 0.3, 1.0]))))
  elif kind == "windows":
    period = draw(st.sampled_from([None, 100.0]))
    windows = []
    for _ in range(num_clients):
      count = draw(st.integers(0, 3))
      pairs = []
      for _ in range(count):
        start = draw(st.floats(0.0, 90.0))
        pairs.append((start, start + draw(st.floats(0.5, 100.0 - start if period else 50.0))))
      windows.append(pairs)
    population = population.replace(availability=systems.AvailabilityWindows.from_windows(windows, period))
  size = draw(st.integers(0, 10))
  clients = np.asarray(draw(st.lists(st.integers(0, num_clients - 1), min_size=size, max_size=size)), np.int64)
  batch_size = draw(st.integers(1, 5))
  full_steps = np.asarray(draw(st.lists(st.integers(1, 30), min_size=size, max_size=size)), np.int64)
  partial = np.asarray(draw(st.lists(st.integers(0, batch_size - 1), min_size=size, max_size=size)), np.int64)
  num_examples = full_steps * batch_size - partial
  deadline = draw(st.one_of(st.none(), st.floats(0.5, 200.0)))
  policy = systems.RoundPolicy(deadline_seconds=deadline, partial_work=deadline is not None and draw(st.booleans()),
                               min_steps=draw(st.integers(1, 3)), overhead_seconds=draw(st.sampled_from([0.0, 2.5])))
  target = draw(st.one_of(st.none(), st.integers(1, 10)))
  bits = (draw(st.integers(0, 10**8)), draw(st.integers(0, 10**8)))
  start = draw(st.floats(0.0, 1000.0))
  return population, clients, full_steps, num_examples, batch_size, bits, policy, target, start


def reference_offline(population, clients, start, seed, round_num):
  """The availability models' documented rules, re-derived."""
  model = population.availability

  def offline(task_ends):
    if isinstance(model, systems.AlwaysOn):
      return [math.inf] * len(clients)
    if isinstance(model, systems.RandomDropout):
      draws = np.random.default_rng([seed, round_num, availability_lib.DROPOUT_STREAM]).random((2, len(clients)))
      return [draws[1][k] * task_ends[k] if draws[0][k] < model.probability else math.inf for k in range(len(clients))]
    # Windows: the rule (offline at the window's end when the task ends after it) on the model's own online time,
    # which test_availability checks against a brute-force layout of the intervals.
    out = []
    for client, task_end in zip(clients, task_ends):
      online = float(model.online_for([int(client)], start)[0])
      out.append(math.inf if task_end <= online else online)
    return out

  return offline


@settings(max_examples=150, deadline=None, derandomize=True)
@given(case=rounds(), seed=st.integers(0, 3), round_num=st.integers(0, 5))
def test_plan_round_equals_the_event_driven_reference(case, seed, round_num):
  population, clients, full_steps, num_examples, batch_size, (down, up), policy, target, start = case
  plan = systems.plan_round(population, clients, full_steps=full_steps, num_examples=num_examples,
                            batch_size=batch_size, download_bits=down, upload_bits=up, policy=policy,
                            target_clients=target, start_seconds=start, seed=seed, round_num=round_num)
  status, steps, report, duration = reference.plan(
      population, clients, full_steps, num_examples, batch_size, down, up, deadline=policy.deadline_seconds,
      partial_work=policy.partial_work, min_steps=policy.min_steps, target=target, overhead=policy.overhead_seconds,
      offline_fn=reference_offline(population, clients, start, seed, round_num))
  np.testing.assert_array_equal(plan.status, np.asarray(status, np.int8).reshape(-1))
  np.testing.assert_array_equal(plan.steps, np.asarray(steps, np.int64).reshape(-1))
  np.testing.assert_array_equal(plan.report_seconds, np.asarray(report, np.float64).reshape(-1))
  assert plan.duration_seconds == duration
  counted = plan.status == systems.COUNTED
  assert target is None or counted.sum() <= target
  np.testing.assert_array_equal(plan.num_examples[counted], np.minimum(plan.steps * batch_size, num_examples)[counted])
  metrics = plan.metrics()
  assert (metrics["systems/num_counted"] + metrics["systems/num_dropped_out"] + metrics["systems/num_timed_out"]
          + metrics["systems/num_discarded"]) == len(clients)
  assert metrics["systems/steps_done"] == int(plan.steps[counted].sum())


def worked_population(**availability):
  """Three clients alike: 1 s download, 1 s upload (10^6 bits at 10^6 bit/s), 1/8 s per example, batch 4; with 8,
  16 and 24 examples they take 2, 4 and 6 steps and report at T = 3, 4 and 5 s."""
  return systems.constant_systems(3, seconds_per_example=0.125, download_bits_per_second=1e6, **availability)


def worked_plan(policy, target=None, population=None, **kwargs):
  return systems.plan_round(population or worked_population(), [0, 1, 2], full_steps=[2, 4, 6],
                            num_examples=[8, 16, 24], batch_size=4, download_bits=10**6, upload_bits=10**6,
                            policy=policy, target_clients=target, **kwargs)


def test_worked_example_no_deadline_waits_for_the_last_report():
  plan = worked_plan(systems.RoundPolicy())
  np.testing.assert_array_equal(plan.report_seconds, [3.0, 4.0, 5.0])
  assert plan.duration_seconds == 5.0 and plan.counted.all()


def test_worked_example_over_selection_keeps_the_first_reports():
  plan = worked_plan(systems.RoundPolicy(over_selection=1.5), target=2)
  np.testing.assert_array_equal(plan.status, [systems.COUNTED, systems.COUNTED, systems.DISCARDED])
  assert plan.duration_seconds == 4.0  # the 2nd report
  np.testing.assert_array_equal(plan.counted_clients, [0, 1])


def test_worked_example_partial_work_sends_the_steps_that_fit():
  # Deadline 4.5 s: client 2 fits s with 2 + s/2 <= 4.5, i.e. 5 of its 6 steps (20 examples), reporting at 4.5.
  plan = worked_plan(systems.RoundPolicy(deadline_seconds=4.5, partial_work=True))
  np.testing.assert_array_equal(plan.steps, [2, 4, 5])
  np.testing.assert_array_equal(plan.num_examples, [8, 16, 20])
  assert plan.counted.all() and plan.duration_seconds == 4.5
  assert plan.metrics()["systems/num_partial"] == 1
  # Without partial work it times out; the server waits until the deadline for it.
  plan = worked_plan(systems.RoundPolicy(deadline_seconds=4.5))
  np.testing.assert_array_equal(plan.status, [systems.COUNTED, systems.COUNTED, systems.TIMED_OUT])
  assert plan.duration_seconds == 4.5 and plan.metrics()["systems/num_timed_out"] == 1
  # min_steps: a client that fits fewer steps is timed out.
  plan = worked_plan(systems.RoundPolicy(deadline_seconds=2.9, partial_work=True, min_steps=2))
  np.testing.assert_array_equal(plan.steps, [0, 0, 0])  # each fits 1 step (T(1) = 2.5) < 2
  assert (plan.status == systems.TIMED_OUT).all() and plan.duration_seconds == 2.9


def test_worked_example_windows_and_overhead():
  # Client 1 goes offline 3.5 s into the round (before its report at 4), client 2 is offline at the start.
  windows = systems.AvailabilityWindows.from_windows([[(0.0, 100.0)], [(0.0, 13.5)], [(50.0, 60.0)]])
  plan = worked_plan(systems.RoundPolicy(overhead_seconds=0.5),
                     population=worked_population(availability=windows), start_seconds=10.0)
  np.testing.assert_array_equal(plan.status, [systems.COUNTED, systems.DROPPED_OUT, systems.DROPPED_OUT])
  np.testing.assert_array_equal(plan.offline_seconds, [math.inf, 3.5, 0.0])
  assert plan.duration_seconds == 3.5 + 0.5  # every client resolved at 3.5 (client 1 drops), plus the overhead
  assert plan.metrics()["systems/broadcasted_bits"] == 2 * 10**6  # client 2 never downloaded


def test_random_dropout_fraction_and_reproducibility():
  """Over 400 rounds of 50 clients, the dropped fraction is within 5 standard errors of p = 0.2
  (SE = sqrt(p (1 - p) / 20000) = 0.0028); the same (seed, round) drops the same slots."""
  population = systems.constant_systems(50, availability=systems.RandomDropout(0.2))
  kwargs = dict(full_steps=np.full(50, 3), num_examples=np.full(50, 10), batch_size=4, download_bits=1000,
                upload_bits=1000)
  dropped = [np.mean(systems.plan_round(population, np.arange(50), seed=7, round_num=r, **kwargs).status
                     == systems.DROPPED_OUT) for r in range(400)]
  assert abs(np.mean(dropped) - 0.2) < 5 * math.sqrt(0.2 * 0.8 / 20000)
  again = systems.plan_round(population, np.arange(50), seed=7, round_num=3, **kwargs)
  np.testing.assert_array_equal(
      again.status, systems.plan_round(population, np.arange(50), seed=7, round_num=3, **kwargs).status)
  other = systems.plan_round(population, np.arange(50), seed=8, round_num=3, **kwargs)
  assert not np.array_equal(other.status, again.status)


def test_round_policy_num_selected_and_validation():
  assert systems.RoundPolicy(over_selection=1.3).num_selected(10) == 13
  assert systems.RoundPolicy(over_selection=1.1).num_selected(10) == 11  # not 12 from 11.000000000000002
  assert systems.RoundPolicy(over_selection=1.25).num_selected(10) == 13
  with pytest.raises(ValueError, match="partial_work needs a deadline"):
    systems.RoundPolicy(partial_work=True)
  with pytest.raises(ValueError, match="over_selection"):
    systems.RoundPolicy(over_selection=0.9)
  with pytest.raises(ValueError, match="deadline_seconds"):
    systems.RoundPolicy(deadline_seconds=0.0)
  with pytest.raises(ValueError, match="min_steps"):
    systems.RoundPolicy(deadline_seconds=1.0, partial_work=True, min_steps=0)


def test_plan_round_validation():
  with pytest.raises(ValueError, match="num_examples must fit full_steps"):
    systems.plan_round(worked_population(), [0], full_steps=[2], num_examples=[9], batch_size=4, download_bits=1,
                       upload_bits=1)
  with pytest.raises(TypeError, match="policy"):
    worked_plan({"deadline_seconds": 1.0})
  with pytest.raises(ValueError, match="target_clients"):
    worked_plan(systems.RoundPolicy(), target=0)
  with pytest.raises(ValueError, match="full_steps"):
    systems.plan_round(worked_population(), [0, 1], full_steps=[2], num_examples=[8, 8], batch_size=4,
                       download_bits=1, upload_bits=1)


def test_empty_cohort_takes_the_overhead():
  plan = systems.plan_round(worked_population(), [], full_steps=[], num_examples=[], batch_size=4, download_bits=1,
                            upload_bits=1, policy=systems.RoundPolicy(overhead_seconds=1.5))
  assert plan.duration_seconds == 1.5 and plan.metrics()["systems/num_selected"] == 0


def test_dropout_draws_follow_the_round_generator():
  """The documented stream: ``round_generator(seed, round, DROPOUT_STREAM).random((2, n))``."""
  model = systems.RandomDropout(0.5)
  got = model.offline_at(np.arange(6), 0.0, np.full(6, 10.0), seed=2, round_num=9)
  draws = sampling.round_generator(2, 9, availability_lib.DROPOUT_STREAM).random((2, 6))
  np.testing.assert_array_equal(got, np.where(draws[0] < 0.5, draws[1] * 10.0, np.inf))
