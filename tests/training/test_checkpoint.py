"""Checkpoints and exact resume: a run killed (SIGKILL mid-run, SIGKILL mid-save, SIGTERM) and resumed ends
bit-identical to an uninterrupted run (parameters, metrics file, epsilon); a changed configuration is refused.

The CLI runs are tiny (digits, dense softmax model, 12 rounds of 10 Poisson-sampled clients, one local epoch, DP
with the PLD ledger: cheaper per round than RDP at this sampling rate). The uninterrupted run is made once per
module. Only wall-time fields (``*_time_in_seconds``) may differ between runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import dp_accounting
import jax
import numpy as np
import optax
import pytest

from fedjax_lite.algorithms import fed_avg
from fedjax_lite.core import ClientSpec
from fedjax_lite.training import checkpoint as ckpt
from fedjax_lite.training import cli
from fedjax_lite.training.loop import run_training
from fedjax_lite.privacy import PrivacyLedger, sampled_run_events

ROUNDS = 12
BASE = ["train", "--model", "dense", "--rounds", str(ROUNDS), "--clients-per-round", "10", "--local-epochs", "1",
        "--eval-every", "3", "--aggregator", "dp", "--dp-noise-multiplier", "0.8", "--dp-accountant", "pld",
        "--no-progress", "--json",
        # The killed subprocess uses this process's CPU device count (the client axis is split over the devices).
        "--cpu-devices", str(jax.local_device_count())]
if "log_format" in vars(cli.build_parser().parse_args(["train"])):
  BASE += ["--log-format", "jsonl"]  # no plot: faster
KILL_TIMEOUT_S = 120
SLOW_SAVE = os.path.join(os.path.dirname(__file__), "slow_save.py")  # the CLI with one save held open (test side)


def _records(output_dir):
  """The metrics file's records without the wall-time fields."""
  lines = open(os.path.join(output_dir, "metrics.jsonl")).read().splitlines()
  return [{k: v for k, v in json.loads(line).items() if not k.endswith("_time_in_seconds")} for line in lines]


def _final(output_dir, checkpoint_dir):
  arrays, meta = ckpt.read_checkpoint(checkpoint_dir)
  summary = json.load(open(os.path.join(output_dir, "summary.json")))
  return arrays["server_state"], _records(output_dir), summary, meta


def _run_in_process(output_dir, checkpoint_dir, *extra):
  return cli.main(BASE + ["--output-dir", str(output_dir), "--checkpoint-dir", str(checkpoint_dir), *extra])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  root = tmp_path_factory.mktemp("uninterrupted")
  assert _run_in_process(root / "out", root / "ck", "--checkpoint-every", "100") == 0  # saved at the end only
  return (*_final(root / "out", root / "ck"), str(root / "ck"))


def _assert_same_run(resumed, reference):
  params, records, summary, meta = resumed
  ref_params, ref_records, ref_summary, ref_meta = reference[:4]
  assert len(params) == len(ref_params)
  for leaf, ref_leaf in zip(params, ref_params):
    assert leaf.dtype == ref_leaf.dtype and leaf.shape == ref_leaf.shape
    assert leaf.tobytes() == ref_leaf.tobytes()  # bit for bit
  assert records == ref_records  # every metric of every round, exactly
  assert [r["round"] for r in records] == list(range(ROUNDS))
  assert summary["epsilon"] == ref_summary["epsilon"] and summary["epsilon"] > 0
  assert summary["final_test_accuracy"] == ref_summary["final_test_accuracy"]
  assert meta["privacy"] == ref_meta["privacy"]


def _start(output_dir, checkpoint_dir, every, delay):
  """The CLI in a subprocess whose save after ``delay = 'ROUNDS:SECONDS'`` is held open (``slow_save.py``)."""
  rounds, seconds = delay.split(":")
  argv = [sys.executable, SLOW_SAVE, rounds, seconds, *BASE, "--output-dir", str(output_dir),
          "--checkpoint-dir", str(checkpoint_dir), "--checkpoint-every", str(every)]
  return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for(process, condition, what):
  deadline = time.monotonic() + KILL_TIMEOUT_S
  while not condition():
    if process.poll() is not None:
      raise AssertionError(f"the run ended (code {process.returncode}) before {what}: "
                           f"{process.stderr.read().decode()[-2000:]}")
    if time.monotonic() > deadline:
      process.kill()
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(0.05)


