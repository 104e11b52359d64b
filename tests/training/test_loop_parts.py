"""The parts of ``run_training``, each on its own with stand-ins for the others (nothing compiles a model here): the
schedule, the recorder, the per-round driver and the scanned driver. ``test_loop.py``, ``test_scanned_training.py``
and ``test_checkpoint.py`` test them together."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import types
import warnings

import jax
import numpy as np
import pytest

from fedjax_lite.core.client_state import ClientStateStore
from fedjax_lite.core.device_rounds import RoundsOutput
from fedjax_lite.core.process import RoundOutput
from fedjax_lite.training.checkpoint import CheckpointSaveError, TrainingInterrupted
from fedjax_lite.training.recorder import Recorder, TrainingStalledError
from fedjax_lite.training.round_driver import PackedRound, drive_rounds, run_round
from fedjax_lite.training.run_checkpoints import Progress
from fedjax_lite.training.scanned_driver import drive_scanned_rounds
from fedjax_lite.training.schedule import RoundSchedule


class _Ledger:
  """A privacy ledger stand-in: epsilon = rounds / 10, budget allows ``allowed`` rounds."""

  def __init__(self, allowed: int):
    self.allowed, self.delta, self.epsilon_budget = allowed, 1e-3, allowed / 10

  def allows(self, rounds):
    return rounds <= self.allowed

  def epsilon_after(self, rounds):
    return rounds / 10


class _Checkpoints:
  """Records the saves a recorder asks for."""

  directory = "/ck"

  def __init__(self, fail_on_close=False):
    self.saved, self.closed, self.fail_on_close = [], False, fail_on_close

  def save(self, state, progress):
    self.saved.append((progress.rounds_completed, state, len(progress.history)))

  def wait(self):
    pass

  def close(self):
    self.closed = True
    if self.fail_on_close:
      raise CheckpointSaveError("could not write the checkpoint after 2 rounds", 2, 1)


def _state(value=0.0):
  return types.SimpleNamespace(params={"w": np.float32(value)})


# The schedule ------------------------------------------------------------------------------------------------------


def test_schedule_cadence():
  schedule = RoundSchedule(num_rounds=7, evaluate_every=3, checkpoint_every=2)
  assert [r for r in range(7) if schedule.evaluates_after(r)] == [2, 5, 6]
  assert [n for n in range(1, 8) if schedule.checkpoints_after(n)] == [2, 4, 6, 7]
  assert [schedule.dispatch_length(first, 4) for first in (0, 2, 3, 4, 6)] == [2, 1, 1, 2, 1]
  assert schedule.scan_length(4) == 2
  assert RoundSchedule(num_rounds=5).scan_length(8) == 5 and not RoundSchedule(5).evaluates_after(4)


def test_schedule_with_a_budget():
  schedule = RoundSchedule(num_rounds=10, evaluate_every=4, privacy=_Ledger(allowed=3))
  assert [r for r in range(10) if schedule.is_last(r)] == [2, 3, 4, 5, 6, 7, 8, 9]  # from round 2 on, no next one
  assert schedule.evaluates_after(2)  # the last round the budget allows
  assert schedule.dispatch_length(0, 8) == 3
  assert schedule.budget_message(3).startswith("privacy budget: another round would bring epsilon to 0.4 > 0.3")


# The recorder ------------------------------------------------------------------------------------------------------


def _record(recorder, round_num, **metrics):
  metrics.setdefault("client_work", {"num_non_finite_clients": 0})
  flat = {"round": round_num, **_flat(metrics)}
  recorder.record(round_num, flat, num_real_clients=2, seconds=0.5, state=_state(round_num))
  return recorder.end_dispatch(_state(round_num))


def _flat(metrics):
  from fedjax_lite.training.recorder import flatten_metrics

  return flatten_metrics(metrics)


def test_recorder_writes_each_round_with_totals_evaluation_and_epsilon(tmp_path):
  tracked = []
  tracker = types.SimpleNamespace(write=tracked.append, close=lambda: tracked.append("closed"))
  checkpoints = _Checkpoints()
  schedule = RoundSchedule(num_rounds=4, evaluate_every=2, checkpoint_every=3, privacy=_Ledger(allowed=10))
  with Recorder(schedule, evaluate=lambda params: {"w": params["w"] * 2}, metrics_path=tmp_path / "m.jsonl",
                trackers=[tracker], checkpoints=checkpoints) as recorder:
    for round_num in range(4):
      assert not _record(recorder, round_num, aggregated_bits=10, broadcasted_bits=1)
  records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
  assert records == recorder.progress.history and tracked == records + ["closed"]
  assert [r["cumulative_aggregated_bits"] for r in records] == [10, 20, 30, 40]
  assert [r.get("evaluation/w") for r in records] == [None, 2.0, None, 6.0]
  assert [r["privacy/epsilon"] for r in records] == [0.1, 0.2, 0.3, 0.4]
  assert [saved[0] for saved in checkpoints.saved] == [3, 4] and checkpoints.closed
  assert recorder.first_round_seconds == 0.5 and recorder.progress.stopped is None


def test_recorder_stops_for_the_callback_and_for_the_budget(tmp_path):
  checkpoints = _Checkpoints()
  recorder = Recorder(RoundSchedule(num_rounds=9, checkpoint_every=5), checkpoints=checkpoints,
                      on_round_end=lambda round_num, record: "enough" if round_num == 1 else None)
  with recorder:
    assert not _record(recorder, 0) and _record(recorder, 1)
  assert recorder.progress.stopped == "enough" and [s[0] for s in checkpoints.saved] == [2]  # a stop saves
  recorder = Recorder(RoundSchedule(num_rounds=9, privacy=_Ledger(allowed=2)))
  with recorder:
    assert not _record(recorder, 0) and _record(recorder, 1)
  stopped = recorder.progress.stopped
  assert stopped.startswith("privacy budget") and "stopped after 2 rounds" in stopped


def test_recorder_resumes_rewriting_the_metrics_file(tmp_path):
  (tmp_path / "m.jsonl").write_text('{"round": 0}\n{"round": 1}\n{"round": 2, "killed": true}\n')
  resumed = Progress(rounds_completed=2, history=[{"round": 0}, {"round": 1}],
                     cumulative={"broadcasted_bits": 5, "aggregated_bits": 7}, rejected_streak=1)
  with Recorder(RoundSchedule(num_rounds=3), metrics_path=tmp_path / "m.jsonl", resumed=resumed) as recorder:
    assert recorder.start_round == 2
    _record(recorder, 2, aggregated_bits=1)
  lines = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
  assert [r["round"] for r in lines] == [0, 1, 2] and lines[2]["cumulative_aggregated_bits"] == 8
  assert math.isnan(Recorder(RoundSchedule(num_rounds=3)).first_round_seconds)
  spent = Recorder(RoundSchedule(num_rounds=5, privacy=_Ledger(allowed=2)), resumed=Progress(rounds_completed=2))
  assert spent.progress.stopped.startswith("privacy budget")  # the checkpoint's run had spent its budget


def test_recorder_counts_rounds_that_trained_nothing():
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with pytest.raises(TrainingStalledError, match="round 3: .* Stopped after 2 such rounds"):
      with Recorder(RoundSchedule(num_rounds=9), max_rejected_rounds=2) as recorder:
        _record(recorder, 0, client_work={"num_non_finite_clients": 2})
        _record(recorder, 1)  # a round that trained: the streak starts again
        _record(recorder, 2, client_work={"num_non_finite_clients": 2})
        _record(recorder, 3, finalizer={"update_non_finite": 1})
  assert len([w for w in caught if "trained nothing" in str(w.message)]) == 2


def test_recorder_reports_a_failed_last_save_once():
  recorder = Recorder(RoundSchedule(num_rounds=2), checkpoints=_Checkpoints(fail_on_close=True))
  with pytest.raises(CheckpointSaveError, match="after 2 rounds"):
    with recorder:
      pass
  with pytest.warns(RuntimeWarning, match="after 2 rounds"), pytest.raises(TrainingStalledError):  # not hidden
    with Recorder(RoundSchedule(num_rounds=2), checkpoints=_Checkpoints(fail_on_close=True)):
      raise TrainingStalledError("the run's own failure comes first")


def test_recorder_saves_then_raises_on_a_signal():
  if threading.current_thread() is not threading.main_thread():
    pytest.skip("signal handlers can only be installed from the main thread")
  checkpoints = _Checkpoints()
  with pytest.raises(TrainingInterrupted, match="after 1 rounds; checkpoint saved in /ck"):
    with Recorder(RoundSchedule(num_rounds=9, checkpoint_every=5), checkpoints=checkpoints) as recorder:
      os.kill(os.getpid(), signal.SIGTERM)  # caught: the round ends, is saved, then the run stops
      _record(recorder, 0)
  assert [s[0] for s in checkpoints.saved] == [1]


# The per-round driver ----------------------------------------------------------------------------------------------


def _packed(round_num, cohort=(0, 1)):
  return PackedRound(round_data={"round": np.int32(round_num)}, num_real_clients=len(cohort),
                     cohort=np.asarray(cohort), num_examples=np.asarray([3] * len(cohort) + [0]))


def test_drive_rounds_overlaps_packing_and_keys_each_round():
  log = []

  def next_fn(state, round_data, rng, client_states=None):
    log.append(("round", int(round_data["round"]), jax.random.key_data(rng).tolist()))
    return RoundOutput(state + 1, {"client_work": {"loss": np.float32(state)}})

  def pack(round_num):
    log.append(("pack", round_num))
    return _packed(round_num)

  recorder = Recorder(RoundSchedule(num_rounds=3))
  with recorder:
    state = drive_rounds(next_fn, 0, recorder, pack, seed=5)
  assert state == 3 and [r["client_work/loss"] for r in recorder.progress.history] == [0, 1, 2]
  assert [entry[:2] for entry in log] == [("pack", 0), ("round", 0), ("pack", 1), ("round", 1), ("pack", 2),
                                          ("round", 2)]  # round r + 1 packed while round r runs
  keys = [entry[2] for entry in log if entry[0] == "round"]
  assert keys == [jax.random.key_data(jax.random.fold_in(jax.random.key(5), r)).tolist() for r in range(3)]


def test_run_round_gathers_before_and_scatters_after_the_round():
  store = ClientStateStore(np.zeros(2, np.float32), num_clients=4)
  store.load(np.arange(8, dtype=np.float32).reshape(4, 2))
  order = []

  def next_fn(state, round_data, rng, client_states=None):
    order.append("next")
    gathered = np.asarray(client_states)
    assert gathered.shape == (3, 2) and gathered[:2].tolist() == [[6, 7], [2, 3]]  # clients 3, 1 + a padding slot
    return RoundOutput(state, {}, gathered + 100)

  def host_work():
    order.append("host work")
    return "next round"

  state, metrics, done = run_round(next_fn, "state", _packed(0, cohort=(3, 1)), jax.random.key(0), store, host_work)
  assert (state, metrics, done) == ("state", {}, "next round") and order == ["next", "host work"]
  assert store.arrays.tolist() == [[0, 1], [102, 103], [4, 5], [106, 107]]  # real clients written back only


# The scanned driver ------------------------------------------------------------------------------------------------


def test_drive_scanned_rounds_cuts_dispatches_at_evaluations_and_checks_overflow():
  calls = []

  def scanned_rounds(state, first_round, scan_length, num_active):
    calls.append((first_round, scan_length, num_active))
    length = num_active or scan_length
    metrics = {"loss": np.arange(first_round, first_round + scan_length, dtype=np.float32)}
    return state + length, RoundsOutput(metrics, np.full(scan_length, 2), np.full(scan_length, 2))

  recorder = Recorder(RoundSchedule(num_rounds=5, evaluate_every=2))
  with recorder:
    state = drive_scanned_rounds(scanned_rounds, 0, recorder, rounds_per_dispatch=8, capacity=2)
  assert state == 5 and calls == [(0, 2, None), (2, 2, None), (4, 2, 1)]  # the last dispatch skips its end
  assert [r["loss"] for r in recorder.progress.history] == [0, 1, 2, 3, 4]
  assert [r["round_time_in_seconds"] > 0 for r in recorder.progress.history] == [True] * 5

  def overflowing(state, first_round, scan_length, num_active):
    return state, RoundsOutput({"loss": np.zeros(scan_length)}, np.full(scan_length, 2), np.full(scan_length, 3))

  with pytest.raises(RuntimeError, match="round 0 drew 3 clients, more than the 2 client slots"):
    with Recorder(RoundSchedule(num_rounds=2)) as recorder:
      drive_scanned_rounds(overflowing, 0, recorder, rounds_per_dispatch=2, capacity=2)
