"""Smoke test of ``benchmarks/example_dp.py`` at a tiny size: the three ways of the private epoch run and are
reported, with the CPU setup asked for."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "benchmarks" / "example_dp.py"


def test_runs_at_a_tiny_size():
  completed = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--repeats", "1", "--model", "logistic",
                              "--keep-fusion-emitters"], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
  assert completed.returncode == 0, completed.stderr[-3000:]
  report = json.loads(completed.stdout.strip().splitlines()[-1])
  assert set(report["models"]["logistic"]["ratio_to_plain"]) == {"example_dp_ghost", "example_dp_scan",
                                                                 "example_dp_vmap"}
  assert report["configure_cpu"] is True and report["fast_compile"] is False