def _complete_steps(checkpoint_dir):
  return sorted(int(name) for name in os.listdir(checkpoint_dir) if name.isdigit()) if os.path.isdir(
      checkpoint_dir) else []


def test_sigkill_mid_run_then_resume_is_bit_identical(tmp_path, uninterrupted):
  out, ck = tmp_path / "out", tmp_path / "ck"
  # The save after 10 rounds hangs (held open by slow_save.py), so the run is certainly still going when we kill it.
  process = _start(out, ck, every=2, delay="10:120")
  _wait_for(process, lambda: any(step >= 4 for step in _complete_steps(ck)), "the checkpoint after 4 rounds")
  process.send_signal(signal.SIGKILL)
  assert process.wait() == -signal.SIGKILL
  assert max(_complete_steps(ck)) < ROUNDS
  assert _run_in_process(out, ck, "--checkpoint-every", "2", "--resume") == 0
  _assert_same_run(_final(out, ck), uninterrupted)


def test_sigkill_mid_save_leaves_no_valid_checkpoint_and_resume_is_bit_identical(tmp_path, uninterrupted):
  out, ck = tmp_path / "out", tmp_path / "ck"
  process = _start(out, ck, every=3, delay="6:120")  # the save after 6 rounds sleeps before writing its meta
  metrics = out / "metrics.jsonl"
  # Saves are asynchronous: training goes on to round 9, whose save then waits for the hung one.
  _wait_for(process, lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 9,
            "9 rounds in the metrics file")
  process.send_signal(signal.SIGKILL)
  assert process.wait() == -signal.SIGKILL
  unfinished = [name for name in os.listdir(ck) if name.startswith("6.") and "tmp" in name]
  assert unfinished, os.listdir(ck)  # the killed save's temporary directory...
  assert _complete_steps(ck) == [3]  # ...is not a checkpoint
  with pytest.warns(RuntimeWarning, match=f"took over the lock left by PID {process.pid} .* no longer running"):
    checkpointer = ckpt.RunCheckpointer(ck)  # the killed run's lock is stale
  assert checkpointer.steps() == [3]
  checkpointer.close()
  assert _run_in_process(out, ck, "--checkpoint-every", "3", "--resume") == 0
  _assert_same_run(_final(out, ck), uninterrupted)


@pytest.mark.parametrize("change, flag", [(["--client-lr", "0.2"], "--client-lr"), (["--seed", "1"], "--seed"),
                                          (["--dp-noise-multiplier", "0.7"], "--dp-noise-multiplier")])
def test_resume_with_a_changed_configuration_is_refused(tmp_path, uninterrupted, capsys, change, flag):
  checkpoint_dir = uninterrupted[-1]  # refusing writes nothing
  code = cli.main(BASE + change + ["--output-dir", str(tmp_path), "--checkpoint-dir", checkpoint_dir, "--resume"])
  assert code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "cannot resume" in err and flag in err, err
  # Without --resume an occupied checkpoint directory is refused too.
  assert cli.main(BASE + ["--output-dir", str(tmp_path), "--checkpoint-dir", checkpoint_dir]) == 2
  assert "--resume" in capsys.readouterr().err


# The loop: signals, the ledger, extra state ---------------------------------------------------------------------


def _loop_setup(tiny_model):
  process = fed_avg(tiny_model, client_learning_rate=0.1, server_optimizer=optax.sgd(1.0))
  return process, ClientSpec(batch_size=4)


