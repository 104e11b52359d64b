"""Smoke test of ``benchmarks/systems_overhead.py``: ``--quick`` runs end to end and prints one sane JSON line.

No timing assertions (the figures depend on the machine): times are positive, the same-work variant packed the
same data as the plain round, and the realistic variant never counted more clients than the slots.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "benchmarks" / "systems_overhead.py"


def test_quick_run_prints_one_json_line(tmp_path):
  output = tmp_path / "systems.jsonl"
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  completed = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--rounds", "2", "--output", str(output)],
                             cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             timeout=600)
  assert completed.returncode == 0, completed.stderr[-4000:]
  lines = [line for line in completed.stdout.splitlines() if line.strip()]
  assert len(lines) == 1
  report = json.loads(lines[0])
  assert json.loads(output.read_text().splitlines()[-1]) == report
  assert set(report["seconds_per_round"]) == {"plain", "systems_same_work", "systems_realistic",
                                              "realistic_without_systems"}
  assert all(seconds > 0 for seconds in report["seconds_per_round"].values())
  assert report["same_work_packs_the_same_data"] is True
  assert report["counted_clients_per_round"]["systems_same_work"] == 3.0
  assert report["counted_clients_per_round"]["systems_realistic"] <= 3.0
  assert set(report["ratio_to_plain"]) == {"systems_same_work", "systems_realistic", "realistic_without_systems"}
  # The realistic rounds replayed without the systems path pack the same data: the ratio compares equal work.
  assert report["realistic_replay_packs_the_same_data"] is True
  assert report["realistic_ratio_to_the_same_rounds_without_systems"] > 0
