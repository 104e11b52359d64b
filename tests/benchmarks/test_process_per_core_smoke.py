"""Smoke test of ``benchmarks/process_per_core.py``: ``--quick`` runs the three configurations and prints one JSON line.

No timing assertions. It checks that the process-per-core configuration really ran as several processes with one
device each, and that its first round equals the one-process round up to float32 summation order.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests.tolerances import float_atol

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "benchmarks" / "process_per_core.py"
QUICK_CLIENTS = 2  # benchmarks.round_speed.QUICK


@pytest.mark.slow
def test_quick_run_prints_one_json_line():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  completed = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--rounds", "1", "--repeats", "1"],
                             capture_output=True, text=True, timeout=300, cwd=REPO_ROOT, env=env)
  assert completed.returncode == 0, completed.stderr[-3000:]
  lines = completed.stdout.strip().splitlines()
  assert len(lines) == 1
  result = json.loads(lines[0])
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  assert result["process_per_core"]["processes"] == result["process_per_core"]["devices"] == cores
  assert result["one_process"]["processes"] == result["one_process_jax_defaults"]["processes"] == 1
  # configure_cpu gives the one process a device per usable core (at most 8); JAX's defaults give one.
  assert result["one_process"]["devices"] == min(cores, 8)
  assert result["one_process_jax_defaults"]["devices"] == 1
  for name in ("one_process", "process_per_core", "one_process_jax_defaults"):
    assert result[name]["steady_s"] > 0 and result[name]["first_round_s"] > 0
  assert result["steady_ratio_process_per_core_to_one_process"] > 0
  assert result["steady_ratio_one_process_to_jax_defaults"] > 0
  # The same clients and keys; the clients' weighted deltas are summed in another order (one process's scans,
  # a cross-process all-reduce), then divided and applied: a few ulps times (clients + 2) at the parameters' scale.
  assert result["max_abs_param_difference_after_round_1"] <= float_atol(QUICK_CLIENTS + 2,
                                                                        result["max_abs_param_after_round_1"])
