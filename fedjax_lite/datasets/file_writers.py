"""Writers of the reference's on-disk formats, for tests and benchmarks (no TensorFlow, no h5py for SQLite).

They produce byte-for-byte the layouts the loaders read: TFF's SQLite client data (``examples`` and
``client_metadata`` tables, one serialized ``tf.train.Example`` per row, rows of a client interleaved with
other clients' as in a real file), the legacy HDF5 layout ``/examples/<client_id>/<feature>``, and LEAF JSON.
"""

from __future__ import annotations

import json
import os
import sqlite3
from typing import Any, Iterable, Mapping

import numpy as np

from fedjax_lite.datasets.example_proto import encode_example

__all__ = ["write_tff_sqlite", "write_tff_hdf5", "write_leaf_json"]

Clients = Mapping[str, Mapping[str, Any]]  # client id -> feature -> per-example values (array or list of bytes)


def _rows(clients: Clients) -> Iterable[tuple[str, dict[str, Any]]]:
  """Examples as ``(client_id, features)``, round-robin over clients (so one client's rows are not contiguous)."""
  sizes = {cid: len(next(iter(features.values()))) for cid, features in clients.items()}
  for position in range(max(sizes.values())):
    for cid, features in clients.items():
      if position < sizes[cid]:
        yield cid, {name: values[position] for name, values in features.items()}


def write_tff_sqlite(path: str | os.PathLike, splits: Mapping[str, Clients], *, chunk: int = 4096) -> None:
  """Writes TFF's SQLite client-data file.

  Args:
    path: the ``.sqlite`` file to create.
    splits: split name -> client id -> feature -> per-example values.
    chunk: rows per ``executemany``.
  """
  connection = sqlite3.connect(os.fspath(path))
  try:
    connection.execute("CREATE TABLE examples (split_name TEXT NOT NULL, client_id TEXT NOT NULL, "
                       "serialized_example_proto BLOB NOT NULL)")
    connection.execute("CREATE TABLE client_metadata (client_id TEXT NOT NULL, split_name TEXT NOT NULL, "
                       "num_examples INTEGER NOT NULL)")
    for split_name, clients in splits.items():
      batch = []
      for cid, features in _rows(clients):
        batch.append((split_name, cid, encode_example(features)))
        if len(batch) >= chunk:
          connection.executemany("INSERT INTO examples VALUES (?, ?, ?)", batch)
          batch = []
      if batch:
        connection.executemany("INSERT INTO examples VALUES (?, ?, ?)", batch)
      connection.executemany("INSERT INTO client_metadata VALUES (?, ?, ?)",
                             [(cid, split_name, len(next(iter(f.values())))) for cid, f in clients.items()])
    connection.commit()
  finally:
    connection.close()


def write_tff_hdf5(path: str | os.PathLike, clients: Clients) -> None:
  """Writes the legacy HDF5 layout ``/examples/<client_id>/<feature>`` (needs h5py)."""
  import h5py  # pylint: disable=import-outside-toplevel
  with h5py.File(path, "w") as file:
    group = file.create_group("examples")
    for cid, features in clients.items():
      client = group.create_group(cid)
      for name, values in features.items():
        if isinstance(values, (list, tuple)) and values and isinstance(values[0], (bytes, str)):
          client.create_dataset(name, data=np.array([v.encode() if isinstance(v, str) else v for v in values],
                                                    dtype=h5py.special_dtype(vlen=bytes)))
        else:
          client.create_dataset(name, data=np.asarray(values))


def write_leaf_json(path: str | os.PathLike, clients: Mapping[str, Mapping[str, Any]]) -> None:
  """Writes one LEAF JSON file: ``{"users", "num_samples", "user_data": {id: {"x", "y"}}}``."""
  users = list(clients)
  content = {
      "users": users,
      "num_samples": [len(clients[u]["y"]) for u in users],
      "user_data": {u: {"x": np.asarray(clients[u]["x"]).tolist() if not isinstance(clients[u]["x"], list)
                        else clients[u]["x"],
                        "y": np.asarray(clients[u]["y"]).tolist() if not isinstance(clients[u]["y"], list)
                        else clients[u]["y"]} for u in users},
  }
  with open(path, "w", encoding="utf-8") as file:
    json.dump(content, file)
