"""Plots of a training run: loss and accuracy per round, written as a PNG (matplotlib, no display needed).

The x axis is the records' ``round``, numbered from 0 as in ``metrics.jsonl`` and every other output
(:mod:`fedjax_lite.training.units`), or any other metric of the records (``x_key``, e.g. simulated hours). The
figure is a bare ``matplotlib.figure.Figure`` rendered by its own canvas: importing this module neither imports
``pyplot`` nor switches matplotlib's global backend, so notebooks that import fedjax_lite keep their inline plots.
"""

from __future__ import annotations

import os
from typing import Sequence

from matplotlib.figure import Figure

ROUND_AXIS_LABEL = "round (from 0, as in metrics.jsonl)"
_AXIS_LABELS = {"round": ROUND_AXIS_LABEL, "systems/elapsed_hours": "simulated hours"}


def _series(history: Sequence[dict], key: str, x_key: str = "round") -> tuple[list[float], list[float]]:
  """``(x, y)`` of the records holding ``key``: x is the record's ``x_key`` (by default its round, from 0)."""
  xs, values = [], []
  for record in history:
    value, x = record.get(key), record.get(x_key)
    if isinstance(value, (int, float)) and isinstance(x, (int, float)):
      xs.append(x)
      values.append(float(value))
  return xs, values


def history_figure(history: Sequence[dict], *, title: str = "", extra_keys: Sequence[str] = (),
                   x_key: str = "round") -> Figure:
  """Loss (left) and accuracy (right) against each record's ``x_key``, plus one panel per ``extra_keys`` entry.

  ``x_key`` chooses the horizontal axis: ``'round'`` (default, numbered from 0), or any metric of the records,
  e.g. ``'systems/elapsed_hours'`` (simulated time, ``run_training(systems=...)``) for accuracy against simulated
  hours.
  """
  panels = [
      ("loss", ["client_work/train/loss", "evaluation/loss"]),
      ("accuracy", ["client_work/train/accuracy", "evaluation/accuracy"]),
  ] + [(key.split("/")[-1], [key]) for key in extra_keys]
  figure = Figure(figsize=(5 * len(panels), 3.6))
  axes = figure.subplots(1, len(panels), squeeze=False)
  for axis, (label, keys) in zip(axes[0], panels):
    for key in keys:
      xs, values = _series(history, key, x_key)
      if values:
        axis.plot(xs, values, marker="." if len(values) < 60 else None,
                  label="train (clients)" if key.startswith("client_work") else
                  ("test" if key.startswith("evaluation") else key))
    axis.set_xlabel(_AXIS_LABELS.get(x_key, x_key))
    axis.set_ylabel(label)
    axis.grid(alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
      axis.legend()
  if title:
    figure.suptitle(title)
  figure.tight_layout()
  return figure


def plot_history(history: Sequence[dict], path: str | os.PathLike, *, title: str = "",
                 extra_keys: Sequence[str] = (), x_key: str = "round") -> None:
  """Writes :func:`history_figure` of ``history`` to ``path`` (PNG)."""
  history_figure(history, title=title, extra_keys=extra_keys, x_key=x_key).savefig(path, dpi=110)
