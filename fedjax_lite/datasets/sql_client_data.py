"""Reads the reference's current on-disk format: SQLite with one serialized ``tf.train.Example`` per row.

TFF's ``SqlClientData`` files (``emnist_all.sqlite``, ``shakespeare.sqlite``, ``stackoverflow.sqlite``,
``cifar100.sqlite``) hold two tables ::

  examples(split_name TEXT, client_id TEXT, serialized_example_proto BLOB)
  client_metadata(client_id TEXT, split_name TEXT, num_examples INTEGER)

:func:`convert_sql_split` converts one split into the memory-mapped cache of :mod:`.array_cache`, clients in
sorted id order and a client's examples in row order (as the reference reads them). With a ``client_metadata``
table (TFF always writes one) the layout is known up front and the file is read once: blobs stream in row
order, each row goes to its client's next free slot, and the counts must end up exactly those of the table.
Without it a first pass reads the client ids only. Blobs are decoded in batches
(:class:`.example_batch.BatchDecoder`) and written straight into preallocated memmaps, so memory stays bounded
by a chunk whatever the file's size. Any SQLite or proto error, a ``client_metadata`` count that is not a
positive integer, a value the spec's dtype or classes cannot hold, or rows that disagree with
``client_metadata`` (a truncated file), becomes a :class:`~.errors.DatasetFormatError` naming the file, the
split and the row or client, and the half-written cache is removed.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from fedjax_lite.datasets.array_cache import RaggedBytes, SplitWriter
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
                      cache_directory: str | os.PathLike, *, source: Mapping[str, Any]) -> None:
  """Converts split ``split_name`` of a TFF SQLite file into a cache directory.

  Args:
    path: the ``.sqlite`` file.
    split_name: e.g. ``'digits_only_train'`` (EMNIST), ``'train'``.
    spec: feature name -> :class:`FeatureSpec`; other features of the protos are ignored.
    cache_directory: where the converted split goes (written atomically).
    source: the source's identity, recorded in the cache's manifest (:func:`.source_identity.identify`).

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
    _convert(connection, path, split_name, spec, Path(cache_directory), source)
  except sqlite3.Error as error:
    raise _corrupt(path, str(error)) from None
  finally:
    connection.close()


def _metadata_counts(connection: sqlite3.Connection, path: Path, split_name: str) -> dict[str, int]:
  has_metadata = connection.execute(
      "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'client_metadata'").fetchone()[0]
  if not has_metadata:
    return {}
  counts = {}
  for client_id, num_examples in connection.execute(
      "SELECT client_id, num_examples FROM client_metadata WHERE split_name = ?", (split_name,)).fetchall():
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
      raise DatasetFormatError(
          f"{path}: table client_metadata gives client {str(client_id)!r} of split {split_name!r} num_examples "
          f"{num_examples!r} ({type(num_examples).__name__}); expected a positive INTEGER, the client's number of "
          f"rows in table examples.")
    counts[str(client_id)] = num_examples
  return counts


