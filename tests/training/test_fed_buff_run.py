"""``training.run_fed_buff`` with run_training's parts: the privacy ledger (epsilon per server step against
dp_accounting composed by hand), checkpoints (a run stopped half way and resumed from its checkpoint by a fresh
process object ends bit-identical to a straight run: state, schedule position, the rng of the event order and of
the device, records), and the csv/jsonl logs; every new option validated."""

from __future__ import annotations

import csv
import dataclasses
import json

import chex
import dp_accounting
import jax
import numpy as np
import optax
import pytest

from fedjax_lite import aggregators, algorithms, privacy, systems
from fedjax_lite.core.packing import ClientSpec
from fedjax_lite.training import CheckpointError, ConfigMismatchError, CsvTracker, fed_buff_privacy, run_fed_buff
from tests.algorithms.family_setup import NUM_CLIENTS, make_setup

SPEC = ClientSpec(batch_size=4)
DELTA = 1e-5
WALL_TIMES = ("round_time_in_seconds", "evaluation_time_in_seconds")


def dp_fed_buff(model, noise=1.0):
  return algorithms.fed_buff(model, concurrency=3, buffer_size=2, max_staleness=2, client_learning_rate=0.1,
                             aggregator=aggregators.gaussian_fixed(noise, 2, 0.1), weighting="uniform",
                             server_optimizer=optax.sgd(0.5, momentum=0.9))


def test_epsilon_per_server_step_equals_dp_accounting():
  population, model, params, _ = make_setup()
  buff = dp_fed_buff(model)
  ledger = fed_buff_privacy(buff, delta=DELTA)
  run = run_fed_buff(buff, population, params, client_spec=SPEC, seed=1, num_server_steps=4,
                     task_seconds=np.linspace(1.0, 2.0, NUM_CLIENTS), privacy=ledger)
  event = dp_accounting.GaussianDpEvent(1.0)  # gaussian_fixed(1.0, ...): one Gaussian of multiplier 1 per step
  assert buff.aggregator.dp_event() == event
  for steps, record in enumerate(run.history, start=1):
    expected = dp_accounting.rdp.RdpAccountant().compose(
        dp_accounting.SelfComposedDpEvent(event, steps)).get_epsilon(DELTA)
    # The ledger scales one step's RDP by the steps; dp_accounting adds it ``steps`` times: <= steps ulps apart.
    assert record["privacy/epsilon"] == pytest.approx(expected, rel=4 * steps * np.finfo(float).eps)
    assert record["privacy/delta"] == DELTA and record["step"] == steps - 1


def test_epsilon_budget_stops_before_the_step_that_exceeds_it():
  population, model, params, _ = make_setup()
  buff = dp_fed_buff(model)
  unlimited = fed_buff_privacy(buff, delta=DELTA)
  budget = (unlimited.epsilon_after(2) + unlimited.epsilon_after(3)) / 2
  run = run_fed_buff(buff, population, params, client_spec=SPEC, seed=1, num_server_steps=5,
                     task_seconds=np.linspace(1.0, 2.0, NUM_CLIENTS),
                     privacy=fed_buff_privacy(buff, delta=DELTA, epsilon_budget=budget))
  assert len(run.history) == 2 and run.schedule.steps_taken == 2 and int(run.state.version) == 2
  assert run.stopped_early.startswith("privacy budget")


def test_ledgers_that_do_not_fit_fed_buff_are_refused():
  population, model, params, _ = make_setup()
  buff = dp_fed_buff(model)
  common = dict(client_spec=SPEC, num_server_steps=1, task_seconds=np.ones(NUM_CLIENTS))
  amplified = privacy.PrivacyLedger(privacy.sampled_run_events(buff.aggregator.dp_event(), sampling="poisson",
                                                               sampling_probability=0.1), DELTA)
  with pytest.raises(ValueError, match="unamplified event per server step"):
    run_fed_buff(buff, population, params, privacy=amplified, **common)
  other_noise = fed_buff_privacy(dp_fed_buff(model, noise=2.0), delta=DELTA)
  with pytest.raises(ValueError, match="unamplified event per server step"):
    run_fed_buff(buff, population, params, privacy=other_noise, **common)
  with pytest.raises(TypeError, match="privacy must be a PrivacyLedger"):
    run_fed_buff(buff, population, params, privacy=1.0, **common)
  plain = algorithms.fed_buff(model, concurrency=2, buffer_size=2, max_staleness=1, client_learning_rate=0.1)
  with pytest.raises(ValueError, match="differentially private aggregator"):
    fed_buff_privacy(plain, delta=DELTA)
  with pytest.raises(TypeError, match="FedBuff"):
    fed_buff_privacy(algorithms.fed_avg(model, client_learning_rate=0.1), delta=DELTA)


