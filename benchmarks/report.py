"""What every benchmark's report shares: the CPU's name and the one JSON line it prints (and appends to a file).

Where this sits: a dependency-free helper of the scripts in ``benchmarks/`` (it imports neither jax nor the
library, so scripts that run in another environment -- the pfl-research one -- can use it too).
"""

from __future__ import annotations

import json
import platform


def cpu_model() -> str:
  """The CPU's model name from ``/proc/cpuinfo`` (Linux), else ``platform.processor()``, else ``'unknown'``."""
  try:
    with open("/proc/cpuinfo") as cpuinfo:
      for line in cpuinfo:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def emit(result: dict, output: str | None = None) -> str:
  """Prints ``result`` as one JSON line on stdout and, with ``output``, appends the same line to that file."""
  line = json.dumps(result)
  print(line, flush=True)
  if output:
    with open(output, "a") as f:
      f.write(line + "\n")
  return line
