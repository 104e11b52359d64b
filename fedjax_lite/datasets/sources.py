"""Where the reference's dataset files come from, and how one split is found, converted once and memory-mapped.

:func:`load_raw_split` is the loaders' single entry point. For a split it looks in ``data_dir`` (when given),
then in the cache root (:func:`~.download.cache_root`, or ``cache_dir``), and in each folder for, in order,

1. the reference's current SQLite file under its own name (e.g. ``emnist_all.sqlite``), or its ``.lzma`` as TFF
   ships it (decompressed once into ``<cache root>/unpacked/``);
2. the legacy HDF5 file of the split (e.g. ``fed_emnist_digitsonly_train.h5``), or its ``.tar.bz2`` archive
   (extracted once into ``<cache root>/unpacked/``);
3. with ``download=True``, the SQLite ``.lzma`` from the reference's URL (sha256-checked where known);

and converts the first file found into ``<cache root>/arrays/<dataset>/<split>/<source key>/``
(:mod:`.array_cache`). The cache is keyed by the source's identity (:mod:`.source_identity`): its folder by the
file's absolute path, its manifest by the file's size, time and sha256, so a cache made from one file is never
used for another (a ``data_dir`` holding another EMNIST gets its own cache; an empty one finds nothing). A
cache stays usable after its source file is deleted, for the same ``data_dir``. Every file of a cache is
checked against its CRC-32s when opened: a damaged cache is rebuilt from its source (with a warning), or
reported when the source is gone. When nothing is found a :class:`~.errors.DatasetNotFoundError` says which
files to put where and where they come from (and which other files have caches).

Checksums: TFF's current loaders publish no checksums for the ``.sqlite.lzma`` files; the digests below for
EMNIST, Shakespeare and CIFAR-100 are those recorded by FedJAX's downloader and by other public projects that
pin the same files (sizes agree), and the legacy archives' digests are the ones TFF's own loaders checked.
Where no digest is known (``sha256=None``) the download is not checked; the message says so.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

from fedjax_lite.datasets import download as download_lib
from fedjax_lite.datasets.array_cache import CacheDamagedError, RawSplit, open_split, record_source
from fedjax_lite.datasets.errors import DatasetFormatError, DatasetNotFoundError
from fedjax_lite.datasets.feature_spec import FeatureSpec
from fedjax_lite.datasets.hdf5_client_data import convert_hdf5_split
from fedjax_lite.datasets.source_identity import identify, same_source, source_key, unpacked
from fedjax_lite.datasets.sql_client_data import convert_sql_split

__all__ = ["RemoteFile", "DatasetSource", "load_raw_split", "find_first", "TFF_URL"]

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


def find_first(names: list[str], dirs: list[Path]) -> Path | None:
  """The first existing ``dir/name``, folders first: every name in ``dirs[0]``, then in ``dirs[1]``, ...

  A file in ``data_dir`` thus always wins over any in the cache root (whatever its kind).
  """
  for directory in dirs:
    for name in names:
      if (directory / name).is_file():
        return directory / name
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


def _candidates(source: DatasetSource) -> list[str]:
  """The file names that can hold ``source``'s split, in order of preference within one folder."""
  names = [source.sqlite_name, source.sqlite.name]
  if source.hdf5_file:
    names.append(source.hdf5_file)
    if source.hdf5_archive is not None:
      names.append(source.hdf5_archive.name)
  return names


def _spec_record(source: DatasetSource) -> dict[str, str]:
  return {name: spec.describe() for name, spec in source.spec.items()}


def _kept_cache(source: DatasetSource, split_root: Path, dirs: list[Path],
                download: bool) -> RawSplit | None:
  """The cache of a file that was in ``dirs`` and has since been deleted, if one is there and undamaged."""
  for directory in dirs:
    for name in _candidates(source):
      path = directory / name
      try:
        opened = open_split(split_root / source_key(path))
      except CacheDamagedError as error:
        if download:
          continue  # the download rebuilds it
        raise DatasetFormatError(
            f"{error} Its source {path} is no longer on disk, so it cannot be rebuilt: put the file back into "
            f"{directory} (or pass download=True), or delete {error.directory}.") from None
      if opened is None:
        continue
      split, manifest = opened
      recorded = manifest.get("source", {})
      if recorded.get("path") == str(path.resolve()) and recorded.get("spec") == _spec_record(source):
        return split
  return None


