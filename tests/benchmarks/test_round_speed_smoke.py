"""Smoke test of ``benchmarks/round_speed.py``: ``--quick`` runs end to end and prints one sane JSON line.

No timing assertions: the figures depend on the machine. The test only checks that every section ran, that times
are positive, that the library round compiled (and did not recompile) and that the variants computed the same
round.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "benchmarks" / "round_speed.py"
# The smoke test runs a subset (each hand-written variant costs a compile); the full run has them all.
EXPECTED_VARIANTS = {"library_equal", "library_ragged", "python_loop_canonical", "unrolled_canonical", "scan_canonical",
                     "scan_sharded"}


def run_quick(tmp_path):
  output = tmp_path / "results.jsonl"
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  completed = subprocess.run(
      [sys.executable, str(SCRIPT), "--quick", "--only", ",".join(sorted(EXPECTED_VARIANTS)), "--output", str(output)],
      cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600,
  )
  assert completed.returncode == 0, completed.stderr[-4000:]
  lines = [line for line in completed.stdout.splitlines() if line.strip()]
  assert len(lines) == 1, f"expected exactly one stdout line, got {len(lines)}"
  report = json.loads(lines[0])
  assert json.loads(output.read_text().splitlines()[-1]) == report  # --output appends the same line
  return report


def _positive(value) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def check_top_level_keys(quick_report):
  for key in ("date", "jax", "jaxlib", "cpu_model", "workload", "variants", "ratios", "single_step",
              "recompilation", "memory", "total_compilations"):
    assert key in quick_report, key
  assert quick_report["quick"] is True
  assert quick_report["workload"]["clients"] == 2
  assert quick_report["workload"]["examples_per_client"] == 40
  assert sum(quick_report["workload"]["ragged_sizes"]) == 80


def check_variants_have_positive_times_and_agree(quick_report):
  variants = quick_report["variants"]
  assert set(variants) == EXPECTED_VARIANTS
  for name, result in variants.items():
    for key in ("steady_s", "first_round_s", "ms_per_local_step"):
      assert _positive(result[key]), (name, key, result[key])
    assert result["first_round_s"] >= result["compile_s"] >= 0
    assert result["compilations"] >= 1, name
    assert result["compilations_during_timed_rounds"] == 0, name
    assert len(result["round_s"]) == quick_report["rounds"]
    if name != "library_ragged":  # same starting point and data: every equal-size variant computes one round
      assert result["max_abs_param_diff_vs_library_after_round_1"] < 1e-4, name


def check_ratios(quick_report):
  ratios = quick_report["ratios"]
  assert ratios["fastest_handwritten"] in EXPECTED_VARIANTS - {"library_equal", "library_ragged"}
  assert _positive(ratios["library_equal_vs_fastest_handwritten"])
  assert _positive(ratios["library_ragged_vs_fastest_handwritten"])


def check_single_step(quick_report):
  for kind in ("plain", "canonical"):
    assert _positive(quick_report["single_step"][f"{kind}_step_alone_ms"])
    assert _positive(quick_report["single_step"][f"{kind}_step_in_rolled_scan_ms"])


def check_recompilation_counts(quick_report):
  recompilation = quick_report["recompilation"]
  assert recompilation["round_compilations"] >= 1
  assert recompilation["compilations_after_round_1"] == 0
  assert len(recompilation["compilations_per_round"]) == recompilation["rounds"]
  assert _positive(recompilation["first_round_s"])
  assert quick_report["total_compilations"] >= 1


def check_memory_subprocess(quick_report):
  memory = quick_report["memory"]
  assert memory["clients"] == 20
  assert memory["num_examples"] == 20 * 20
  assert _positive(memory["peak_rss_bytes"])
  assert memory["peak_rss_bytes"] >= memory["rss_before_round_bytes"] > 0
  assert _positive(memory["first_round_s"])
  assert memory["all_updates_at_once_bytes"] == 20 * memory["num_params"] * 4


def check_fp32_peak(quick_report):
  peak = quick_report["fp32_peak"]
  assert _positive(peak["peak_flops"]) and _positive(peak["one_device_flops"])
  # The script configures one CPU device per usable core (at most 8), as the library's default setup does.
  assert quick_report["configure_cpu"] is True
  assert peak["devices"] == quick_report["device_count"] == min(quick_report["cpu_affinity"], 8)
  # XLA's cost analysis of one SGD step of the CNN (batch 20): at least the forward
  # convolutions' multiply-adds, 2 * 20 * (28*28*32*25 + 14*14*64*25*32) = 4.5e8 FLOPs.
  for kind in ("plain", "canonical"):
    assert peak["flops_per_local_step"][kind] >= 2 * 20 * (28 * 28 * 32 * 25 + 14 * 14 * 64 * 25 * 32)
  assert set(peak["variants"]) == EXPECTED_VARIANTS
  for name, result in peak["variants"].items():
    assert 0 < result["share_of_peak"], name
    assert result["round_gflops"] * 1e9 == pytest.approx(
        peak["flops_per_local_step"]["canonical"] * quick_report["variants"][name]["local_steps"], rel=1e-2)


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path):
  # One subprocess run for all checks (a module-scoped fixture would run once per xdist worker).
  quick_report = run_quick(tmp_path)
  for check in (check_top_level_keys, check_variants_have_positive_times_and_agree, check_ratios,
                check_single_step, check_recompilation_counts, check_memory_subprocess, check_fp32_peak):
    check(quick_report)
