"""Smoke test of ``benchmarks/fedbuff_throughput.py``: ``--quick`` runs end to end and prints one sane JSON line.

No timing assertions (the figures depend on the machine): rates are positive, the ratio is FedBuff's rate over
FedAvg's, and the report says whether the target was met.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "benchmarks" / "fedbuff_throughput.py"


def test_quick_run_prints_one_json_line(tmp_path):
  output = tmp_path / "fedbuff.jsonl"
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  completed = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--blocks", "1", "--block", "2", "--output",
                              str(output)], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, timeout=600)
  assert completed.returncode == 0, completed.stderr[-4000:]
  lines = [line for line in completed.stdout.splitlines() if line.strip()]
  assert len(lines) == 1
  report = json.loads(lines[0])
  assert json.loads(output.read_text().splitlines()[-1]) == report
  rates = report["client_updates_per_second"]
  assert set(rates) == {"fed_avg", "fed_buff"} and all(rate > 0 for rate in rates.values())
  assert abs(report["ratio_fed_buff_to_fed_avg"] - rates["fed_buff"] / rates["fed_avg"]) < 1e-3
  assert report["meets_target"] == (report["ratio_fed_buff_to_fed_avg"] >= report["target"])
