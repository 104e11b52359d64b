"""A user's own client-systems trace, from CSV or JSON, as :class:`~fedjax_lite.systems.ClientSystems`.

One record per client, with these fields (units: seconds and bits per second):

* ``client_id`` (required): matched to the population's client ids when ``client_ids`` is given;
* ``seconds_per_example`` and/or ``seconds_per_step`` (at least one; a missing one is 0);
* ``download_bits_per_second`` (required, > 0) and ``upload_bits_per_second`` (default: the download rate);
* availability windows (optional): in CSV an ``availability`` column of ``start-end`` pairs in seconds separated by
  ``;`` (e.g. ``0-3600;7200-9000``), in JSON a ``windows`` list of ``[start, end]`` pairs. An empty cell (or a
  missing ``windows``) means always online; when no record has windows the trace is :class:`AlwaysOn`.

CSV has a header row naming the columns. JSON is either a list of client objects or
``{"period_seconds": 86400, "clients": [...]}``; ``period_seconds`` (also an argument) makes the windows repeat.

FedScale's traces (Lai et al. 2022) convert as: ``seconds_per_example = 3 * computation / 1000`` (``computation``
is the inference latency in ms per sample; FedScale's simulator counts training as 3x inference),
``download_bits_per_second = upload_bits_per_second = 1000 * communication`` (kbit/s), and the
``client_behave_trace``'s ``active``/``inactive`` lists as windows with ``period_seconds = finish_time``.

Every problem is one :class:`TraceError` naming the file, the row (CSV line number, or JSON record index) and the
field.
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Sequence

import numpy as np

from fedjax_lite.core import validation
from fedjax_lite.systems.availability import AlwaysOn, AvailabilityWindows
from fedjax_lite.systems.population import ClientSystems

FIELDS = ("client_id", "seconds_per_example", "seconds_per_step", "download_bits_per_second",
          "upload_bits_per_second", "availability", "windows")


class TraceError(ValueError):
  """A malformed systems trace: the message names the file, the row and the field."""


def _number(value: Any, where: str, field: str, *, positive: bool) -> float:
  try:
    number = float(value)
  except (TypeError, ValueError):
    raise TraceError(f"{where}: {field} must be a number, got {value!r}.") from None
  if not math.isfinite(number) or (number <= 0 if positive else number < 0):
    raise TraceError(f"{where}: {field} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}.")
  return number


def _windows_from_text(text: str, where: str) -> list[tuple[float, float]] | None:
  text = text.strip()
  if not text:
    return None
  windows = []
  for part in text.split(";"):
    bounds = part.strip().split("-")
    if len(bounds) != 2:
      raise TraceError(f"{where}: availability must be 'start-end' pairs in seconds separated by ';', got {part!r}.")
    windows.append((_number(bounds[0], where, "availability start", positive=False),
                    _number(bounds[1], where, "availability end", positive=False)))
  return windows


def _windows_from_json(value: Any, where: str) -> list[tuple[float, float]] | None:
  if value is None:
    return None
  if not isinstance(value, list):
    raise TraceError(f"{where}: windows must be a list of [start, end] pairs, got {type(value).__name__}.")
  windows = []
  for pair in value:
    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
      raise TraceError(f"{where}: each window must be a [start, end] pair, got {pair!r}.")
    windows.append((_number(pair[0], where, "window start", positive=False),
                    _number(pair[1], where, "window end", positive=False)))
  return windows


def _read_records(path: str) -> tuple[list[tuple[str, dict]], float | None]:
  """``[(where, record)]`` and the file's period."""
  extension = os.path.splitext(path)[1].lower()
  if extension not in (".csv", ".json"):
    raise TraceError(f"{path}: a systems trace must be a .csv or .json file.")
  try:
    handle = open(path, newline="" if extension == ".csv" else None)
  except OSError as error:
    raise TraceError(f"{path}: cannot read the systems trace ({error.strerror or error}).") from None
  with handle:
    if extension == ".csv":
      reader = csv.DictReader(handle)
      if reader.fieldnames is None:
        raise TraceError(f"{path}: empty file; a systems trace needs a header row and one row per client.")
      unknown = sorted(set(reader.fieldnames) - set(FIELDS) - {""})
      if unknown:
        raise TraceError(f"{path}, row 1 (header): unknown columns {unknown}; the columns are {list(FIELDS[:-1])}.")
      records = [(f"{path}, row {reader.line_num}", dict(row)) for row in reader]
      for where, row in records:
        if None in row:
          raise TraceError(f"{where}: more cells than header columns.")
        row["windows"] = _windows_from_text(row.pop("availability", "") or "", where)
      return records, None
    try:
      content = json.load(handle)
    except json.JSONDecodeError as error:
      raise TraceError(f"{path}, line {error.lineno}: not valid JSON ({error.msg}).") from None
  period = None
  if isinstance(content, dict):
    unknown = sorted(set(content) - {"clients", "period_seconds"})
    if unknown or "clients" not in content:
      raise TraceError(f"{path}: a JSON trace is a list of client records or {{'clients': [...], "
                       f"'period_seconds': ...}}; got keys {sorted(content)}.")
    if content.get("period_seconds") is not None:
      period = _number(content["period_seconds"], path, "period_seconds", positive=True)
    content = content["clients"]
  if not isinstance(content, list):
    raise TraceError(f"{path}: the clients must be a list of records, got {type(content).__name__}.")
  records = []
  for index, record in enumerate(content):
    where = f"{path}, record {index}"
    if not isinstance(record, dict):
      raise TraceError(f"{where}: a client record must be an object, got {type(record).__name__}.")
    unknown = sorted(set(record) - set(FIELDS) - {"availability"})
    if unknown:
      raise TraceError(f"{where}: unknown fields {unknown}; the fields are {[f for f in FIELDS if f != 'availability']}.")
    record = dict(record)
    record["windows"] = _windows_from_json(record.get("windows"), where)
    records.append((where, record))
  return records, period


