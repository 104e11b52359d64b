"""Plots of a training run: loss and accuracy per round, written as a PNG (matplotlib, no display needed).

The figure is a bare ``matplotlib.figure.Figure`` rendered by its own canvas: importing this module neither
imports ``pyplot`` nor switches matplotlib's global backend, so notebooks that import fedjax_lite keep their
inline plots.
"""

from __future__ import annotations

import os
from typing import Sequence

from matplotlib.figure import Figure


def _series(history: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
  rounds, values = [], []
  for record in history:
    value = record.get(key)
    if isinstance(value, (int, float)):
      rounds.append(record["round"] + 1)
      values.append(float(value))
  return rounds, values


def plot_history(history: Sequence[dict], path: str | os.PathLike, *, title: str = "",
                 extra_keys: Sequence[str] = ()) -> None:
  """Writes loss (left) and accuracy (right) per round, plus one panel per ``extra_keys`` entry."""
  panels = [
      ("loss", ["client_work/train/loss", "evaluation/loss"]),
      ("accuracy", ["client_work/train/accuracy", "evaluation/accuracy"]),
  ] + [(key.split("/")[-1], [key]) for key in extra_keys]
  figure = Figure(figsize=(5 * len(panels), 3.6))
  axes = figure.subplots(1, len(panels), squeeze=False)
  for axis, (label, keys) in zip(axes[0], panels):
    for key in keys:
      rounds, values = _series(history, key)
      if values:
        axis.plot(rounds, values, marker="." if len(values) < 60 else None,
                  label="train (clients)" if key.startswith("client_work") else
                  ("test" if key.startswith("evaluation") else key))
    axis.set_xlabel("round")
    axis.set_ylabel(label)
    axis.grid(alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
      axis.legend()
  if title:
    figure.suptitle(title)
  figure.tight_layout()
  figure.savefig(path, dpi=110)
