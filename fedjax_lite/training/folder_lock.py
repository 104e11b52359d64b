"""One writer per checkpoint folder: a lock file holding the owner's PID and host.

:class:`~fedjax_lite.training.checkpoint.RunCheckpointer` takes the lock of its folder when it opens it for writing
and gives it back when it closes, so two training runs never write one folder (orbax's steps of two runs would
overwrite and delete each other's). The lock is a file, ``<folder>/fedjax_lite.lock``, created with ``O_EXCL`` (one
atomic create on local and NFS filesystems) and holding JSON: ``{"pid", "host", "since", "process_start"}``.

A lock whose owner is gone is *stale* and is taken over (the caller reports it): its host is this host and its PID
runs no process, or runs another process than the one that took the lock (``process_start``, the process's start
time from ``/proc``, differs: the PID was reused). A lock of another host cannot be checked from here (nor any lock
on Windows, which has no harmless signal 0) and is respected; its message says which file to delete once that
process is known to be gone. Taking the lock is also the
first write into the folder, so a folder that cannot be written is reported here, before any training.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
import time

LOCK_FILE = "fedjax_lite.lock"
# A lock file that is empty or unreadable for this long is the remnant of a crash between its creation and its write.
_UNFINISHED_LOCK_SECONDS = 10.0

_HELD_IN_THIS_PROCESS: set[str] = set()
_HELD_GUARD = threading.Lock()


class FolderLockedError(RuntimeError):
  """The folder's lock is held by a running process (the message names its PID and host)."""


class FolderNotWritableError(OSError):
  """The lock file cannot be created: the folder is read-only, full, or not ours (the message says which)."""


@dataclasses.dataclass(frozen=True)
class FolderLock:
  """A held lock; :meth:`release` gives it back.

  Attributes:
    path: the lock file.
    owner: what the file holds (this process).
    took_over: the stale owner whose lock was taken over, or None.
  """

  path: str
  owner: dict
  took_over: dict | None = None

  @classmethod
  def acquire(cls, directory: str) -> "FolderLock":
    """Takes the lock of ``directory`` (which must exist).

    Raises:
      FolderLockedError: a running process holds it.
      FolderNotWritableError: the lock file cannot be written.
    """
    path = os.path.join(directory, LOCK_FILE)
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
             "process_start": _process_start(os.getpid())}
    stale = None
    for _ in range(3):  # another process may take a stale lock at the same moment: look again
      try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
      except FileExistsError:
        holder = _read_holder(path)
        if holder is None or _is_running(holder, path):
          raise FolderLockedError(_locked_message(directory, path, holder)) from None
        stale = holder or stale  # ({} : a lock released meanwhile, or left unwritten by a crash)
        _remove(path)
        continue
      except OSError as error:
        raise FolderNotWritableError(error.errno, f"checkpoint folder {directory} is not writable "
                                                  f"({error.strerror or error})") from None
      try:
        with os.fdopen(descriptor, "w") as sink:
          json.dump(owner, sink)
      except OSError as error:
        _remove(path)
        raise FolderNotWritableError(error.errno, f"checkpoint folder {directory} is not writable "
                                                  f"({error.strerror or error})") from None
      with _HELD_GUARD:
        _HELD_IN_THIS_PROCESS.add(path)
      return cls(path=path, owner=owner, took_over=stale)
    raise FolderLockedError(f"checkpoint folder {directory} is being locked by another process at this moment; "
                            f"try again (lock file {path}).")

  def release(self) -> None:
    """Removes the lock file if it is still this owner's (never another owner's). Never raises."""
    with _HELD_GUARD:
      _HELD_IN_THIS_PROCESS.discard(self.path)
    holder = _read_holder(self.path)
    if holder is not None and holder.get("pid") == self.owner["pid"] and holder.get("host") == self.owner["host"]:
      _remove(self.path)


def describe_holder(holder: dict) -> str:
  """``'PID 123 on host h (since 2024-01-01 10:00:00)'``."""
  return f"PID {holder.get('pid')} on host {holder.get('host')} (since {holder.get('since')})"


def _locked_message(directory: str, path: str, holder: dict | None) -> str:
  if holder is None:
    return (f"checkpoint folder {directory} is being locked by another process at this moment (lock file {path}); "
            "try again.")
  where = "another host: delete the lock file once that process is gone" if holder.get(
      "host") != socket.gethostname() else "wait for it to end, or use another folder"
  return (f"checkpoint folder {directory} is in use by another run: {describe_holder(holder)} holds its lock file "
          f"{path} ({where}).")


def _read_holder(path: str) -> dict | None:
  """The lock's owner; a lock file unreadable for a while counts as a dead owner (``{}``); None: being written."""
  try:
    with open(path) as source:
      holder = json.load(source)
    if isinstance(holder, dict) and isinstance(holder.get("pid"), int):
      return holder
  except FileNotFoundError:
    return {}  # released meanwhile: nothing to respect
  except (OSError, ValueError):
    pass
  try:
    age = time.time() - os.path.getmtime(path)
  except OSError:
    return {}
  return {} if age > _UNFINISHED_LOCK_SECONDS else None


def _is_running(holder: dict, path: str) -> bool:
  """Whether the lock's owner may still run (a lock of another host always may)."""
  if not holder:
    return False
  if holder.get("host") != socket.gethostname():
    return True
  pid = holder["pid"]
  if pid == os.getpid():
    with _HELD_GUARD:
      return path in _HELD_IN_THIS_PROCESS  # else left by an earlier process with this PID
  if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C there: no safe probe, the lock is respected
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # another user's process: it runs
  started = holder.get("process_start")
  return started is None or _process_start(pid) in (None, started)


def _process_start(pid: int) -> str | None:
  """The process's start time in clock ticks since boot (Linux ``/proc``), or None where unknown."""
  try:
    with open(f"/proc/{pid}/stat") as source:
      fields = source.read().rsplit(")", 1)[1].split()
    return fields[19]  # field 22 of stat; fields[0] is field 3
  except (OSError, IndexError):
    return None


def _remove(path: str) -> None:
  try:
    os.unlink(path)
  except OSError:
    pass
