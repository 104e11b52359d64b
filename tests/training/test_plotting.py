"""The run plot: written as a PNG, with one panel per extra key, and importing it leaves matplotlib's backend alone."""

from __future__ import annotations

import subprocess
import sys

from fedjax_lite.training.plotting import plot_history


def test_plot_history_writes_a_png_with_extra_panels(tmp_path):
  history = [{"round": k, "client_work/train/loss": 2.0 / (k + 1), "evaluation/accuracy": 0.1 * k,
              "aggregator/clipping_norm": 1.0 + k} for k in range(5)]
  path = tmp_path / "run.png"
  plot_history(history, path, title="t", extra_keys=["aggregator/clipping_norm"])
  data = path.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  width = int.from_bytes(data[16:20], "big")
  assert width == 3 * 5 * 110  # three panels of 5 inches at 110 dpi


def test_importing_fedjax_lite_does_not_switch_the_matplotlib_backend():
  # A notebook's inline backend must survive `from fedjax_lite import training` (it used to be forced to Agg,
  # which silently dropped every plot of the tutorial notebooks).
  code = ("import matplotlib; matplotlib.use('svg'); import fedjax_lite.training; "
          "import fedjax_lite.training.plotting; print(matplotlib.get_backend())")
  completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
  assert completed.stdout.strip().splitlines()[-1] == "svg"
