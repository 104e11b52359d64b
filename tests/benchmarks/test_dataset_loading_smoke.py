"""Smoke test of ``benchmarks/dataset_loading.py`` at a tiny size: runs end to end and prints one sane JSON line.

No timing assertions (the figures depend on the machine): the cold load must have converted every example, the
warm load must have read the same examples back, and every figure must be positive.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "benchmarks" / "dataset_loading.py"


def test_dataset_loading_smoke(tmp_path):
  completed = subprocess.run(
      [sys.executable, str(SCRIPT), "--clients", "4", "--examples", "40", "--workdir", str(tmp_path / "w")],
      cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)
  assert completed.returncode == 0, completed.stderr[-4000:]
  lines = [line for line in completed.stdout.splitlines() if line.strip()]
  assert len(lines) == 1
  report = json.loads(lines[0])
  assert report["cold"]["examples"] == report["warm"]["examples"] == 40 + report["test_examples"]
  assert report["cold"]["train_clients"] == report["warm"]["train_clients"] == 4
  for phase in ("cold", "warm"):
    assert report[phase]["seconds"] > 0 and report[phase]["peak_rss_gib"] > 0
  assert report["warm"]["pack_round_s"] > 0 and report["warm"]["full_pass_s"] > 0
  assert not (tmp_path / "w").exists()  # generated files removed unless --keep