def test_run_arguments_are_validated(tmp_path):
  population, model, params, _ = make_setup()
  buff = dp_fed_buff(model)
  common = dict(client_spec=SPEC, num_server_steps=1, task_seconds=np.ones(NUM_CLIENTS))
  for kwargs, error, match in [
      (dict(checkpoint_every=0), ValueError, "checkpoint_every"),
      (dict(resume=True), ValueError, "resume=True needs a checkpoint_dir"),
      (dict(trackers=[object()]), TypeError, "trackers must have write"),
      (dict(evaluate=1), TypeError, "evaluate must be a function"),
      (dict(on_round_end=1), TypeError, "on_round_end must be a function"),
      (dict(evaluate_every=0), ValueError, "evaluate_every"),
  ]:
    with pytest.raises(error, match=match):
      run_fed_buff(buff, population, params, **common, **kwargs)
  first = run_fed_buff(buff, population, params, **common)
  with pytest.raises(ValueError, match="either from its state and schedule or from its checkpoint_dir"):
    run_fed_buff(buff, population, params, client_spec=SPEC, num_server_steps=2, state=first.state,
                 schedule=first.schedule, checkpoint_dir=tmp_path / "c")
  with pytest.raises(ValueError, match="keeps its schedule's durations"):
    run_fed_buff(buff, population, params, client_spec=SPEC, num_server_steps=2, state=first.state,
                 schedule=first.schedule, task_seconds=np.ones(NUM_CLIENTS))


# ------------------------------------------------------------------------------------------------ checkpoints

def _schedule_position(schedule):
  """Everything the event order carries from step to step (its heap, the busy mask, the buffer, the totals and the
  draw counter of its random starts), and the next three steps it plans."""
  position = {name: getattr(schedule, name) for name in (
      "steps_taken", "version", "time_seconds", "num_arrivals", "num_dropped_stale", "num_dropped_offline",
      "num_started", "_num_starts", "_since")}
  position["_in_flight"] = sorted(schedule._in_flight)
  position["_buffer"] = list(schedule._buffer)
  position["_busy"] = schedule._busy.tolist()
  return position


def _next_steps(schedule, count=3):
  steps = [schedule.next_step() for _ in range(count)]
  return [(s.step, s.clients.tolist(), s.versions.tolist(), s.time_seconds, s.num_arrivals) for s in steps]


def _records(history):
  return [{key: value for key, value in record.items() if key not in WALL_TIMES} for record in history]


