"""Smoke test of ``benchmarks/model_speed.py``: ``--quick`` runs end to end and prints one sane JSON line.

No timing assertions (the figures depend on the machine): times are positive and finite, and the step in the loop
and the step alone computed the same parameters.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "benchmarks" / "model_speed.py"


def test_quick_run_prints_one_json_line(tmp_path):
  output = tmp_path / "speed.jsonl"
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  completed = subprocess.run(
      [sys.executable, str(SCRIPT), "--quick", "--unrolls", "1", "--vmap-clients", "0", "--output", str(output)],
      cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300,
  )
  assert completed.returncode == 0, completed.stderr[-4000:]
  lines = [line for line in completed.stdout.splitlines() if line.strip()]
  assert len(lines) == 1
  report = json.loads(lines[0])
  assert json.loads(output.read_text().splitlines()[-1]) == report
  assert report["quick"] is True and report["num_params"] > 0
  result = report["unrolls"]["1"]
  for name in ("alone", "in_loop"):
    assert math.isfinite(result[name]["ms_per_step"]) and result[name]["ms_per_step"] > 0
  assert result["ratio_in_loop_vs_alone"] > 0
  assert result["max_abs_param_diff_in_loop_vs_alone"] < 1e-5  # the same float32 steps in both ways