def _other_caches(split_root: Path) -> str:
  """The sources of the caches in ``split_root``, for the not-found message (they are not used)."""
  paths = []
  for manifest in sorted(split_root.glob("*/manifest.json")) if split_root.is_dir() else []:
    try:
      paths.append(json.loads(manifest.read_text())["source"]["path"])
    except (OSError, ValueError, KeyError, TypeError):
      continue
  if not paths:
    return ""
  folders = sorted({os.path.dirname(p) for p in paths})
  return (f" Converted caches of other files exist ({', '.join(paths[:3])}); they are never used for another "
          f"file: pass data_dir={folders[0]} to use one.")


def _remove_legacy_cache(split_root: Path) -> None:
  """Deletes a cache of format 1 (its files directly in ``<dataset>/<split>/``, made before caches were keyed by
  their source): this version cannot trust it, and it can hold gigabytes."""
  if (split_root / "manifest.json").is_file():
    for path in split_root.iterdir():
      if path.is_file():
        path.unlink(missing_ok=True)


def _convert(source: DatasetSource, path: Path, cache: Path, directory: Path, record: Mapping[str, Any]) -> None:
  """Converts the found file ``path`` (unpacking an archive first) into the cache folder ``directory``."""
  name = path.name
  if name == source.sqlite.name and name != source.sqlite_name:  # .lzma
    path = unpacked(path, cache, [source.sqlite_name],
                    lambda archive, folder: download_lib.decompress_lzma(archive, folder / source.sqlite_name))[0]
  elif source.hdf5_archive is not None and name == source.hdf5_archive.name:
    path = unpacked(path, cache, [source.hdf5_file],
                    lambda archive, folder: download_lib.extract_tar(archive, folder, [source.hdf5_file]))[0]
  if path.name == source.sqlite_name:
    convert_sql_split(path, source.sql_split, source.spec, directory, source=record)
  else:
    convert_hdf5_split(path, source.spec, directory, source=record)


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
    DatasetFormatError: a file found is truncated or corrupt (no cache is left behind), or the cache of a
      deleted source is damaged.
  """
  if not isinstance(download, bool):
    raise TypeError(f"download must be a bool, got {type(download).__name__}.")
  data_dir = _check_dir("data_dir", data_dir)
  cache = _check_dir("cache_dir", cache_dir) or download_lib.cache_root()
  if data_dir is not None and not data_dir.is_dir():
    raise DatasetNotFoundError(f"data_dir {data_dir} is not a folder. It should hold {source.sqlite.name} (from "
                               f"{source.sqlite.describe()}) or its decompressed {source.sqlite_name}.")
  dirs = _search_dirs(data_dir, cache)
  split_root = cache / "arrays" / source.cache_key / split
  path = find_first(_candidates(source), dirs)
  known_sha256 = None
  if path is None:
    kept = _kept_cache(source, split_root, dirs, download)
    if kept is not None:
      return kept
    if not download:
      raise DatasetNotFoundError(not_found_message(source, split, dirs) + _other_caches(split_root))
    try:
      path = download_lib.download_file(source.sqlite.url, cache / source.sqlite.name, sha256=source.sqlite.sha256)
    except DatasetNotFoundError as error:
      raise DatasetNotFoundError(f"{error} {not_found_message(source, split, dirs, False)}") from None
    known_sha256 = source.sqlite.sha256

  directory = split_root / source_key(path)
  try:
    opened = open_split(directory)
  except CacheDamagedError as error:
    warnings.warn(f"{error} It is rebuilt from {path}.", RuntimeWarning, stacklevel=3)
    opened = None
  if opened is not None:
    split_data, manifest = opened
    recorded = manifest.get("source", {})
    if recorded.get("spec") == _spec_record(source) and same_source(recorded, path):
      if recorded.get("mtime_ns") != path.stat().st_mtime_ns:  # same bytes, new time: hash it only this once
        record_source(directory, manifest, {**identify(path), "spec": recorded["spec"]})
      return split_data
  record = {**identify(path, sha256=known_sha256), "spec": _spec_record(source)}
  _remove_legacy_cache(split_root)
  _convert(source, path, cache, directory, record)
  opened = open_split(directory, verify=False)  # the writer computed the CRC-32s from these very bytes
  if opened is None:  # pragma: no cover - the writer just produced it
    raise RuntimeError(f"the converted cache {directory} could not be read back.")
  return opened[0]