def load_trace(path: str | os.PathLike, *, client_ids: Sequence[Any] | None = None,
               period_seconds: float | None = None) -> ClientSystems:
  """Reads a systems trace (module docstring) into :class:`~fedjax_lite.systems.ClientSystems`.

  Args:
    path: a ``.csv`` or ``.json`` file.
    client_ids: the population's client ids in storage order (``FederatedData.client_ids``): the result follows
      that order, every id must be in the trace, and the trace's other records are ignored. Default: the trace's
      records in file order.
    period_seconds: the windows repeat with this period (overrides the JSON's ``period_seconds``).

  Raises:
    TraceError: naming the file, the row and the field of the first problem found.
  """
  if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
    raise TypeError(f"path must be a non-empty str or os.PathLike, got {path!r}.")
  path = os.fspath(path)
  validation.check_positive("period_seconds", period_seconds, allow_none=True)
  records, file_period = _read_records(path)
  if not records:
    raise TraceError(f"{path}: the trace has no client records.")
  period = period_seconds if period_seconds is not None else file_period
  rows: dict[str, tuple[str, dict]] = {}
  for where, record in records:
    client_id = record.get("client_id")
    if client_id is None or str(client_id).strip() == "":
      raise TraceError(f"{where}: client_id is missing.")
    client_id = str(client_id).strip()
    if client_id in rows:
      raise TraceError(f"{where}: client_id {client_id!r} repeats {rows[client_id][0]}.")
    rows[client_id] = (where, record)
  if client_ids is None:
    order = list(rows)
  else:
    order = [str(client_id) for client_id in client_ids]
    missing = [client_id for client_id in order if client_id not in rows]
    if missing:
      raise TraceError(f"{path}: {len(missing)} client(s) of the population are not in the trace, e.g. "
                       f"{missing[:5]}.")
  fields = {name: [] for name in ("seconds_per_example", "seconds_per_step", "download_bits_per_second",
                                  "upload_bits_per_second")}
  windows = []
  for client_id in order:
    where, record = rows[client_id]
    where = f"{where} (client {client_id!r})"

    def given(name):
      value = record.get(name)
      return value is not None and str(value).strip() != ""

    if not (given("seconds_per_example") or given("seconds_per_step")):
      raise TraceError(f"{where}: give seconds_per_example or seconds_per_step (or both).")
    if not given("download_bits_per_second"):
      raise TraceError(f"{where}: download_bits_per_second is missing.")
    for name in ("seconds_per_example", "seconds_per_step"):
      fields[name].append(_number(record[name], where, name, positive=False) if given(name) else 0.0)
    download = _number(record["download_bits_per_second"], where, "download_bits_per_second", positive=True)
    fields["download_bits_per_second"].append(download)
    fields["upload_bits_per_second"].append(
        _number(record["upload_bits_per_second"], where, "upload_bits_per_second", positive=True)
        if given("upload_bits_per_second") else download)
    client_windows = record.get("windows")
    if client_windows is not None:
      for start, end in client_windows:
        if not start < end or (period is not None and end > period):
          raise TraceError(f"{where}: window [{start}, {end}) must have start < end"
                           + (f" <= period_seconds ({period})." if period is not None else "."))
    windows.append(client_windows)
  if all(client_windows is None for client_windows in windows):
    availability = AlwaysOn()
  else:
    always = [(0.0, period if period is not None else math.inf)]
    availability = AvailabilityWindows.from_windows(
        [always if client_windows is None else client_windows for client_windows in windows], period_seconds=period)
  return ClientSystems(**{name: np.asarray(values) for name, values in fields.items()}, availability=availability,
                       client_ids=tuple(order))