def test_a_stopped_run_resumes_bit_identically(tmp_path):
  """DP noise on the device (keys from the seed and the step), random dropouts and client draws on the host
  (from the seed and the start instant), momentum and the ring of versions in the state: 6 steps straight equal 3
  steps, a checkpoint, and 3 more from the checkpoint by a NEW process object (as a new Python process would)."""
  population, model, params, _ = make_setup()
  clients = systems.constant_systems(NUM_CLIENTS, seconds_per_example=0.5, download_bits_per_second=1e6,
                                     availability=systems.RandomDropout(0.3))
  clients = dataclasses.replace(clients, seconds_per_example=np.linspace(0.2, 1.3, NUM_CLIENTS))
  common = dict(client_spec=SPEC, seed=3, systems=clients, evaluate=lambda p: {"sum": sum(float(np.sum(x)) for x in jax.tree.leaves(p))},
                evaluate_every=3)  # the first half ends on an evaluation step, as the straight run evaluates it
  ledger = lambda process: fed_buff_privacy(process, delta=DELTA)  # noqa: E731
  buff = dp_fed_buff(model, noise=0.3)
  straight = run_fed_buff(buff, population, params, num_server_steps=6, privacy=ledger(buff),
                          checkpoint_dir=tmp_path / "straight", checkpoint_every=3, **common)

  half = run_fed_buff(buff, population, params, num_server_steps=3, privacy=ledger(buff),
                      checkpoint_dir=tmp_path / "run", checkpoint_every=3, **common)
  assert half.schedule.steps_taken == 3
  fresh = dp_fed_buff(model, noise=0.3)  # a new process object: nothing cached from the first half
  csv_path = tmp_path / "metrics.csv"
  resumed = run_fed_buff(fresh, population, params, num_server_steps=6, privacy=ledger(fresh),
                         checkpoint_dir=tmp_path / "run", checkpoint_every=3, resume=True,
                         metrics_path=tmp_path / "metrics.jsonl", trackers=[CsvTracker(csv_path)], **common)

  chex.assert_trees_all_equal(resumed.state, straight.state)  # params, momentum, DP state, the ring, the version
  assert _schedule_position(resumed.schedule) == _schedule_position(straight.schedule)
  assert _next_steps(resumed.schedule) == _next_steps(straight.schedule)
  assert _records(resumed.history) == _records(straight.history)
  assert sum(record["fedbuff/dropped_offline"] for record in straight.history) > 0  # the dropout draws ran
  assert [r["step"] for r in resumed.history] == list(range(6)) and "evaluation/sum" in resumed.history[2]
  assert resumed.history[-1]["privacy/epsilon"] == ledger(fresh).epsilon_after(6)
  # The logs hold the checkpoint's steps and the resumed ones, as run_training writes them.
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert _records(lines) == _records(resumed.history)
  with open(csv_path) as source:
    rows = list(csv.DictReader(source))
  assert [int(row["round"]) for row in rows] == list(range(6))
  assert [float(row["fedbuff/elapsed_seconds"]) for row in rows] == [
      r["fedbuff/elapsed_seconds"] for r in straight.history]


def test_resuming_with_another_event_order_is_refused(tmp_path):
  population, model, params, _ = make_setup()
  buff = dp_fed_buff(model)
  common = dict(client_spec=SPEC, seed=3, checkpoint_dir=tmp_path / "run")
  run_fed_buff(buff, population, params, num_server_steps=2, task_seconds=np.linspace(1.0, 2.0, NUM_CLIENTS),
               **common)
  with pytest.raises(ConfigMismatchError, match="sampler"):
    run_fed_buff(buff, population, params, num_server_steps=4, task_seconds=np.linspace(1.0, 3.0, NUM_CLIENTS),
                 resume=True, **common)
  with pytest.raises(ValueError, match="already holds checkpoints"):
    run_fed_buff(buff, population, params, num_server_steps=4, task_seconds=np.linspace(1.0, 2.0, NUM_CLIENTS),
                 **common)


def test_a_replayed_event_order_that_differs_from_the_checkpoints_is_refused(tmp_path):
  """Windows moved but alike in summary (same count, period and online seconds: the run description cannot tell
  them apart) change the event order: the replay on resume sees it and refuses."""
  population, model, params, _ = make_setup()
  buff = dp_fed_buff(model)

  def population_systems(shift):
    windows = [[(shift * k % 7.0, shift * k % 7.0 + 12.0)] for k in range(NUM_CLIENTS)]
    return systems.constant_systems(NUM_CLIENTS, seconds_per_example=0.3, download_bits_per_second=1e5,
                                     availability=systems.AvailabilityWindows.from_windows(windows, 20.0))

  common = dict(client_spec=SPEC, seed=3, checkpoint_dir=tmp_path / "run")
  run_fed_buff(buff, population, params, num_server_steps=3, systems=population_systems(1.0), **common)
  with pytest.raises(CheckpointError, match="event order replayed from the seed differs"):
    run_fed_buff(buff, population, params, num_server_steps=5, systems=population_systems(3.0), resume=True,
                 **common)