def _layout_from_rows(connection: sqlite3.Connection, path: Path, split_name: str,
                      expected: dict[str, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """First pass over ``(client_id)`` only: client ids, client offsets and every row's storage slot."""
  rows = connection.execute(
      "SELECT client_id FROM examples WHERE split_name = ? ORDER BY rowid", (split_name,)).fetchall()
  if not rows:
    available = [r[0] for r in connection.execute("SELECT DISTINCT split_name FROM examples")]
    raise DatasetFormatError(f"{path} has no examples in split {split_name!r}; it holds splits {sorted(available)}.")
  client_ids, row_client_index = np.unique(np.array([c for (c,) in rows], dtype=object).astype(str),
                                           return_inverse=True)
  counts = np.bincount(row_client_index, minlength=client_ids.size)
  if expected and expected != dict(zip(client_ids.tolist(), counts.tolist())):
    raise _inconsistent(path, split_name)
  storage_order = np.argsort(row_client_index, kind="stable")  # storage slot -> row
  destination = np.empty_like(storage_order)
  destination[storage_order] = np.arange(storage_order.size)  # row -> storage slot
  return client_ids, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), destination


def _inconsistent(path: Path, split_name: str) -> DatasetFormatError:
  return DatasetFormatError(
      f"{path}: split {split_name!r} has example counts that disagree with its client_metadata table; the file is "
      f"probably truncated or corrupt: delete it and download it again.")


def _convert(connection: sqlite3.Connection, path: Path, split_name: str, spec: Mapping[str, FeatureSpec],
             cache_directory: Path, source: Mapping[str, Any]) -> None:
  expected = _metadata_counts(connection, path, split_name)
  if expected:  # one pass: the table gives the layout, each row goes to its client's next free slot
    client_ids = np.array(sorted(expected))
    counts = np.array([expected[c] for c in client_ids.tolist()], np.int64)
    client_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    index_of = {c: k for k, c in enumerate(client_ids.tolist())}
    destination = None
  else:  # two passes: client ids first (no blobs), then the blobs
    client_ids, client_offsets, destination = _layout_from_rows(connection, path, split_name, expected)
  num_rows = int(client_offsets[-1])
  next_slot = client_offsets[:-1].copy()
  slots_in_row_order = np.empty(num_rows, np.int64)

  fixed = {name: s for name, s in spec.items() if s.kind != "bytes"}
  text = [name for name, s in spec.items() if s.kind == "bytes"]
  decoder = BatchDecoder(spec, where=f"{path}, split {split_name!r}")
  with SplitWriter(cache_directory, client_ids=tuple(client_ids.tolist()), client_offsets=client_offsets,
                   source=source) as writer:
    outputs = {name: writer.allocate(name, s.shape, s.dtype) for name, s in fixed.items()}
    text_values: dict[str, list[bytes]] = {name: [] for name in text}
    cursor = connection.execute(
        "SELECT client_id, serialized_example_proto FROM examples WHERE split_name = ? ORDER BY rowid",
        (split_name,))
    row = 0
    while True:
      chunk = cursor.fetchmany(_CHUNK)
      if not chunk:
        break
      if row + len(chunk) > num_rows:
        raise _inconsistent(path, split_name)
      blobs = [blob for _, blob in chunk]
      clients_of_rows = [str(c) for c, _ in chunk]
      for offset, blob in enumerate(blobs):
        if not isinstance(blob, bytes):
          raise DatasetFormatError(f"{path}, split {split_name!r}: row {row + offset} (client "
                                   f"{clients_of_rows[offset]!r}) holds {type(blob).__name__}, not a serialized "
                                   f"tf.train.Example (a BLOB).")
      if destination is not None:
        slots = destination[row:row + len(chunk)]
      else:
        try:
          clients = np.fromiter((index_of[c] for c in clients_of_rows), np.int64, len(chunk))
        except KeyError:
          raise _inconsistent(path, split_name) from None
        order = np.argsort(clients, kind="stable")
        sorted_clients = clients[order]
        first = np.searchsorted(sorted_clients, sorted_clients, side="left")
        slots = np.empty(len(chunk), np.int64)
        slots[order] = next_slot[sorted_clients] + (np.arange(len(chunk)) - first)
        next_slot += np.bincount(clients, minlength=client_ids.size)
        if np.any(next_slot > client_offsets[1:]):
          raise _inconsistent(path, split_name)
      slots_in_row_order[row:row + len(chunk)] = slots
      _, texts = decoder.decode(blobs, first_row=row, out=outputs, slots=slots, clients=clients_of_rows)
      for name in text:
        text_values[name].extend(texts[name])
      row += len(chunk)
    if row == 0:
      available = [r[0] for r in connection.execute("SELECT DISTINCT split_name FROM examples")]
      raise DatasetFormatError(f"{path} has no examples in split {split_name!r}; it holds splits {sorted(available)}.")
    if row != num_rows:
      raise _inconsistent(path, split_name)
    storage_order = np.argsort(slots_in_row_order)  # storage slot -> row
    for name in text:
      writer.put_ragged(name, RaggedBytes.from_list(text_values[name]).take(storage_order))
