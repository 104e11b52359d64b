"""Experiment tracking: writers that record each round's flat metrics as JSON lines, CSV or TensorBoard events.

:func:`~fedjax_lite.training.run_training` hands every round's flat metrics dict (``{'round': 3,
'client_work/train/loss': 0.41, 'evaluation/accuracy': 0.93, ...}``, see
:func:`~fedjax_lite.training.flatten_metrics`) to each tracker given in ``trackers=``, and closes them at the
end of the run. A tracker is any object with ``write(record)`` and ``close()`` (:class:`Tracker`):

* :class:`JsonlTracker` — one JSON object per line (the format of ``metrics.jsonl``);
* :class:`CsvTracker` — one row per round, a column per metric (opens in a spreadsheet or ``pandas.read_csv``);
  a metric first seen in a later round (evaluation every k rounds, say) widens the header, and rounds without it
  leave the cell empty;
* :class:`TensorBoardTracker` — TensorBoard event files (``tensorboard --logdir DIR``), one scalar per metric per
  round with the round number as the step, written with ``tensorboardX`` (protobuf only: no TensorFlow);
* :class:`WandbTracker` — Weights & Biases, when ``wandb`` is installed (an optional extra).

:func:`make_trackers` builds them from format names (the CLI's ``--log-format jsonl,csv,tensorboard``).
"""

from __future__ import annotations

import csv
import json
import math
import os
import uuid
from typing import Any, Iterable, Mapping, Protocol, Sequence, runtime_checkable

LOG_FORMATS = ("jsonl", "csv", "tensorboard")
"""Format names accepted by :func:`make_trackers` (the CLI adds ``png``, the plot written at the end)."""

FILE_NAMES = {"jsonl": "metrics.jsonl", "csv": "metrics.csv", "tensorboard": "tensorboard"}
"""Where :func:`make_trackers` writes each format inside its output directory."""


@runtime_checkable
class Tracker(Protocol):
  """Receives one flat metrics record per round (with its ``'round'``), then ``close()`` once."""

  def write(self, record: Mapping[str, Any]) -> None:
    ...

  def close(self) -> None:
    ...


def _check_record(record: Any) -> int:
  if not isinstance(record, Mapping):
    raise TypeError(f"record must be a mapping of metric names to values, got {type(record).__name__}.")
  round_num = record.get("round")
  if isinstance(round_num, bool) or not isinstance(round_num, int) or round_num < 0:
    raise ValueError(f"record must hold its 'round' as a non-negative int, got {round_num!r}.")
  return round_num


def _check_path(name: str, path: Any) -> str:
  if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
    raise TypeError(f"{name} must be a non-empty str or os.PathLike path, got {path!r}.")
  return os.fspath(path)


def _scalar(value: Any) -> float | None:
  """``value`` as a float when it is a real scalar (bools count as 0/1), else None."""
  if isinstance(value, bool):
    return float(value)
  if isinstance(value, (int, float)):
    return float(value)
  try:  # numpy / jax scalars
    import numpy as np

    array = np.asarray(value)
  except Exception:  # pragma: no cover - anything numpy cannot hold
    return None
  if array.ndim == 0 and array.dtype.kind in "biuf":
    return float(array)
  return None


class JsonlTracker:
  """Writes each record as one JSON line (``NaN``/``Infinity`` kept as Python's ``json`` writes them).

  Args:
    path: the file to (over)write; its directory must exist.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = _check_path("path", path)
    self._sink = open(self.path, "w")

  def write(self, record: Mapping[str, Any]) -> None:
    _check_record(record)
    self._sink.write(json.dumps(dict(record)) + "\n")
    self._sink.flush()

  def close(self) -> None:
    self._sink.close()


class CsvTracker:
  """Writes one CSV row per round, a column per metric, ``round`` first, then the metrics in order of appearance.

  A metric that first appears in a later round adds a column: the file is then rewritten with the wider header
  (so it is a valid CSV after every round), and earlier rows leave that cell empty. Lists are written as JSON;
  non-finite floats as ``nan``, ``inf``, ``-inf`` (which ``float()`` and ``pandas`` read back).

  Args:
    path: the file to (over)write; its directory must exist.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = _check_path("path", path)
    self.columns: list[str] = ["round"]
    self._rows: list[dict[str, str]] = []
    self._sink = open(self.path, "w", newline="")
    self._writer = csv.DictWriter(self._sink, fieldnames=self.columns, restval="")
    self._writer.writeheader()
    self._sink.flush()

  @staticmethod
  def _cell(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
      return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (list, tuple, dict)):
      return json.dumps(value)
    return str(value)

  def write(self, record: Mapping[str, Any]) -> None:
    _check_record(record)
    row = {str(key): self._cell(value) for key, value in record.items()}
    self._rows.append(row)
    new_columns = [key for key in row if key not in self.columns]
    if new_columns:  # rewrite the whole file under the wider header
      self.columns.extend(new_columns)
      self._sink.seek(0)
      self._sink.truncate()
      self._writer = csv.DictWriter(self._sink, fieldnames=self.columns, restval="")
      self._writer.writeheader()
      self._writer.writerows(self._rows)
    else:
      self._writer.writerow(row)
    self._sink.flush()

  def close(self) -> None:
    self._sink.close()


