"""Where the reference's dataset files come from, and how one split is found, converted once and memory-mapped.

:func:`load_raw_split` is the loaders' single entry point. For a split it looks, in order, in ``data_dir`` (when
given) and in the cache root (:func:`~.download.cache_root`, or ``cache_dir``) for

1. the reference's current SQLite file under its own name (e.g. ``emnist_all.sqlite``), or its ``.lzma`` as TFF
   ships it (decompressed once into the cache root);
2. the legacy HDF5 file of the split (e.g. ``fed_emnist_digitsonly_train.h5``), or its ``.tar.bz2`` archive
   (extracted once into the cache root);
3. with ``download=True``, the SQLite ``.lzma`` from the reference's URL (sha256-checked where known);

and converts what it found into ``<cache root>/arrays/<dataset>/<split>/`` (:mod:`.array_cache`), unless a
complete conversion of the same file (same name, size and modification time) is already there. A converted
split stays usable after its source file is deleted. When nothing is found a
:class:`~.errors.DatasetNotFoundError` says which files to put where and where they come from.

Checksums: TFF's current loaders publish no checksums for the ``.sqlite.lzma`` files; the digests below for
EMNIST, Shakespeare and CIFAR-100 are those recorded by FedJAX's downloader and by other public projects that
pin the same files (sizes agree), and the legacy archives' digests are the ones TFF's own loaders checked.
Where no digest is known (``sha256=None``) the download is not checked; the message says so.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Mapping

from fedjax_lite.datasets import download as download_lib
from fedjax_lite.datasets.array_cache import RawSplit, open_split, source_fingerprint
from fedjax_lite.datasets.errors import DatasetNotFoundError
from fedjax_lite.datasets.feature_spec import FeatureSpec
from fedjax_lite.datasets.hdf5_client_data import convert_hdf5_split
from fedjax_lite.datasets.sql_client_data import convert_sql_split

__all__ = ["RemoteFile", "DatasetSource", "load_raw_split", "find_file", "TFF_URL"]

TFF_URL = "https://storage.googleapis.com/tff-datasets-public/"


@dataclasses.dataclass(frozen=True)
class RemoteFile:
  """A file as the reference publishes it: its name, URL and sha256 (``None`` where none is published)."""

  name: str
  url: str
  sha256: str | None = None

  def describe(self) -> str:
    checksum = f"sha256 {self.sha256}" if self.sha256 else "no published checksum"
    return f"{self.url}, {checksum}"


@dataclasses.dataclass(frozen=True)
class DatasetSource:
  """How one dataset's split is stored by the reference.

  Attributes:
    title: human-readable name for messages, e.g. ``'Federated EMNIST (digits only)'``.
    cache_key: folder under ``arrays/`` of the cache root, e.g. ``'emnist_digits'``.
    sqlite: the current format's ``<name>.sqlite.lzma``.
    sql_split: the SQL ``split_name`` of this split.
    spec: the features to read.
    hdf5_file: the legacy per-split ``.h5`` file name, or ``None``.
    hdf5_archive: the legacy archive holding it, or ``None``.
  """

  title: str
  cache_key: str
  sqlite: RemoteFile
  sql_split: str
  spec: Mapping[str, FeatureSpec]
  hdf5_file: str | None = None
  hdf5_archive: RemoteFile | None = None

  @property
  def sqlite_name(self) -> str:
    return self.sqlite.name[:-len(".lzma")] if self.sqlite.name.endswith(".lzma") else self.sqlite.name


def _search_dirs(data_dir: Path | None, cache: Path) -> list[Path]:
  dirs = [data_dir] if data_dir is not None else []
  return dirs + ([cache] if cache not in dirs else [])


def find_file(name: str, dirs: list[Path]) -> Path | None:
  """The first ``dir/name`` that exists, or ``None``."""
  for directory in dirs:
    candidate = directory / name
    if candidate.is_file():
      return candidate
  return None


def _check_dir(name: str, value) -> Path | None:
  if value is None:
    return None
  if not isinstance(value, (str, os.PathLike)):
    raise TypeError(f"{name} must be a path (str or os.PathLike) or None, got {type(value).__name__}.")
  return Path(value).expanduser()


def not_found_message(source: DatasetSource, split: str, dirs: list[Path], offer_download: bool = True) -> str:
  where = " or ".join(str(d) for d in dirs)
  legacy = ""
  if source.hdf5_file and source.hdf5_archive:
    legacy = (f", or the legacy {source.hdf5_file} (inside {source.hdf5_archive.name}, from "
              f"{source.hdf5_archive.describe()})")
  return (f"{source.title}, split {split!r}, is not on disk: no {source.sqlite_name} nor {source.sqlite.name} in "
          f"{where}. Put {source.sqlite.name} (TFF's current format, from {source.sqlite.describe()}) or its "
          f"decompressed {source.sqlite_name}{legacy} into {dirs[0]}"
          + (", or pass download=True to fetch it." if offer_download else "."))


def load_raw_split(source: DatasetSource, split: str, *, data_dir=None, cache_dir=None,
                   download: bool = False) -> RawSplit:
  """Finds, converts (once) and memory-maps one split; see the module docstring for the search order.

  Args:
    source: the dataset's :class:`DatasetSource` for this split.
    split: the split's name in the cache (``'train'``, ``'test'``, ...).
    data_dir: a folder holding the reference's files under their own names, or ``None``.
    cache_dir: the cache root, or ``None`` for :func:`~.download.cache_root`.
    download: fetch the SQLite file from the reference's URL when it is not on disk.

  Raises:
    DatasetNotFoundError: nothing found and ``download`` is false or the download failed.
    DatasetFormatError: a file found is truncated or corrupt (no cache is left behind).
  """
  if not isinstance(download, bool):
    raise TypeError(f"download must be a bool, got {type(download).__name__}.")
  data_dir = _check_dir("data_dir", data_dir)
  cache = _check_dir("cache_dir", cache_dir) or download_lib.cache_root()
  if data_dir is not None and not data_dir.is_dir():
    raise DatasetNotFoundError(f"data_dir {data_dir} is not a folder. It should hold {source.sqlite.name} (from "
                               f"{source.sqlite.describe()}) or its decompressed {source.sqlite_name}.")
  dirs = _search_dirs(data_dir, cache)
  converted_dir = cache / "arrays" / source.cache_key / split
  cached = open_split(converted_dir)
  if cached is not None:
    split_data, manifest = cached
    recorded = manifest.get("source", {})
    origin = find_file(recorded.get("name", ""), dirs) if recorded.get("name") else None
    same_features = set(manifest.get("features", {})) == set(source.spec)
    if same_features and (origin is None or source_fingerprint(origin) == recorded):
      return split_data

  sqlite_path = find_file(source.sqlite_name, dirs)
  if sqlite_path is None:
    compressed = find_file(source.sqlite.name, dirs)
    if compressed is not None:
      sqlite_path = download_lib.decompress_lzma(compressed, cache / source.sqlite_name)
  hdf5_path = None
  if sqlite_path is None and source.hdf5_file:
    hdf5_path = find_file(source.hdf5_file, dirs)
    if hdf5_path is None and source.hdf5_archive is not None:
      archive = find_file(source.hdf5_archive.name, dirs)
      if archive is not None:
        hdf5_path = download_lib.extract_tar(archive, cache, [source.hdf5_file])[0]
  if sqlite_path is None and hdf5_path is None:
    if not download:
      raise DatasetNotFoundError(not_found_message(source, split, dirs))
    try:
      compressed = download_lib.download_file(source.sqlite.url, cache / source.sqlite.name,
                                              sha256=source.sqlite.sha256)
    except DatasetNotFoundError as error:
      raise DatasetNotFoundError(f"{error} {not_found_message(source, split, dirs, False)}") from None
    sqlite_path = download_lib.decompress_lzma(compressed, cache / source.sqlite_name)

  if sqlite_path is not None:
    convert_sql_split(sqlite_path, source.sql_split, source.spec, converted_dir)
  else:
    convert_hdf5_split(hdf5_path, source.spec, converted_dir)
  opened = open_split(converted_dir)
  if opened is None:  # pragma: no cover - the writer just produced it
    raise RuntimeError(f"the converted cache {converted_dir} could not be read back.")
  return opened[0]
