"""``fedjax-lite train --algorithm fedbuff``: FedBuff from the command line with its knobs (server steps in place of
rounds, on simulated log-normal client systems), its csv/TensorBoard logs, checkpoints (a run stopped half way, or
SIGKILLed in a subprocess, and resumed with ``--resume`` writes the records and params of a straight run), availability
windows from a trace, and DP (epsilon per server step against dp_accounting); its knobs elsewhere and what it
does not support are refused with one line and exit code 2."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import dp_accounting
import jax
import numpy as np
import pytest

from fedjax_lite.training import cli, read_checkpoint
from tests.training.test_checkpoint import SLOW_SAVE
from tests.training.test_cli_algorithms import TINY


def test_fed_buff_trains_from_the_command_line(tmp_path, capsys):
  code = cli.main(TINY + ["--algorithm", "fedbuff", "--output-dir", str(tmp_path), "--fedbuff-concurrency", "4",
                          "--fedbuff-buffer-size", "2", "--fedbuff-max-staleness", "3", "--systems", "lognormal",
                          "--dropout", "0.3"])
  assert code == 0, capsys.readouterr().err
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["algorithm"] == "fedbuff" and summary["rounds"] == 2
  assert (summary["clients_per_round"], summary["fedbuff_concurrency"], summary["fedbuff_max_staleness"]) == (2, 4, 3)
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [record["round"] for record in records] == [0, 1]
  assert all(record["fedbuff/num_applied"] == 2 and record["client_work/train/num_examples"] > 0
             for record in records)
  assert records[-1]["fedbuff/elapsed_seconds"] > 0 and "evaluation/accuracy" in records[-1]
  assert all("fedbuff/dropped_offline" in record for record in records)  # --dropout reaches the event order


@pytest.mark.parametrize("flags, named", [
    (["--algorithm", "fedavg", "--fedbuff-buffer-size", "2"], "--fedbuff-buffer-size"),
    (["--algorithm", "fedprox", "--fedbuff-concurrency", "2"], "--fedbuff-concurrency"),
    (["--algorithm", "fedbuff", "--rounds-per-dispatch", "2"], "--rounds-per-dispatch is not supported"),
    (["--algorithm", "fedbuff", "--fedbuff-concurrency", "5"], "(5 + 3 - 1) exceeds the 6 clients"),
    (["--algorithm", "fedbuff", "--systems", "lognormal", "--deadline", "5"], "--deadline shapes synchronous rounds"),
])
def test_fed_buff_flags_refused(flags, named, tmp_path, capsys):
  flags = [flag.replace("{tmp}", str(tmp_path)) for flag in flags]
  code = cli.main(TINY + ["--output-dir", str(tmp_path / "out")] + flags)
  assert code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and named in err[0], err


def test_fed_buff_checkpoints_resume_and_csv_logs(tmp_path, capsys):
  """``--rounds 4`` straight, against ``--rounds 2`` with a checkpoint then ``--rounds 4 --resume`` (its own
  output folder): the same records (wall times aside) and the same final checkpointed params; csv and TensorBoard
  logs are written as for the synchronous algorithms."""
  fedbuff = ["--algorithm", "fedbuff", "--fedbuff-concurrency", "3", "--fedbuff-buffer-size", "2", "--systems",
             "lognormal", "--dropout", "0.2", "--checkpoint-every", "2", "--eval-every", "1",
             "--log-format", "jsonl,csv,tensorboard"]

  def train(name, rounds, *extra):
    flags = TINY + fedbuff + ["--output-dir", str(tmp_path / name), "--checkpoint-dir", str(tmp_path / f"{name}-ckpt"),
                              "--rounds", str(rounds), *extra]
    code = cli.main(flags)
    assert code == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

  def records(name):
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("time_in_seconds")} for line in lines]

  straight = train("straight", 4)
  train("run", 2)
  (tmp_path / "run" / "metrics.jsonl").unlink()
  resumed = train("run", 4, "--resume")
  assert straight["rounds"] == resumed["rounds"] == 4 and straight["csv_file"] and straight["tensorboard_dir"]
  assert records("run") == records("straight")
  with open(tmp_path / "run" / "metrics.csv") as source:
    assert [int(row["round"]) for row in csv.DictReader(source)] == [0, 1, 2, 3]
  assert any((tmp_path / "run" / "tensorboard").iterdir())
  (straight_arrays, straight_meta), (run_arrays, run_meta) = (read_checkpoint(tmp_path / f"{name}-ckpt")
                                                              for name in ("straight", "run"))
  assert straight_meta["next_round"] == run_meta["next_round"] == 4
  assert straight_arrays.keys() == run_arrays.keys()
  for name in straight_arrays:
    for a, b in zip(straight_arrays[name], run_arrays[name], strict=True):
      np.testing.assert_array_equal(a, b)


def test_fed_buff_on_a_trace_with_availability_windows(tmp_path, capsys):
  """A trace's on/off windows reach FedBuff's event order: clients start only while online and a closing window
  aborts a task (``fedbuff/dropped_offline``)."""
  trace = tmp_path / "trace.csv"
  windows = ["0-1e9", "0-1e9", "0-1e9", "0-0.05;1-1e9", "0.5-1e9", "0-0.01;2-1e9"]
  trace.write_text("client_id,seconds_per_example,download_bits_per_second,upload_bits_per_second,availability\n"
                   + "\n".join(f"client_{i},0.01,5000000,,{w}" for i, w in enumerate(windows)) + "\n")
  code = cli.main(TINY + ["--algorithm", "fedbuff", "--output-dir", str(tmp_path / "run"), "--systems", str(trace),
                          "--fedbuff-concurrency", "4", "--fedbuff-buffer-size", "2", "--rounds", "4"])
  assert code == 0, capsys.readouterr().err
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["rounds"] == 4 and summary["simulated_hours"] > 0 and summary["dropped_offline"] > 0
  records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert all("fedbuff/idle_places" in record for record in records)


def test_fed_buff_with_dp_reports_the_unamplified_epsilon(tmp_path, capsys):
  """``--aggregator dp`` with FedBuff: the Gaussian mechanism over each buffer, epsilon per server step from one
  unamplified event per step (dp_accounting composed by hand), the budget stopping the run."""
  flags = TINY + ["--algorithm", "fedbuff", "--output-dir", str(tmp_path / "run"), "--fedbuff-concurrency", "3",
                  "--fedbuff-buffer-size", "2", "--aggregator", "dp", "--dp-clip", "0.5", "--dp-noise-multiplier",
                  "1.5", "--dp-delta", "1e-4", "--rounds", "3"]
  code = cli.main(flags)
  assert code == 0, capsys.readouterr().err
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  for steps, record in enumerate(records, start=1):
    expected = dp_accounting.rdp.RdpAccountant().compose(
        dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(1.5), steps)).get_epsilon(1e-4)
    assert record["privacy/epsilon"] == pytest.approx(expected, rel=1e-12)
  assert summary["epsilon"] == records[-1]["privacy/epsilon"] and summary["delta"] == 1e-4
  code = cli.main(flags[:-2] + ["--rounds", "3", "--dp-epsilon-budget", str(records[1]["privacy/epsilon"] * 1.01),
                                "--output-dir", str(tmp_path / "budget")])
  assert code == 0, capsys.readouterr().err
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["rounds"] == 2 and summary["stopped_early"].startswith("privacy budget")
  code = cli.main(flags + ["--dp-strategy", "tree"])
  assert code == 2 and "--dp-strategy gaussian" in capsys.readouterr().err


def test_a_killed_fed_buff_run_resumes_bit_identically(tmp_path, capsys):
  """``--algorithm fedbuff`` in a subprocess, SIGKILLed after its checkpoint after 2 server steps (its save after 4
  held open, so it is certainly still running), then ``--resume`` in this process: the records, the checkpointed
  state (params, momentum, the ring of versions) and the summary of an uninterrupted run."""
  fedbuff = TINY + ["--algorithm", "fedbuff", "--fedbuff-concurrency", "3", "--fedbuff-buffer-size", "2",
                    "--systems", "lognormal", "--dropout", "0.2", "--server-optimizer", "sgdm", "--rounds", "6",
                    "--checkpoint-every", "2",
                    # The killed subprocess uses this process's CPU device count (recorded in the configuration).
                    "--cpu-devices", str(jax.local_device_count())]

  def run_here(name, *extra):
    code = cli.main(fedbuff + ["--output-dir", str(tmp_path / name), "--checkpoint-dir",
                               str(tmp_path / f"{name}-ckpt"), *extra])
    assert code == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

  def records(name):
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("time_in_seconds")} for line in lines]

  straight = run_here("straight")
  checkpoints = tmp_path / "killed-ckpt"
  process = subprocess.Popen(
      [sys.executable, SLOW_SAVE, "4", "120", *fedbuff, "--output-dir", str(tmp_path / "killed"), "--checkpoint-dir",
       str(checkpoints)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.monotonic() + 120
  while not (checkpoints.is_dir() and "2" in os.listdir(checkpoints)):
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    assert time.monotonic() < deadline, "timed out waiting for the checkpoint after 2 server steps"
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  assert process.wait() == -signal.SIGKILL
  resumed = run_here("killed", "--resume")  # (takes over the killed run's stale lock)
  assert records("killed") == records("straight") and [r["round"] for r in records("killed")] == list(range(6))
  assert resumed["final_test_accuracy"] == straight["final_test_accuracy"]
  (saved, saved_meta), (reference, reference_meta) = (read_checkpoint(tmp_path / f"{name}-ckpt")
                                                      for name in ("killed", "straight"))
  assert saved_meta["next_round"] == reference_meta["next_round"] == 6
  for name in reference:
    for leaf, ref_leaf in zip(saved[name], reference[name], strict=True):
      assert leaf.tobytes() == ref_leaf.tobytes()
