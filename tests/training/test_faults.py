"""Faults of the environment around a run's checkpoints, met as a user's machine meets them (``faults.py``): a
read-only folder, a full disk, damaged steps, a second writer, an unwritable output folder, a folder of another
algorithm. Each asserts the exit code, the ONE line on stderr, and that the previous checkpoint and the metrics are
intact (and, where the run goes on, that it ends bit-identical to an uninterrupted one).

The runs are the CLI in this process (digits, the dense softmax model, 3 rounds of 3 clients, one local epoch); the
uninterrupted reference run is made once per module, with a checkpoint after every round.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from fedjax_lite.training import checkpoint as ckpt
from fedjax_lite.training import cli, loop
from fedjax_lite.training.folder_lock import LOCK_FILE
from tests.training.faults import FullDisk, read_only

ROUNDS = 3
BASE = ["train", "--model", "dense", "--rounds", str(ROUNDS), "--clients-per-round", "3", "--local-epochs", "1",
        "--eval-every", "3", "--no-progress", "--json", "--log-format", "jsonl",
        "--cpu-devices", str(jax.local_device_count())]


def _cli(output_dir, checkpoint_dir, *extra):
  return cli.main(BASE + ["--output-dir", str(output_dir), "--checkpoint-dir", str(checkpoint_dir),
                          "--checkpoint-every", "1", *extra])


def _records(output_dir):
  """The metrics file's records without the wall-time fields."""
  lines = open(os.path.join(output_dir, "metrics.jsonl")).read().splitlines()
  return [{k: v for k, v in json.loads(line).items() if not k.endswith("_time_in_seconds")} for line in lines]


def _params(checkpoint_dir, rounds=None):
  arrays, _ = ckpt.read_checkpoint(checkpoint_dir, rounds)
  return [array.tobytes() for array in arrays["server_state"]]


def _snapshot(folder):
  """Every file under ``folder`` with its bytes: 'intact' means equal snapshots."""
  files = {}
  for root, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(root, name)
      files[os.path.relpath(path, folder)] = open(path, "rb").read()
  return files


def _one_line(capfd) -> str:
  err = capfd.readouterr().err.strip()
  assert len(err.splitlines()) == 1, err
  return err


