"""Which source file a converted cache (or a decompressed/extracted copy) was made from, so none is used for another.

A cache is keyed by its source's identity: the source file's absolute path chooses its folder
(:func:`source_key`), and its manifest records the file's size, modification time and sha256
(:func:`identify`). A cache is used for a source only when both agree (:func:`same_source`): the size and
modification time are compared first (free), and only when they differ is the file hashed again, so a warm
load never reads the source. A file found in another folder (a different ``data_dir``) has another key, so a
cache made from one folder's file is never read for another's.

Decompressed ``.lzma`` files and members extracted from ``.tar.bz2`` archives are intermediate copies of their
archive; :func:`unpacked` keeps each under ``<cache root>/unpacked/<key of the archive>/`` with a stamp of the
archive's size and modification time, and makes it again when the archive changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

from fedjax_lite.datasets import download as download_lib

__all__ = ["identify", "same_source", "source_key", "unpacked"]

_STAMP = "source.json"
_sha256_memo: dict[tuple, str] = {}  # (path, size, mtime_ns, inode) -> sha256: each file hashed once per process


def source_key(path: str | os.PathLike) -> str:
  """A folder name for the file at ``path``: 16 hex digits of the sha256 of its absolute, resolved path."""
  return hashlib.sha256(os.fsencode(Path(path).resolve())).hexdigest()[:16]


def _stat(path: Path) -> tuple[int, int, int]:
  stat = path.stat()
  return stat.st_size, stat.st_mtime_ns, stat.st_ino


def identify(path: str | os.PathLike, *, sha256: str | None = None) -> dict[str, Any]:
  """``{'path', 'size', 'mtime_ns', 'sha256'}`` of a source file.

  Args:
    path: the file.
    sha256: its digest when already known and checked (a download); otherwise the file is hashed (once per
      process for a given path, size and modification time).
  """
  path = Path(path).resolve()
  size, mtime_ns, inode = _stat(path)
  memo_key = (str(path), size, mtime_ns, inode)
  if sha256 is None:
    sha256 = _sha256_memo.get(memo_key) or download_lib.sha256_of(path)
  _sha256_memo[memo_key] = sha256.lower()
  return {"path": str(path), "size": size, "mtime_ns": mtime_ns, "sha256": sha256.lower()}


def same_source(recorded: Mapping[str, Any], path: str | os.PathLike) -> bool:
  """Whether ``path`` is the file that ``recorded`` (an :func:`identify` result) describes.

  The same path with the same size and modification time is taken as the same file; otherwise the file is
  hashed and compared with the recorded sha256 (a copy restored with a new time is still the same source).
  """
  path = Path(path).resolve()
  if not isinstance(recorded, Mapping) or recorded.get("path") != str(path):
    return False
  size, mtime_ns, _ = _stat(path)
  if size != recorded.get("size"):
    return False
  if mtime_ns == recorded.get("mtime_ns"):
    return True
  return identify(path)["sha256"] == recorded.get("sha256")


def unpacked(archive: Path, cache: Path, names: list[str], unpack: Callable[[Path, Path], None]) -> list[Path]:
  """The files ``names`` unpacked from ``archive``, made once under ``cache/unpacked/<key>/`` by ``unpack``.

  Args:
    archive: the ``.lzma`` or ``.tar.*`` file.
    cache: the cache root.
    names: the files that ``unpack(archive, folder)`` writes into ``folder``.
    unpack: writes the files (atomically each, as :mod:`.download`'s functions do).

  Returns:
    The unpacked files' paths. A folder made from another version of ``archive`` (another size or time) is
    removed and made again; a failed unpacking leaves nothing of its own behind.
  """
  folder = cache / "unpacked" / source_key(archive)
  stamp = {"archive": str(archive.resolve()), "size": archive.stat().st_size,
           "mtime_ns": archive.stat().st_mtime_ns}
  targets = [folder / name for name in names]
  try:
    current = json.loads((folder / _STAMP).read_text()) == stamp
  except (OSError, ValueError):
    current = False
  if current and all(target.is_file() for target in targets):
    return targets
  if not current:  # made from another version of the archive (or never finished): start again
    shutil.rmtree(folder, ignore_errors=True)
  folder.mkdir(parents=True, exist_ok=True)
  try:
    unpack(archive, folder)  # writes only the missing files (each atomically)
    (folder / _STAMP).write_text(json.dumps(stamp))
  except BaseException:
    if not current:
      shutil.rmtree(folder, ignore_errors=True)
    raise
  return targets
