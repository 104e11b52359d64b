"""Runs the ``fedjax-lite`` command line with one checkpoint save held open: a test-side hook.

``python tests/training/slow_save.py ROUNDS SECONDS train FLAGS...`` runs ``fedjax-lite train FLAGS...`` in which the
background write of the checkpoint after ``ROUNDS`` rounds sleeps ``SECONDS`` before writing its meta (the arrays are
already written, in orbax's temporary directory): a test can then kill the process in the middle of a save, or while
the run holds its checkpoint folder. Orbax's JSON handler is wrapped in this process only; the library has no hook.
"""

from __future__ import annotations

import json
import os
import sys
import time

import orbax.checkpoint as ocp


class _DelayedWrite:
  """A commit future that sleeps, then writes the meta file."""

  def __init__(self, path, text: str, seconds: float):
    self._path = path
    self._text = text
    self._seconds = seconds

  def result(self, timeout: float | None = None):
    del timeout
    time.sleep(self._seconds)
    os.makedirs(os.path.dirname(os.fspath(self._path)), exist_ok=True)
    with open(os.fspath(self._path), "w") as sink:
      sink.write(self._text)


def hold_save(rounds_completed: int, seconds: float) -> None:
  """Makes the meta write of the checkpoint after ``rounds_completed`` rounds sleep ``seconds`` first."""
  original = ocp.JsonCheckpointHandler.async_save

  async def async_save(self, directory, item=None, args=None):
    if args is not None and isinstance(args.item, dict) and args.item.get("rounds_completed") == rounds_completed:
      return [_DelayedWrite(directory / self._filename, json.dumps(args.item), seconds)]
    return await original(self, directory, item, args)

  ocp.JsonCheckpointHandler.async_save = async_save


if __name__ == "__main__":
  hold_save(int(sys.argv[1]), float(sys.argv[2]))
  from fedjax_lite.training import cli

  sys.exit(cli.main(sys.argv[3:]))