def _steps(checkpoint_dir):
  return sorted(int(name) for name in os.listdir(checkpoint_dir) if name.isdigit())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted run: its folder (steps 1, 2, 3), final parameters and metrics."""
  root = tmp_path_factory.mktemp("reference")
  assert _cli(root / "out", root / "ck") == 0
  return {"ck": str(root / "ck"), "params": _params(root / "ck"), "records": _records(root / "out")}


def _previous_run(reference, destination, *, rounds=2):
  """A copy of the reference folder as a run stopped after ``rounds`` rounds would have left it."""
  shutil.copytree(reference["ck"], destination, ignore=shutil.ignore_patterns(LOCK_FILE))
  for step in _steps(destination):
    if step > rounds:
      shutil.rmtree(os.path.join(destination, str(step)))
  return str(destination)


def _orbax_threads():
  return [thread for thread in threading.enumerate() if not thread.daemon and thread is not threading.main_thread()]


# Read-only checkpoint folder ------------------------------------------------------------------------------------


def test_a_read_only_checkpoint_folder_is_refused_before_training(tmp_path, monkeypatch, capfd):
  (tmp_path / "ck").mkdir()
  with read_only(tmp_path / "ck", monkeypatch):
    code = _cli(tmp_path / "out", tmp_path / "ck")
  assert code == 2
  line = _one_line(capfd)
  assert str(tmp_path / "ck") in line and "not writable" in line, line
  assert os.listdir(tmp_path / "ck") == []
  assert not (tmp_path / "out" / "metrics.jsonl").exists()  # refused before any training


def test_resuming_in_a_read_only_folder_is_refused_and_touches_nothing(tmp_path, reference, monkeypatch, capfd):
  ck = _previous_run(reference, tmp_path / "ck")
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "metrics.jsonl").write_text("the previous run's records\n")
  before = _snapshot(ck)
  with read_only(ck, monkeypatch):
    start = time.monotonic()
    code = _cli(tmp_path / "out", ck, "--resume")
    seconds = time.monotonic() - start
  assert code == 2 and seconds < 60
  line = _one_line(capfd)
  assert ck in line and "not writable" in line, line
  assert _snapshot(ck) == before
  assert (tmp_path / "out" / "metrics.jsonl").read_text() == "the previous run's records\n"


def test_a_folder_made_read_only_mid_run_stops_it_at_once(tmp_path, reference, monkeypatch, capfd):
  """Before: orbax's background save failed in its thread and the CLI sat idle for good (threads waiting for a
  folder that was never created). Now: exit 1 at once, one line; the rounds run are in the metrics file."""
  ck = tmp_path / "ck"
  save = ckpt.RunCheckpointer.save
  faults = []

  def save_then_lock_the_folder(self, rounds_completed, trees, meta):
    if rounds_completed == 2:
      self.wait()  # the checkpoint after 1 round is complete: it must stay so
      faults.append(read_only(ck, monkeypatch))
      faults[-1].__enter__()
    return save(self, rounds_completed, trees, meta)

  monkeypatch.setattr(ckpt.RunCheckpointer, "save", save_then_lock_the_folder)
  threads_before = _orbax_threads()
  try:
    start = time.monotonic()
    code = _cli(tmp_path / "out", ck)
    seconds = time.monotonic() - start
    # Nothing left waiting: a thread the run started may still be finishing (an executor's worker exits after its
    # queue is closed), so each new one gets until a deadline to end; one waiting for the folder never would.
    deadline = time.monotonic() + 30
    started = [thread for thread in _orbax_threads() if thread not in threads_before]
    for thread in started:
      thread.join(timeout=max(0.0, deadline - time.monotonic()))
    assert [thread for thread in started if thread.is_alive()] == []
  finally:
    for fault in faults:
      fault.__exit__(None, None, None)
  assert code == 1 and seconds < 120
  line = _one_line(capfd)
  assert "could not write the checkpoint after 2 rounds" in line and str(ck) in line, line
  assert "after 1 rounds) is intact" in line and "--resume" in line, line
  assert _steps(ck) == [1] and not glob.glob(str(ck / "*tmp*"))
  assert _params(ck) == _params(reference["ck"], 1)
  assert _records(tmp_path / "out") == reference["records"][:2]  # the rounds run stay on disk


# Full disk --------------------------------------------------------------------------------------------------------


def test_a_full_disk_keeps_the_previous_checkpoint_and_the_run_resumes(tmp_path, reference, monkeypatch, capfd):
  disk = FullDisk(tmp_path / "disk", monkeypatch)
  try:
    ck = _previous_run(reference, os.path.join(disk.path, "ck"), rounds=1)
    save = ckpt.RunCheckpointer.save

    def fill_then_save(self, rounds_completed, trees, meta):
      if rounds_completed == 3:
        self.wait()  # the checkpoint after 2 rounds is complete
        disk.fill()
      return save(self, rounds_completed, trees, meta)

    monkeypatch.setattr(ckpt.RunCheckpointer, "save", fill_then_save)
    assert _cli(tmp_path / "out", ck, "--resume") == 1
    line = _one_line(capfd)
    assert "could not write the checkpoint after 3 rounds" in line and "No space left on device" in line, line
    assert "after 2 rounds) is intact" in line, line
    assert _steps(ck) == [1, 2] and not glob.glob(os.path.join(ck, "*tmp*")), os.listdir(ck)  # partial step removed
    assert _records(tmp_path / "out") == reference["records"]  # every round run is on disk
    monkeypatch.setattr(ckpt.RunCheckpointer, "save", save)
    disk.free()
    assert _cli(tmp_path / "out", ck, "--resume") == 0
    assert _params(ck) == reference["params"] and _records(tmp_path / "out") == reference["records"]
  finally:
    disk.close()


# Damaged steps ----------------------------------------------------------------------------------------------------


def _largest_data_file(step):
  return max(glob.glob(os.path.join(step, "server_state", "**", "d", "*"), recursive=True), key=os.path.getsize)


def _flip_bytes(step):
  path = _largest_data_file(step)
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0xFF
  open(path, "wb").write(bytes(data))


def _truncate_data(step):
  path = _largest_data_file(step)
  os.truncate(path, os.path.getsize(path) // 2)


def _truncate_meta(step):
  path = os.path.join(step, "meta", "metadata")
  os.truncate(path, os.path.getsize(path) // 2)


def _empty_folder(step):
  shutil.rmtree(step)
  os.mkdir(step)


@pytest.mark.parametrize("damage", [_flip_bytes, _truncate_data, _truncate_meta, _empty_folder],
                         ids=["flipped-bytes", "truncated-data", "truncated-meta", "empty-step"])
def test_an_unreadable_step_is_set_aside_for_the_newest_readable_one(tmp_path, damage):
  """Before: only the SHA-256 mismatch was caught; a truncated data file (OUT_OF_RANGE), a truncated meta
  (JSONDecodeError) and an empty step folder (KeyError 'meta') crashed every resume."""
  checkpointer = ckpt.RunCheckpointer(tmp_path, async_save=False)
  # 4 KB of noise: the array's own data file is the step's largest (small arrays are inlined in orbax's b-tree).
  weights = {step: np.random.default_rng(step).normal(size=1000).astype(np.float32) for step in (1, 2)}
  for step in (1, 2):
    checkpointer.save(step, {"server_state": {"w": weights[step]}}, {"history": []})
  damage(str(tmp_path / "2"))
  damaged = _snapshot(tmp_path / "2")
  with pytest.warns(RuntimeWarning) as warned:
    restored = checkpointer.restore_latest({"server_state": {"w": np.zeros(1000, np.float32)}})
  assert len(warned) == 1
  assert f"checkpoint {tmp_path}/2 is unreadable" in str(warned[0].message)
  assert f"set aside as {tmp_path}/2.unreadable" in str(warned[0].message)
  assert restored.rounds_completed == 1
  assert restored.trees["server_state"]["w"].tobytes() == weights[1].tobytes()
  assert _snapshot(tmp_path / "2.unreadable") == damaged  # renamed, not deleted
  checkpointer.save(2, {"server_state": {"w": weights[2]}}, {"history": []})  # its step is free again
  checkpointer.close()
  assert sorted(os.listdir(tmp_path)) == ["1", "2", "2.unreadable"]


def test_a_run_whose_latest_step_is_damaged_resumes_and_completes(tmp_path, reference, capfd):
  """Before: the step recomputed after the fallback could not be saved (StepAlreadyExistsError), and every later
  --resume crashed the same way."""
  ck = _previous_run(reference, tmp_path / "ck", rounds=3)
  _flip_bytes(os.path.join(ck, "3"))
  assert _cli(tmp_path / "out", ck, "--resume") == 0
  line = _one_line(capfd)
  assert f"checkpoint {ck}/3 is unreadable" in line and f"set aside as {ck}/3.unreadable" in line, line
  assert _params(ck) == reference["params"]  # round 3 recomputed from step 2: bit for bit
  assert _records(tmp_path / "out") == reference["records"]
  assert _cli(tmp_path / "out", ck, "--resume") == 0  # and again: nothing left to do
  assert capfd.readouterr().err == ""


# Two writers ------------------------------------------------------------------------------------------------------


def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(tmp_path, reference, capfd):
  ck = _previous_run(reference, tmp_path / "ck")
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time\nfrom fedjax_lite.training.checkpoint import RunCheckpointer\n"
       "RunCheckpointer(sys.argv[1])\nprint('locked', flush=True)\ntime.sleep(600)", ck],
      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    before = _snapshot(ck)
    assert _cli(tmp_path / "out", ck, "--resume") == 2
    line = _one_line(capfd)
    assert f"PID {holder.pid} on host {socket.gethostname()}" in line and "in use by another run" in line, line
    assert _snapshot(ck) == before
  finally:
    holder.kill()
    holder.wait()
  assert _cli(tmp_path / "out", ck, "--resume") == 0  # its lock is stale now
  line = _one_line(capfd)
  assert f"took over the lock left by PID {holder.pid}" in line and "no longer running" in line, line
  assert _params(ck) == reference["params"] and _records(tmp_path / "out") == reference["records"]
  assert LOCK_FILE not in os.listdir(ck)  # released at the end


# Unwritable output folder -----------------------------------------------------------------------------------------


def test_an_unwritable_output_folder_is_one_line_before_any_training(tmp_path, monkeypatch, capfd):
  calls = []
  monkeypatch.setattr(loop, "run_training", lambda *args, **kwargs: calls.append(1))
  (tmp_path / "out").mkdir()
  with read_only(tmp_path / "out", monkeypatch):
    code = cli.main(BASE + ["--output-dir", str(tmp_path / "out")])
  assert code == 2 and calls == []
  line = _one_line(capfd)
  assert f"--output-dir {tmp_path / 'out'} is not writable" in line, line
  assert os.listdir(tmp_path / "out") == []


# A folder of another algorithm ------------------------------------------------------------------------------------


def test_resuming_another_algorithms_folder_names_both_algorithms(tmp_path, capfd):
  short = ["--rounds", "1"]
  assert _cli(tmp_path / "out", tmp_path / "ck", "--algorithm", "scaffold", *short) == 0
  capfd.readouterr()
  before = _snapshot(tmp_path / "ck")
  assert _cli(tmp_path / "out", tmp_path / "ck", "--algorithm", "fedavg", "--resume", *short) == 2
  line = _one_line(capfd)
  assert '--algorithm: "scaffold" in the checkpoint, "fedavg" now' in line, line
  assert "PyTreeDef" not in line
  assert _snapshot(tmp_path / "ck") == before


def test_a_checkpoint_of_another_structure_is_named_by_its_paths(tmp_path):
  """Without the CLI's flags (the library alone): the message names the arrays only one side has."""
  checkpointer = ckpt.RunCheckpointer(tmp_path, async_save=False)
  state = {"params": np.zeros(2, np.float32), "control_variate": np.zeros(2, np.float32)}
  checkpointer.save(1, {"server_state": state}, {"history": []})
  with pytest.raises(ckpt.CheckpointError, match=r"different 'server_state' than this run \(2 arrays there, 1 here; "
                                                 r"only there: \['control_variate'\]\): it was written by another "
                                                 r"algorithm or model") as refused:
    checkpointer.restore_latest({"server_state": {"params": np.zeros(2, np.float32)}})
  checkpointer.close()
  assert "PyTreeDef" not in str(refused.value)
  assert os.listdir(tmp_path) == ["1"]  # refused, not set aside
