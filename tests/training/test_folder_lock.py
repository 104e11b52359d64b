"""The checkpoint folder's lock: one writer, stale locks taken over, other hosts respected, never another's removed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from fedjax_lite.training import checkpoint as ckpt
from fedjax_lite.training.folder_lock import (LOCK_FILE, FolderLock, FolderLockedError, FolderNotWritableError,
                                              _process_start)
from tests.training.faults import read_only


def _dead_pid() -> int:
  process = subprocess.Popen([sys.executable, "-c", "pass"])
  process.wait()
  return process.pid


def _write_lock(folder, **owner):
  (folder / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "since": "then", **owner}))


def test_one_writer_at_a_time_and_release_removes_the_file(tmp_path):
  lock = FolderLock.acquire(str(tmp_path))
  assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
  with pytest.raises(FolderLockedError, match=f"in use by another run: PID {os.getpid()} on host"):
    FolderLock.acquire(str(tmp_path))  # a second writer in this very process
  lock.release()
  assert not (tmp_path / LOCK_FILE).exists()
  FolderLock.acquire(str(tmp_path)).release()


def test_a_checkpointer_holds_the_lock_until_closed(tmp_path):
  first = ckpt.RunCheckpointer(tmp_path)
  with pytest.raises(ckpt.CheckpointInUseError, match=str(tmp_path)):
    ckpt.RunCheckpointer(tmp_path)
  reader = ckpt.RunCheckpointer(tmp_path, exclusive=False)  # reading needs no lock
  reader.close()
  first.close()
  ckpt.RunCheckpointer(tmp_path).close()


def test_a_dead_processs_lock_is_taken_over(tmp_path):
  pid = _dead_pid()
  _write_lock(tmp_path, pid=pid)
  lock = FolderLock.acquire(str(tmp_path))
  assert lock.took_over["pid"] == pid
  lock.release()
  _write_lock(tmp_path, pid=_dead_pid())
  with pytest.warns(RuntimeWarning, match=r"took over the lock left by PID \d+ on host .* no longer running"):
    ckpt.RunCheckpointer(tmp_path).close()


def test_a_reused_pid_is_stale_and_a_running_one_is_not(tmp_path):
  _write_lock(tmp_path, pid=os.getppid(), process_start=_process_start(os.getppid()))  # running: respected
  with pytest.raises(FolderLockedError, match=f"PID {os.getppid()}"):
    FolderLock.acquire(str(tmp_path))
  if _process_start(os.getppid()) is None:
    pytest.skip("no /proc here: a reused PID cannot be told from its first process")
  _write_lock(tmp_path, pid=os.getppid(), process_start="1")  # the PID now runs another process
  FolderLock.acquire(str(tmp_path)).release()


def test_another_hosts_lock_is_respected(tmp_path):
  (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "then"}))
  with pytest.raises(FolderLockedError, match=r"PID 1 on host elsewhere .*another host: delete the lock file once"):
    FolderLock.acquire(str(tmp_path))


def test_an_unwritten_lock_file_is_fresh_for_a_moment_then_stale(tmp_path):
  (tmp_path / LOCK_FILE).write_text("")  # a writer between its create and its write
  with pytest.raises(FolderLockedError, match="at this moment"):
    FolderLock.acquire(str(tmp_path))
  old = time.time() - 60  # ... or one that crashed there
  os.utime(tmp_path / LOCK_FILE, (old, old))
  lock = FolderLock.acquire(str(tmp_path))
  assert lock.took_over is None
  lock.release()


def test_release_never_removes_another_owners_lock(tmp_path):
  lock = FolderLock.acquire(str(tmp_path))
  _write_lock(tmp_path, pid=os.getppid())  # taken over meanwhile (ours looked stale to someone)
  lock.release()
  assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getppid()


def test_a_read_only_folder_is_reported(tmp_path, monkeypatch):
  with read_only(tmp_path, monkeypatch):
    with pytest.raises(FolderNotWritableError, match=f"checkpoint folder {tmp_path} is not writable"):
      FolderLock.acquire(str(tmp_path))
    with pytest.raises(ckpt.CheckpointError, match=f"checkpoint folder {tmp_path} is not writable"):
      ckpt.RunCheckpointer(tmp_path)
  assert os.listdir(tmp_path) == []