class TensorBoardTracker:
  """Writes each record's real scalars as TensorBoard scalar summaries (tag = metric name, step = round).

  Lists and strings are skipped (TensorBoard scalars hold one number); ``NaN``/``Inf`` are written as they are
  (TensorBoard shows them as such rather than as a finite number). The ``round`` itself is the step, not a scalar.
  Uses ``tensorboardX``'s event writer, which needs ``protobuf`` but not TensorFlow.

  Like the CSV and JSON-lines trackers, which rewrite their files, a new tracker replaces the event files already in
  ``log_dir`` (``overwrite=True``): a resumed run replays its checkpoint's rounds into its trackers, and the killed
  run's event file would otherwise show TensorBoard every round twice, and rounds after the checkpoint that the
  resumed run computes again.

  Args:
    log_dir: the directory receiving the ``events.out.tfevents.*`` file (created if missing).
    overwrite: delete the ``events.out.tfevents.*`` files directly in ``log_dir`` (nothing else) before writing.
  """

  def __init__(self, log_dir: str | os.PathLike, *, overwrite: bool = True):
    self.log_dir = _check_path("log_dir", log_dir)
    if not isinstance(overwrite, bool):
      raise TypeError(f"overwrite must be a bool, got {type(overwrite).__name__}.")
    if overwrite and os.path.isdir(self.log_dir):
      for name in os.listdir(self.log_dir):
        path = os.path.join(self.log_dir, name)
        if name.startswith("events.out.tfevents.") and os.path.isfile(path):
          os.remove(path)
    try:
      from tensorboardX import SummaryWriter
    except ImportError as error:  # pragma: no cover - a declared dependency
      raise ImportError("TensorBoard logging needs tensorboardX: pip install tensorboardX") from error
    # A unique suffix: tensorboardX names files by the second, and two writers in one second would collide.
    self._writer = SummaryWriter(logdir=self.log_dir, flush_secs=10, filename_suffix=f".{uuid.uuid4().hex[:12]}")

  def write(self, record: Mapping[str, Any]) -> None:
    step = _check_record(record)
    for key, value in record.items():
      if key == "round":
        continue
      number = _scalar(value)
      if number is not None:
        self._writer.add_scalar(str(key), number, global_step=step)
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class WandbTracker:
  """Logs each record's real scalars to Weights & Biases (``wandb.log(scalars, step=round)``); optional.

  ``wandb`` is imported only when this tracker is built (``pip install 'fedjax_lite[wandb]'``), so it costs nothing
  when unused. Lists and strings are skipped, as in :class:`TensorBoardTracker`.

  Args:
    project: the W&B project.
    name: the run's name (default: W&B's).
    config: the run's configuration (e.g. the CLI's flags), stored with the run.
    mode: W&B's mode: ``'online'``, ``'offline'`` (no network; sync later) or ``'disabled'``.
  """

  def __init__(self, project: str, *, name: str | None = None, config: Mapping[str, Any] | None = None,
               mode: str = "online"):
    if not isinstance(project, str) or not project:
      raise TypeError(f"project must be a non-empty str, got {project!r}.")
    if mode not in ("online", "offline", "disabled"):
      raise ValueError(f"mode must be 'online', 'offline' or 'disabled', got {mode!r}.")
    try:
      import wandb
    except ImportError as error:
      raise ImportError("Weights & Biases logging needs wandb: pip install 'fedjax_lite[wandb]'") from error
    self._run = wandb.init(project=project, name=name, config=dict(config or {}), mode=mode)

  def write(self, record: Mapping[str, Any]) -> None:
    step = _check_record(record)
    scalars = {}
    for key, value in record.items():
      number = _scalar(value) if key != "round" else None
      if number is not None:
        scalars[str(key)] = number
    self._run.log(scalars, step=step)

  def close(self) -> None:
    self._run.finish()


def parse_log_formats(formats: str | Iterable[str], allowed: Sequence[str] = LOG_FORMATS) -> tuple[str, ...]:
  """``'jsonl,csv'`` or ``['jsonl', 'csv']`` -> ``('jsonl', 'csv')``: checked, duplicates dropped, order kept.

  Raises:
    ValueError: naming the unknown format and the allowed ones, or when no format is given.
  """
  if isinstance(formats, str):
    names = [name.strip() for name in formats.split(",")]
  else:
    names = [str(name).strip() for name in formats]
  names = [name for name in names if name]
  if not names:
    raise ValueError(f"log formats must name at least one of {', '.join(allowed)}.")
  unknown = [name for name in names if name not in allowed]
  if unknown:
    raise ValueError(f"unknown log format {unknown[0]!r}: allowed are {', '.join(allowed)} (comma-separated).")
  return tuple(dict.fromkeys(names))


def make_trackers(formats: str | Iterable[str], output_dir: str | os.PathLike) -> list[Tracker]:
  """Trackers for ``formats`` (names from :data:`LOG_FORMATS`) writing under ``output_dir`` (see FILE_NAMES).

  Example:
    >>> import tempfile, os
    >>> directory = tempfile.mkdtemp()
    >>> trackers = make_trackers("jsonl,csv", directory)
    >>> for tracker in trackers:
    ...   tracker.write({"round": 0, "client_work/train/loss": 2.5})
    ...   tracker.close()
    >>> sorted(os.listdir(directory))
    ['metrics.csv', 'metrics.jsonl']
    >>> open(os.path.join(directory, "metrics.csv")).read().splitlines()
    ['round,client_work/train/loss', '0,2.5']
  """
  names = parse_log_formats(formats)
  directory = _check_path("output_dir", output_dir)
  os.makedirs(directory, exist_ok=True)
  builders = {"jsonl": JsonlTracker, "csv": CsvTracker, "tensorboard": TensorBoardTracker}
  return [builders[name](os.path.join(directory, FILE_NAMES[name])) for name in names]
