"""Smoke test of ``benchmarks/peer_side_by_side.py``, the library's side only (pfl-research is not installed in
the test environment): ``--quick`` runs both peer workloads' library rounds in fresh processes and prints one JSON
line. No timing assertions."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "benchmarks" / "peer_side_by_side.py"


@pytest.mark.slow
def test_quick_library_side_prints_one_json_line():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  completed = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--rounds", "2", "--repeats", "1"],
                             capture_output=True, text=True, timeout=600, cwd=REPO_ROOT, env=env)
  assert completed.returncode == 0, completed.stderr[-3000:]
  lines = completed.stdout.strip().splitlines()
  assert len(lines) == 1
  result = json.loads(lines[0])
  assert result["configurations"] == ["library"]
  for workload in ("standard", "cifar10"):
    (run,) = result[workload]["raw"]["library"]
    assert "error" not in run, run
    assert run["users"] == 2 and len(run["round_s"]) == 2 and run["steady_s"] > 0 and run["steady_cpu_s"] > 0
    assert run["cpu_devices"] == min(len(os.sched_getaffinity(0)), 8)
    assert result[workload]["ratios"] == {}  # no peer ran