def test_sigterm_saves_the_round_and_resume_matches(tmp_path, tiny_model, tiny_params, population):
  process, spec = _loop_setup(tiny_model)
  common = dict(client_spec=spec, clients_per_round=3, num_rounds=5, progress=False)
  reference = run_training(process, population, tiny_params, **common)

  def terminate_at_round_1(round_num, record):
    if round_num == 1:
      os.kill(os.getpid(), signal.SIGTERM)

  if threading.current_thread() is not threading.main_thread():
    pytest.skip("signal handlers can only be installed from the main thread")
  handler_before = signal.getsignal(signal.SIGTERM)
  with pytest.raises(ckpt.TrainingInterrupted) as interrupted:
    run_training(process, population, tiny_params, checkpoint_dir=tmp_path, checkpoint_every=10,
                 on_round_end=terminate_at_round_1, **common)
  assert interrupted.value.rounds_completed == 2 and interrupted.value.signum == signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) is handler_before  # handlers restored
  resumed = run_training(process, population, tiny_params, checkpoint_dir=tmp_path, resume=True, **common)
  for leaf, ref_leaf in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(reference.state)):
    assert np.asarray(leaf).tobytes() == np.asarray(ref_leaf).tobytes()
  strip = lambda history: [{k: v for k, v in r.items() if not k.endswith("_time_in_seconds")} for r in history]
  assert strip(resumed.history) == strip(reference.history)


def _ledger(noise_multiplier, budget):
  run = sampled_run_events(dp_accounting.GaussianDpEvent(noise_multiplier), sampling="all")  # fast RDP
  return PrivacyLedger(run, 1e-3, "rdp", budget)


def test_ledger_resumes_with_its_spent_budget(tmp_path, tiny_model, tiny_params, population):
  process, spec = _loop_setup(tiny_model)
  common = dict(client_spec=spec, clients_per_round=3, num_rounds=6, progress=False)
  reference = run_training(process, population, tiny_params, privacy=_ledger(2.0, None), **common)
  budget = reference.history[2]["privacy/epsilon"]  # stops after 3 rounds
  first = run_training(process, population, tiny_params, privacy=_ledger(2.0, budget), checkpoint_dir=tmp_path,
                       **common)
  assert len(first.history) == 3 and first.stopped_early.startswith("privacy budget")
  # Resuming with the same budget stops at once; a larger budget continues from the spent epsilon.
  again = run_training(process, population, tiny_params, privacy=_ledger(2.0, budget), checkpoint_dir=tmp_path,
                       resume=True, **common)
  assert len(again.history) == 3 and again.stopped_early.startswith("privacy budget")
  resumed = run_training(process, population, tiny_params, privacy=_ledger(2.0, None), checkpoint_dir=tmp_path,
                         resume=True, **common)
  epsilons = [r["privacy/epsilon"] for r in resumed.history]
  assert epsilons == [r["privacy/epsilon"] for r in reference.history]
  assert all(later > earlier for earlier, later in zip(epsilons, epsilons[1:]))
  # A ledger with other noise would report a different spent budget: refused.
  with pytest.raises(ckpt.ConfigMismatchError, match="privacy|epsilon"):
    run_training(process, population, tiny_params, privacy=_ledger(3.0, None), checkpoint_dir=tmp_path,
                 resume=True, **common)


def test_extra_state_is_saved_and_restored_in_place(tmp_path, tiny_model, tiny_params, population):
  process, spec = _loop_setup(tiny_model)
  store = {"control": np.zeros((population.num_clients, 3), np.float32)}

  def bump(round_num, record):
    store["control"][round_num % population.num_clients] += round_num + 1

  common = dict(client_spec=spec, clients_per_round=3, num_rounds=4, progress=False, extra_state={"client_states":
                                                                                                      store})
  run_training(process, population, tiny_params, checkpoint_dir=tmp_path, checkpoint_every=2, on_round_end=bump,
               **{**common, "num_rounds": 2})
  saved = store["control"].copy()
  store["control"][...] = -1.0  # what a killed process would have lost
  original = store["control"]
  run_training(process, population, tiny_params, checkpoint_dir=tmp_path, resume=True, **{**common,
                                                                                          "num_rounds": 2})
  assert store["control"] is original and np.array_equal(original, saved)
  with pytest.raises(TypeError, match="extra_state"):
    run_training(process, population, tiny_params, extra_state={"x": {"a": jax.numpy.zeros(2)}}, **common)


