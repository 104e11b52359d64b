"""Smoke test of ``benchmarks/mf_aggregator.py`` at a tiny size: every aggregator (step and full round) runs and is
reported."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "benchmarks" / "mf_aggregator.py"


def test_runs_at_a_tiny_size():
  pytest.importorskip("jax_privacy", reason="the [dp_mf] extra (jax_privacy, Python >= 3.11)")
  completed = subprocess.run([sys.executable, str(SCRIPT), "--repeats", "2", "--size", "1000"], capture_output=True,
                             text=True, timeout=300, cwd=REPO_ROOT)
  assert completed.returncode == 0, completed.stderr[-3000:]
  for name in ("gaussian", "identity", "blt", "banded"):
    assert name in completed.stdout


def test_full_round_runs_at_a_tiny_size():
  pytest.importorskip("jax_privacy", reason="the [dp_mf] extra (jax_privacy, Python >= 3.11)")
  completed = subprocess.run([sys.executable, str(SCRIPT), "--full-round", "--quick", "--repeats", "2", "--bands",
                              "2,3"], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
  assert completed.returncode == 0, completed.stderr[-3000:]
  report = json.loads(completed.stdout.strip().splitlines()[-1])
  assert set(report["ratio_to_gaussian"]) == {"gaussian", "blt", "banded_2", "banded_3"}
  assert report["ratio_to_gaussian"]["gaussian"] == 1.0 and isinstance(report["blt_meets_target"], bool)
