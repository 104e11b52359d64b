"""The converted-array cache: one split of a federated dataset as memory-mapped CSR ``.npy`` files.

Parsing the reference's files (one protobuf per SQLite row, or one HDF5 group per client) takes minutes for
EMNIST's 3,400 clients; reading the result back must take seconds. So a split is converted once into a
directory ::

  manifest.json          format version, the source file's fingerprint, features, sizes (written last)
  client_ids.json        the clients' ids in storage order
  client_offsets.npy     int64 [num_clients + 1]: client k owns examples client_offsets[k]:client_offsets[k+1]
  <feature>.npy          a fixed-size feature, [num_examples, *shape]
  <feature>.values.npy   a variable-length bytes feature (text): all examples' bytes concatenated, uint8
  <feature>.offsets.npy  ... and int64 [num_examples + 1] boundaries of each example's bytes

which :func:`open_split` memory-maps read-only (``np.load(mmap_mode='r')``): a warm load touches only the
headers, and pages are read when a round packs its clients. :class:`SplitWriter` builds the directory under a
temporary name beside its destination and renames it into place only when complete (``os.replace`` is atomic
on one file system), so an interrupted or failed conversion never leaves a half-written cache behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = ["RaggedBytes", "RawSplit", "SplitWriter", "open_split", "source_fingerprint", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_MANIFEST = "manifest.json"


@dataclasses.dataclass(frozen=True, eq=False)
class RaggedBytes:
  """Variable-length byte strings in CSR form: example ``i`` is ``values[offsets[i]:offsets[i + 1]]``."""

  values: np.ndarray
  offsets: np.ndarray

  def __len__(self) -> int:
    return self.offsets.shape[0] - 1

  def __getitem__(self, index: int) -> bytes:
    return self.values[self.offsets[index]:self.offsets[index + 1]].tobytes()

  @property
  def lengths(self) -> np.ndarray:
    return np.diff(self.offsets)

  @classmethod
  def from_list(cls, items: list[bytes]) -> "RaggedBytes":
    lengths = np.fromiter((len(item) for item in items), np.int64, len(items))
    values = np.frombuffer(b"".join(items), np.uint8)
    return cls(values, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))

  def take(self, rows: np.ndarray) -> "RaggedBytes":
    """The examples ``rows`` (an int array), concatenated in that order; vectorized over bytes."""
    rows = np.asarray(rows, np.int64)
    starts, lengths = self.offsets[rows], self.lengths[rows]
    new_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    source = np.repeat(starts - new_offsets[:-1], lengths) + np.arange(new_offsets[-1], dtype=np.int64)
    return RaggedBytes(self.values[source], new_offsets)


@dataclasses.dataclass(frozen=True, eq=False)
class RawSplit:
  """One split as stored by the reference, features under the reference's names (e.g. ``pixels``, ``label``).

  Attributes:
    client_ids: the clients' ids in storage order (sorted).
    client_offsets: int64 ``[num_clients + 1]``.
    arrays: fixed-size features, ``[num_examples, ...]``.
    ragged: variable-length bytes features.
  """

  client_ids: tuple[str, ...]
  client_offsets: np.ndarray
  arrays: Mapping[str, np.ndarray]
  ragged: Mapping[str, RaggedBytes]

  @property
  def num_examples(self) -> int:
    return int(self.client_offsets[-1])

  @property
  def num_clients(self) -> int:
    return len(self.client_ids)


def source_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
  """What identifies a source file's version cheaply: its name, size and modification time."""
  stat = os.stat(path)
  return {"name": os.path.basename(os.fspath(path)), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _load(path: Path) -> np.ndarray:
  array = np.load(path, mmap_mode="r", allow_pickle=False)
  return array


def open_split(directory: str | os.PathLike) -> tuple[RawSplit, dict[str, Any]] | None:
  """Memory-maps a converted split; ``None`` when ``directory`` holds no complete cache of this format.

  Returns:
    ``(split, manifest)``.
  """
  directory = Path(directory)
  try:
    manifest = json.loads((directory / _MANIFEST).read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
      return None
    client_ids = tuple(json.loads((directory / "client_ids.json").read_text()))
    client_offsets = _load(directory / "client_offsets.npy")
    arrays, ragged = {}, {}
    for name, info in manifest["features"].items():
      if info["kind"] == "fixed":
        arrays[name] = _load(directory / f"{name}.npy")
      else:
        ragged[name] = RaggedBytes(_load(directory / f"{name}.values.npy"), _load(directory / f"{name}.offsets.npy"))
  except (OSError, ValueError, KeyError, TypeError):
    return None
  num_examples = int(manifest["num_examples"])
  consistent = (len(client_ids) == manifest["num_clients"] and client_offsets.shape == (len(client_ids) + 1,)
                and all(a.shape[0] == num_examples for a in arrays.values())
                and all(len(r) == num_examples and r.values.shape[0] == r.offsets[-1] for r in ragged.values()))
  if not consistent:
    return None
  return RawSplit(client_ids, client_offsets, arrays, ragged), manifest


class SplitWriter:
  """Builds a split's cache directory atomically.

  Use as a context manager: ``allocate`` fixed-size features (writable ``.npy`` memmaps to fill) and
  ``put_ragged`` text features, then leave the block; on success the temporary directory is renamed to
  ``directory`` (replacing an older cache), on any exception it is deleted.
  """

  def __init__(self, directory: str | os.PathLike, *, client_ids: tuple[str, ...], client_offsets: np.ndarray,
               source: Mapping[str, Any]):
    self.directory = Path(directory)
    self.client_ids = tuple(client_ids)
    self.client_offsets = np.asarray(client_offsets, np.int64)
    self.source = dict(source)
    self.features: dict[str, dict[str, Any]] = {}
    self._arrays: dict[str, np.ndarray] = {}
    self._temp: Path | None = None

  def __enter__(self) -> "SplitWriter":
    self.directory.parent.mkdir(parents=True, exist_ok=True)
    self._temp = self.directory.parent / f".{self.directory.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    self._temp.mkdir()
    return self

  @property
  def num_examples(self) -> int:
    return int(self.client_offsets[-1])

  def allocate(self, name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A writable ``[num_examples, *shape]`` memmap for feature ``name``."""
    array = np.lib.format.open_memmap(self._temp / f"{name}.npy", mode="w+", dtype=np.dtype(dtype),
                                      shape=(self.num_examples, *shape))
    self._arrays[name] = array
    self.features[name] = {"kind": "fixed", "dtype": np.dtype(dtype).str, "shape": list(shape)}
    return array

  def put_ragged(self, name: str, ragged: RaggedBytes) -> None:
    """Stores a variable-length bytes feature (already in storage order)."""
    if len(ragged) != self.num_examples:
      raise ValueError(f"feature {name!r} has {len(ragged)} examples, expected {self.num_examples}.")
    np.save(self._temp / f"{name}.values.npy", np.ascontiguousarray(ragged.values, np.uint8))
    np.save(self._temp / f"{name}.offsets.npy", np.ascontiguousarray(ragged.offsets, np.int64))
    self.features[name] = {"kind": "ragged"}

  def __exit__(self, exc_type, exc, traceback) -> bool:
    temp, self._temp = self._temp, None
    if exc_type is not None:
      self._arrays.clear()
      shutil.rmtree(temp, ignore_errors=True)
      return False
    try:
      for array in self._arrays.values():
        array.flush()
      self._arrays.clear()
      np.save(temp / "client_offsets.npy", self.client_offsets)
      (temp / "client_ids.json").write_text(json.dumps(list(self.client_ids)))
      manifest = {"format_version": FORMAT_VERSION, "source": self.source, "features": self.features,
                  "num_examples": self.num_examples, "num_clients": len(self.client_ids)}
      (temp / _MANIFEST).write_text(json.dumps(manifest, indent=1))
      stale = None
      if self.directory.exists():
        stale = self.directory.parent / f".{self.directory.name}.stale-{uuid.uuid4().hex[:8]}"
        os.replace(self.directory, stale)
      os.replace(temp, self.directory)
      if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)
    except BaseException:
      shutil.rmtree(temp, ignore_errors=True)
      raise
    return False