def test_a_damaged_checkpoint_is_set_aside_for_the_previous_one(tmp_path):
  checkpointer = ckpt.RunCheckpointer(tmp_path, async_save=False)
  template = {"w": np.zeros(3, np.float32), "n": np.int32(0)}
  for step in (1, 2):
    checkpointer.save(step, {"server_state": {"w": np.full(3, step, np.float32), "n": np.int32(step)}},
                      {"history": []})
  checkpointer.wait()
  meta_path = tmp_path / "2" / "meta" / "metadata"
  meta = json.loads(meta_path.read_text())
  meta["trees"]["server_state"]["sha256"] = "0" * 64  # bytes that no longer match their record
  meta_path.write_text(json.dumps(meta))
  with pytest.warns(RuntimeWarning, match="unreadable .*SHA-256.*set aside"):
    restored = checkpointer.restore_latest({"server_state": template})
  checkpointer.close()
  assert sorted(os.listdir(tmp_path)) == ["1", "2.unreadable"]  # set aside, not deleted; the lock released
  assert restored.rounds_completed == 1
  assert restored.trees["server_state"]["w"].tolist() == [1.0, 1.0, 1.0]
  assert restored.trees["server_state"]["n"] == 1 and isinstance(restored.trees["server_state"]["n"], np.int32)


def test_config_differences_name_each_key():
  assert ckpt.config_differences({"a": 1, "b": [1, 2]}, {"a": 1, "b": (1, 2)}) == []
  differences = ckpt.config_differences({"--model": "mlp", "x": 1}, {"--model": "dense"})
  assert differences == ['--model: "mlp" in the checkpoint, "dense" now', 'x: 1 in the checkpoint, "<absent>" now']


def test_bad_checkpoint_arguments(tmp_path, tiny_model, tiny_params, population):
  process, spec = _loop_setup(tiny_model)
  common = dict(client_spec=spec, clients_per_round=3, num_rounds=1, progress=False)
  with pytest.raises(ValueError, match="checkpoint_every"):
    run_training(process, population, tiny_params, checkpoint_dir=tmp_path, checkpoint_every=0, **common)
  with pytest.raises(ValueError, match="resume=True needs a checkpoint_dir"):
    run_training(process, population, tiny_params, resume=True, **common)
  (tmp_path / "file").write_text("x")
  with pytest.raises(NotADirectoryError, match="is a file"):
    run_training(process, population, tiny_params, checkpoint_dir=tmp_path / "file", **common)


@pytest.mark.parametrize("error, code, fragment", [
    (ckpt.TrainingInterrupted(signal.SIGTERM, 4, "/ck"), 128 + signal.SIGTERM, "after 4 rounds; checkpoint saved in "
                                                                                "/ck; continue with --resume"),
    (ckpt.TrainingInterrupted(signal.SIGINT, 2, "/ck"), 128 + signal.SIGINT, "continue with --resume"),
])
def test_cli_reports_an_interrupted_run_in_one_line(monkeypatch, capsys, tmp_path, error, code, fragment):
  from fedjax_lite.training import loop

  def interrupted(*args, **kwargs):
    raise error

  monkeypatch.setattr(loop, "run_training", interrupted)
  assert cli.main(["train", "--model", "dense", "--output-dir", str(tmp_path), "--checkpoint-dir",
                   str(tmp_path / "ck")]) == code
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and fragment in err, err


def test_cli_reports_a_stalled_run_in_one_line(monkeypatch, capsys, tmp_path):
  from fedjax_lite.training import loop

  def stalled(*args, **kwargs):
    raise loop.TrainingStalledError("round 2: every client's update was rejected")

  monkeypatch.setattr(loop, "run_training", stalled)
  assert cli.main(["train", "--model", "dense", "--output-dir", str(tmp_path)]) == 1
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "every client's update was rejected" in err
