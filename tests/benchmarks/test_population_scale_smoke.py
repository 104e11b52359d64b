"""Smoke test of ``benchmarks/population_scale.py``: ``--quick`` builds a memory-mapped population, packs cohorts,
runs rounds and prints one sane JSON line.

No timing or memory-size assertions (they depend on the machine); the test checks the structure: the population
stays memory-mapped, the counts add up, the packed cohort has the size the packing format gives, times are
positive and the trained parameters are finite. The subprocess gets XLA:CPU's cheaper compile flags (only the
plumbing is checked here).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "benchmarks" / "population_scale.py"
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _positive(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_quick_run_end_to_end(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE)
  completed = subprocess.run(
      [sys.executable, str(SCRIPT), "--quick", "--rounds", "2", "--dir", str(tmp_path)],
      cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600,
  )
  assert completed.returncode == 0, completed.stderr[-4000:]
  lines = [line for line in completed.stdout.splitlines() if line.strip()]
  assert len(lines) == 1, f"expected exactly one stdout line, got {len(lines)}"
  report = json.loads(lines[0])

  assert report["quick"] is True and report["clients"] == 3_400 and report["cohort"] == 100
  assert report["population_is_memmapped"] is True
  assert report["population_examples"] >= report["clients"]  # every client has at least one example
  # uint8 28x28x1 images + int32 labels, plus one .npy header (128 bytes) per file.
  assert report["population_file_bytes"] == report["population_examples"] * (784 + 4) + 2 * 128
  # One packed cohort: [100, 1 step, 10] of x (784 B), y (4 B) and mask (1 B), plus 100 int32 num_examples.
  assert report["packed_cohort_bytes"] == 100 * 10 * (784 + 4 + 1) + 100 * 4
  assert len(report["pack_s"]) == len(report["round_s"]) == 2
  assert all(_positive(s) for s in report["pack_s"] + report["round_s"])
  assert _positive(report["packing_clients_per_s"]) and _positive(report["clients_per_s_in_round"])
  rss = report["rss_bytes"]
  assert len(rss["after_packing"]) == len(rss["after_each_round"]) == 2
  for memory in [rss["before_warm_up"], rss["before_population"], rss["after_population"], *rss["after_packing"],
                 *rss["after_each_round"]]:
    assert memory["rss"] > 0
    if "anon" in memory:  # Linux: the split into the process's heap and mapped file pages
      assert memory["anon"] > 0 and memory["file"] >= 0
  assert rss["peak"] >= rss["before_population"]["rss"]
  assert report["device_peak_bytes"] is None  # XLA:CPU reports no memory_stats
  assert report["params_finite"] is True and math.isfinite(report["train_loss"])
  assert not any(tmp_path.iterdir())  # the temporary population is removed
