"""Plots of a training run: loss and accuracy per round, written as a PNG (matplotlib, no display needed).

The x axis is the records' ``round``, numbered from 0 as in ``metrics.jsonl`` and every other output
(:mod:`fedjax_lite.training.units`). The figure is a bare ``matplotlib.figure.Figure`` rendered by its own canvas:
importing this module neither imports ``pyplot`` nor switches matplotlib's global backend, so notebooks that
import fedjax_lite keep their inline plots.
"""

from __future__ import annotations

import os
from typing import Sequence

from matplotlib.figure import Figure

ROUND_AXIS_LABEL = "round (from 0, as in metrics.jsonl)"


def _series(history: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
  rounds, values = [], []
  for record in history:
    value = record.get(key)
    if isinstance(value, (int, float)):
      rounds.append(record["round"])
      values.append(float(value))
  return rounds, values


def history_figure(history: Sequence[dict], *, title: str = "", extra_keys: Sequence[str] = ()) -> Figure:
  """Loss (left) and accuracy (right) against each record's ``round``, plus one panel per ``extra_keys`` entry."""
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
    axis.set_xlabel(ROUND_AXIS_LABEL)
    axis.set_ylabel(label)
    axis.grid(alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
      axis.legend()
  if title:
    figure.suptitle(title)
  figure.tight_layout()
  return figure


def plot_history(history: Sequence[dict], path: str | os.PathLike, *, title: str = "",
                 extra_keys: Sequence[str] = ()) -> None:
  """Writes :func:`history_figure` of ``history`` to ``path`` (PNG)."""
  history_figure(history, title=title, extra_keys=extra_keys).savefig(path, dpi=110)
