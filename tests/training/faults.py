"""Faults of the environment, injected as a user's machine would meet them (helpers of ``test_faults.py``).

* **read-only folder**: as a normal user, permissions (``chmod 0o555``); as root, whom permissions do not stop, the
  immutable attribute (``chattr +i``); where neither is possible (root without ``CAP_LINUX_IMMUTABLE``), a fake at
  Python's filesystem layer: ``os.open``/``os.mkdir``/``os.rename``/``open`` for writing under the folder raise
  ``PermissionError`` (this process only; orbax's array writes in C++ never start since their folder cannot be
  created).
* **full disk**: a small tmpfs mounted over the folder where the test may mount one (root with ``CAP_SYS_ADMIN``)
  and filled with a file; elsewhere a fake ``ENOSPC`` at Python's filesystem layer (orbax's meta and commit files
  fail; its C++ array writes do not, which leaves the same partial step behind).

``FEDJAX_LITE_FAULTS=fake`` forces the fakes (to run their path on a machine that could do the real thing).
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import os
import shutil
import subprocess
from typing import Iterator

FORCE_FAKE = os.environ.get("FEDJAX_LITE_FAULTS") == "fake"
IS_ROOT = getattr(os, "geteuid", lambda: -1)() == 0


def _under(path, root: str) -> bool:
  try:
    path = os.path.abspath(os.fspath(path))
  except TypeError:  # a file descriptor
    return False
  return path == root or path.startswith(root + os.sep)


class FakeFilesystemFault:
  """Writes under ``root`` fail with ``error_number`` while :attr:`active` (``monkeypatch`` undoes the patches)."""

  def __init__(self, root, error_number: int, monkeypatch, *, deletions_fail: bool):
    self.root = os.path.abspath(os.fspath(root))
    self.error_number = error_number
    self.active = False
    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir
    real_rename, real_replace, real_unlink, real_rmdir = os.rename, os.replace, os.unlink, os.rmdir

    def fail(path):
      raise OSError(error_number, os.strerror(error_number), os.fspath(path))

    def checked(real, *, paths=1, deletion=False):
      def wrapper(*args, **kwargs):
        if self.active and (deletions_fail or not deletion) and any(_under(p, self.root) for p in args[:paths]):
          fail(args[0])
        return real(*args, **kwargs)
      return wrapper

    def fake_open(file, mode="r", *args, **kwargs):
      if self.active and any(c in mode for c in "wax+") and _under(file, self.root):
        fail(file)
      return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path, flags, *args, **kwargs):
      if self.active and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and _under(path, self.root):
        fail(path)
      return real_os_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(os, "mkdir", checked(real_mkdir))
    monkeypatch.setattr(os, "rename", checked(real_rename, paths=2))
    monkeypatch.setattr(os, "replace", checked(real_replace, paths=2))
    monkeypatch.setattr(os, "unlink", checked(real_unlink, deletion=True))
    monkeypatch.setattr(os, "remove", checked(real_unlink, deletion=True))
    monkeypatch.setattr(os, "rmdir", checked(real_rmdir, deletion=True))


def _chattr(flag: str, path) -> bool:
  if shutil.which("chattr") is None:
    return False
  return subprocess.run(["chattr", flag, os.fspath(path)], capture_output=True).returncode == 0


@contextlib.contextmanager
def read_only(path, monkeypatch) -> Iterator[str]:
  """``path`` (an existing folder) read-only inside the block; yields how: 'chmod', 'chattr' or 'fake'."""
  if not FORCE_FAKE and not IS_ROOT:
    mode = os.stat(path).st_mode
    os.chmod(path, 0o555)
    try:
      yield "chmod"
    finally:
      os.chmod(path, mode)
  elif not FORCE_FAKE and _chattr("+i", path):
    try:
      yield "chattr"
    finally:
      _chattr("-i", path)
  else:
    fault = FakeFilesystemFault(path, errno.EACCES, monkeypatch, deletions_fail=True)
    fault.active = True
    try:
      yield "fake"
    finally:
      fault.active = False


class FullDisk:
  """A folder on a disk that fills up on :meth:`fill` and frees on :meth:`free`: a real tmpfs, or the fake.

  Attributes:
    path: the folder (empty at first).
    how: 'tmpfs' or 'fake'.
  """

  def __init__(self, path, monkeypatch, size: str = "8m"):
    self.path = os.fspath(path)
    os.makedirs(self.path, exist_ok=True)
    self._filler = None
    self._fault = None
    mounted = not FORCE_FAKE and IS_ROOT and shutil.which("mount") is not None and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", self.path], capture_output=True).returncode == 0
    self.how = "tmpfs" if mounted else "fake"
    if not mounted:
      self._fault = FakeFilesystemFault(self.path, errno.ENOSPC, monkeypatch, deletions_fail=False)

  def fill(self) -> None:
    if self._fault is not None:
      self._fault.active = True
      return
    self._filler = os.path.join(self.path, "filler")
    block = b"\0" * 2**16
    try:
      with open(self._filler, "wb") as sink:
        while True:
          sink.write(block)
          sink.flush()
    except OSError as error:
      assert error.errno == errno.ENOSPC, error

  def free(self) -> None:
    if self._fault is not None:
      self._fault.active = False
    elif self._filler is not None:
      os.unlink(self._filler)
      self._filler = None

  def close(self) -> None:
    self.free()
    if self.how == "tmpfs":
      if subprocess.run(["umount", self.path], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", self.path], capture_output=True)
