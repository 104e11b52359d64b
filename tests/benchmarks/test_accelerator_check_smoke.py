"""Smoke test of ``benchmarks/accelerator_check.py``: ``--platform cpu`` runs every section and prints one JSON line.

No timing assertions (figures depend on the machine). The test checks that every section ran without an error,
that the default runner resolves to ``sequential`` on CPU (``vmap`` is the accelerator's), that ``vmap`` on the
"device" equals the sequential CPU reference within the script's derived tolerance, and that the memory search
ran; the search's doubling and its out-of-memory / error / budget stops are tested on a fake trial function. The subprocess gets XLA:CPU's cheaper compile flags: this test only checks the plumbing,
and most of its time is compilation.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "benchmarks" / "accelerator_check.py"
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
SECTIONS = ("environment", "cpu_equivalence", "standard_round", "digits_main_job", "largest_cohort")


def _positive(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def run_smoke(tmp_path):
  output = tmp_path / "results.jsonl"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE)
  completed = subprocess.run(
      [sys.executable, str(SCRIPT), "--platform", "cpu", "--rounds", "2", "--output", str(output)],
      cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600,
  )
  assert completed.returncode == 0, completed.stderr[-4000:]
  lines = [line for line in completed.stdout.splitlines() if line.strip()]
  assert len(lines) == 1, f"expected exactly one stdout line, got {len(lines)}: {completed.stdout[-2000:]}"
  report = json.loads(lines[0])
  assert json.loads(output.read_text().splitlines()[-1]) == report  # --output appends the same line
  return report


def check_sections_ran(report):
  assert report["smoke"] is True
  assert report["total_s"] < report["budget_s"]
  assert report["errors"] == [], {name: report[name].get("error") for name in report["errors"]}
  for name in SECTIONS:
    assert "error" not in report[name] and "skipped" not in report[name], (name, report[name])
    assert report[name]["section_s"] >= 0


def check_environment(report):
  environment = report["environment"]
  assert environment["backend"] == "cpu"
  assert environment["default_runner_strategy"] == "sequential"
  assert environment["default_runner_is_vmap"] is False
  assert environment["ok"] is True


def check_cpu_equivalence(report):
  equivalence = report["cpu_equivalence"]
  # tolerance = (steps * batch * (784 + 1) + clients) * 2**-23 * max|update|: smoke sizes 3 clients, 2 steps of 10.
  assert equivalence["clients"] == 3 and equivalence["steps"] == 2 and equivalence["batch"] == 10
  assert _positive(equivalence["tolerance"])
  assert equivalence["highest_precision"]["max_abs_diff"] <= equivalence["tolerance"]
  assert equivalence["ok"] is True


def check_standard_round(report):
  cohorts = report["standard_round"]["cohorts"]
  assert set(cohorts) == {"2", "4"}
  for cohort, entry in cohorts.items():
    assert _positive(entry["seconds_per_round"]), (cohort, entry)
    assert entry["clients_per_s"] == pytest.approx(int(cohort) / entry["seconds_per_round"], rel=1e-2)
    assert entry["first_round_s"] > 0
    assert entry["centralized"]["batch"] == int(cohort) * 10  # clients x batch, same examples
    assert _positive(entry["ratio_round_to_centralized"])
  assert report["standard_round"]["target"]["ratio_round_to_centralized_at"] == 4


def check_largest_cohort(report):
  for strategy in ("vmap", "chunked"):
    search = report["largest_cohort"][strategy]
    # Smoke: one trial per strategy (the doubling itself is tested below without compiling anything).
    assert [trial["clients"] for trial in search["tried"]] == [4]
    assert all(trial["ok"] for trial in search["tried"])
    assert search["largest_fitting_cohort"] == 4
    assert search["stopped_by"] == "reached search_max"


def check_digits_job(report):
  digits = report["digits_main_job"]
  assert digits["rounds"] == 2
  assert digits["clients_per_round"] == 10  # the CLI's defaults
  assert _positive(digits["rounds_per_s"])
  assert math.isfinite(digits["final_train_loss"])
  # Whole training on the device, same job: R rounds per dispatch, and its ratio to the per-round loop.
  whole = digits["whole_training"]
  assert whole["rounds_per_dispatch"] == 2 and whole["rounds"] == 2
  assert _positive(whole["rounds_per_s"]) and _positive(whole["speedup_end_to_end"])
  assert math.isfinite(whole["final_train_loss"])
  assert whole["target"]["speedup_steady_at_least"] == 3.0


@pytest.mark.slow
def test_cpu_smoke_run_end_to_end(tmp_path):
  report = run_smoke(tmp_path)  # one subprocess for all checks
  for check in (check_sections_ran, check_environment, check_cpu_equivalence, check_standard_round,
                check_largest_cohort, check_digits_job):
    check(report)


def test_guarded_sections_record_errors_and_skips_instead_of_raising():
  """An exhausted budget skips a section; an exception is recorded as the section's error; OOM is recognized."""
  spec = importlib.util.spec_from_file_location("accelerator_check", SCRIPT)
  accelerator_check = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(accelerator_check)
  budget = accelerator_check.Budget(1e-9)
  report = {}
  accelerator_check.guarded(report, "never", budget, lambda: 1 / 0)
  assert "skipped" in report["never"]
  report = {}
  accelerator_check.guarded(report, "fails", accelerator_check.Budget(100.0), lambda: 1 / 0)
  assert report["fails"]["error"].startswith("ZeroDivisionError")
  assert accelerator_check.is_out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 1 bytes"))
  assert not accelerator_check.is_out_of_memory(ValueError("bad shape"))


def test_doubling_search_stops_at_out_of_memory_errors_and_budget():
  spec = importlib.util.spec_from_file_location("accelerator_check", SCRIPT)
  accelerator_check = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(accelerator_check)
  search = accelerator_check.doubling_search

  def fits_below(limit, error):
    def try_cohort(cohort):
      if cohort >= limit:
        raise error
      return {"seen": cohort}
    return try_cohort

  oom = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123 bytes.")
  result = search(fits_below(8, oom), 1, 1024, lambda: 1e9)
  assert [trial["clients"] for trial in result["tried"]] == [1, 2, 4, 8]
  assert result["largest_fitting_cohort"] == 4 and result["stopped_by"] == "out of memory"
  assert result["tried"][-1]["out_of_memory"] is True and result["tried"][0]["seen"] == 1

  result = search(fits_below(4, ValueError("shape mismatch")), 1, 1024, lambda: 1e9)
  assert result["largest_fitting_cohort"] == 2 and result["stopped_by"] == "error"

  result = search(fits_below(10**9, oom), 3, 20, lambda: 1e9)  # 3, 6, 12; 24 > the bound
  assert result["largest_fitting_cohort"] == 12 and result["stopped_by"] == "reached search_max"

  result = search(fits_below(10**9, oom), 1, 1024, lambda: 0.0)  # no time for even one trial
  assert result == {"largest_fitting_cohort": None, "stopped_by": "time budget", "tried": []}
