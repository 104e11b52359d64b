"""Reads the reference's current on-disk format: SQLite with one serialized ``tf.train.Example`` per row.

TFF's ``SqlClientData`` files (``emnist_all.sqlite``, ``shakespeare.sqlite``, ``stackoverflow.sqlite``,
``cifar100.sqlite``) hold two tables ::

  examples(split_name TEXT, client_id TEXT, serialized_example_proto BLOB)
  client_metadata(client_id TEXT, split_name TEXT, num_examples INTEGER)

:func:`convert_sql_split` converts one split into the memory-mapped cache of :mod:`.array_cache` in two passes:
first the ``(rowid, client_id)`` pairs only (no blobs), from which every row's destination in the client-major
layout is known (clients in sorted id order, a client's examples in row order, as the reference reads them);
then the blobs, streamed in row order, decoded in batches (:class:`.example_batch.BatchDecoder`) and written in
chunks straight into preallocated memmaps, so memory stays bounded by a chunk whatever the file's size. The example
counts are checked against ``client_metadata`` when the table is present. Any SQLite or proto error becomes a
:class:`~.errors.DatasetFormatError` naming the file, and the half-written cache is removed.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Mapping

import numpy as np

from fedjax_lite.datasets.array_cache import RaggedBytes, SplitWriter, source_fingerprint
from fedjax_lite.datasets.errors import DatasetFormatError
from fedjax_lite.datasets.example_batch import BatchDecoder
from fedjax_lite.datasets.feature_spec import FeatureSpec

__all__ = ["convert_sql_split", "sql_split_names"]

_CHUNK = 8192


def _connect(path: Path) -> sqlite3.Connection:
  return sqlite3.connect(f"file:{os.fspath(path)}?mode=ro", uri=True)


def _corrupt(path: Path, detail: str) -> DatasetFormatError:
  return DatasetFormatError(
      f"{path} is not a readable TFF SQLite dataset ({detail}). The file is probably truncated or corrupt: "
      f"delete it and download it again."
  )


def sql_split_names(path: str | os.PathLike) -> list[str]:
  """The split names present in a TFF SQLite file."""
  path = Path(path)
  try:
    with _connect(path) as connection:
      return sorted(row[0] for row in connection.execute("SELECT DISTINCT split_name FROM examples"))
  except sqlite3.Error as error:
    raise _corrupt(path, str(error)) from None


def convert_sql_split(path: str | os.PathLike, split_name: str, spec: Mapping[str, FeatureSpec],
                      cache_directory: str | os.PathLike) -> None:
  """Converts split ``split_name`` of a TFF SQLite file into a cache directory.

  Args:
    path: the ``.sqlite`` file.
    split_name: e.g. ``'digits_only_train'`` (EMNIST), ``'train'``.
    spec: feature name -> :class:`FeatureSpec`; other features of the protos are ignored.
    cache_directory: where the converted split goes (written atomically).

  Raises:
    DatasetFormatError: the file is not a SQLite database of this layout, is truncated, lacks the split, or a
      row does not match ``spec``.
  """
  path = Path(path)
  try:
    connection = _connect(path)
  except sqlite3.Error as error:
    raise _corrupt(path, str(error)) from None
  try:
    _convert(connection, path, split_name, spec, Path(cache_directory))
  except sqlite3.Error as error:
    raise _corrupt(path, str(error)) from None
  finally:
    connection.close()


def _convert(connection: sqlite3.Connection, path: Path, split_name: str, spec: Mapping[str, FeatureSpec],
             cache_directory: Path) -> None:
  rows = connection.execute(
      "SELECT rowid, client_id FROM examples WHERE split_name = ? ORDER BY rowid", (split_name,)).fetchall()
  if not rows:
    available = [r[0] for r in connection.execute("SELECT DISTINCT split_name FROM examples")]
    raise DatasetFormatError(f"{path} has no examples in split {split_name!r}; it holds splits {sorted(available)}.")
  row_clients = np.array([client_id for _, client_id in rows], dtype=object).astype(str)
  client_ids, row_client_index = np.unique(row_clients, return_inverse=True)
  counts = np.bincount(row_client_index, minlength=client_ids.size)
  client_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
  storage_order = np.argsort(row_client_index, kind="stable")  # storage slot -> row
  destination = np.empty_like(storage_order)
  destination[storage_order] = np.arange(storage_order.size)  # row -> storage slot

  has_metadata = connection.execute(
      "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'client_metadata'").fetchone()[0]
  if has_metadata:
    expected = dict(connection.execute(
        "SELECT client_id, num_examples FROM client_metadata WHERE split_name = ?", (split_name,)).fetchall())
    found = dict(zip(client_ids.tolist(), counts.tolist()))
    if expected and expected != found:
      differing = sorted(set(expected) ^ set(found) | {c for c in found if expected.get(c) != found[c]})[:3]
      raise DatasetFormatError(
          f"{path}: split {split_name!r} has example counts that disagree with its client_metadata table "
          f"(e.g. clients {differing}); the file is probably truncated: delete it and download it again.")

  fixed = {name: s for name, s in spec.items() if s.kind != "bytes"}
  text = [name for name, s in spec.items() if s.kind == "bytes"]
  decoder = BatchDecoder(spec, where=f"{path}, split {split_name!r}")
  with SplitWriter(cache_directory, client_ids=tuple(client_ids.tolist()), client_offsets=client_offsets,
                   source=source_fingerprint(path)) as writer:
    outputs = {name: writer.allocate(name, s.shape, s.dtype) for name, s in fixed.items()}
    text_values: dict[str, list[bytes]] = {name: [] for name in text}
    cursor = connection.execute(
        "SELECT serialized_example_proto FROM examples WHERE split_name = ? ORDER BY rowid", (split_name,))
    row = 0
    while True:
      chunk = cursor.fetchmany(_CHUNK)
      if not chunk:
        break
      blobs = [blob for (blob,) in chunk]
      for offset, blob in enumerate(blobs):
        if not isinstance(blob, bytes):
          raise DatasetFormatError(f"{path}: row {row + offset} of split {split_name!r} holds no serialized proto.")
      arrays, texts = decoder.decode(blobs, first_row=row)
      slots = destination[row:row + len(blobs)]
      for name in fixed:
        outputs[name][slots] = arrays[name]
      for name in text:
        text_values[name].extend(texts[name])
      row += len(blobs)
    if row != storage_order.size:
      raise _corrupt(path, f"split {split_name!r} yielded {row} blobs for {storage_order.size} rows")
    for name in text:
      writer.put_ragged(name, RaggedBytes.from_list(text_values[name]).take(storage_order))
