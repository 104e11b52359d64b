"""Downloads with checksums into the data cache, written atomically and never re-extracted once there.

The cache root is ``$FEDJAX_LITE_DATA`` when set, else ``~/.cache/fedjax_lite`` (:func:`cache_root`). Every file
is first written under a temporary name in its destination folder and renamed into place only when complete
and verified (``os.replace``), so an interrupted download, a checksum mismatch or a corrupt archive leaves
nothing that a later run could mistake for the real file. ``http(s)://`` and ``file://`` URLs are supported
(``urllib``); ``.lzma``/``.xz`` files are decompressed by streaming, ``.tar``/``.tar.bz2``/``.tar.gz`` archives
are extracted with tarfile's ``'data'`` filter (no absolute paths, no links out of the folder).
"""

from __future__ import annotations

import hashlib
import lzma
import os
import shutil
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from fedjax_lite.datasets.errors import DatasetFormatError, DatasetNotFoundError

__all__ = ["cache_root", "download_file", "decompress_lzma", "extract_tar", "sha256_of"]

ENV_VAR = "FEDJAX_LITE_DATA"
_CHUNK = 1 << 20


def cache_root() -> Path:
  """``$FEDJAX_LITE_DATA`` if set, else ``~/.cache/fedjax_lite``."""
  root = os.environ.get(ENV_VAR)
  return Path(root).expanduser() if root else Path.home() / ".cache" / "fedjax_lite"


def _temp_beside(path: Path) -> Path:
  return path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def sha256_of(path: str | os.PathLike) -> str:
  """The hex sha256 of a file, read in 1 MiB chunks."""
  digest = hashlib.sha256()
  with open(path, "rb") as file:
    for chunk in iter(lambda: file.read(_CHUNK), b""):
      digest.update(chunk)
  return digest.hexdigest()


def download_file(url: str, destination: str | os.PathLike, *, sha256: str | None = None,
                  timeout_s: float = 60.0) -> Path:
  """Downloads ``url`` to ``destination`` (atomically), checking its sha256 when given.

  An existing ``destination`` is returned as is (after checking its sha256 when given): a cached file is never
  fetched twice.

  Args:
    url: an ``http://``, ``https://`` or ``file://`` URL.
    destination: the final path.
    sha256: the expected lowercase hex digest, or ``None`` to skip the check (the reference publishes none for
      some files).
    timeout_s: socket timeout in seconds.

  Returns:
    ``destination`` as a ``Path``.

  Raises:
    DatasetNotFoundError: the URL cannot be reached (offline, 404); nothing is written.
    DatasetFormatError: the downloaded bytes do not have the expected sha256; nothing is written.
  """
  if not isinstance(url, str) or urllib.parse.urlparse(url).scheme not in ("http", "https", "file"):
    raise ValueError(f"url must be an http(s):// or file:// URL, got {url!r}.")
  if sha256 is not None and (not isinstance(sha256, str) or len(sha256) != 64):
    raise ValueError(f"sha256 must be a 64-character hex digest or None, got {sha256!r}.")
  destination = Path(destination)
  if destination.exists():
    if sha256 is not None and sha256_of(destination) != sha256.lower():
      raise DatasetFormatError(f"{destination} does not have the expected sha256 {sha256}: delete it and download "
                               f"it again from {url}.")
    return destination
  destination.parent.mkdir(parents=True, exist_ok=True)
  temp = _temp_beside(destination)
  digest = hashlib.sha256()
  try:
    try:
      with urllib.request.urlopen(url, timeout=timeout_s) as response, open(temp, "wb") as out:
        for chunk in iter(lambda: response.read(_CHUNK), b""):
          digest.update(chunk)
          out.write(chunk)
    except (urllib.error.URLError, OSError) as error:
      reason = getattr(error, "reason", error)
      raise DatasetNotFoundError(f"could not download {url} ({reason}); {destination} was not written.") from None
    if sha256 is not None and digest.hexdigest() != sha256.lower():
      raise DatasetFormatError(f"the file downloaded from {url} has sha256 {digest.hexdigest()}, expected {sha256}; "
                               f"it was discarded ({destination} was not written).")
    os.replace(temp, destination)
  finally:
    temp.unlink(missing_ok=True)
  return destination


def decompress_lzma(source: str | os.PathLike, destination: str | os.PathLike) -> Path:
  """Decompresses an ``.lzma``/``.xz`` file to ``destination`` atomically; an existing destination is kept."""
  source, destination = Path(source), Path(destination)
  if destination.exists():
    return destination
  destination.parent.mkdir(parents=True, exist_ok=True)
  temp = _temp_beside(destination)
  try:
    with lzma.open(source, "rb") as compressed, open(temp, "wb") as out:
      shutil.copyfileobj(compressed, out, _CHUNK)
    os.replace(temp, destination)
  except (lzma.LZMAError, EOFError) as error:
    raise DatasetFormatError(f"{source} is not a complete LZMA file ({error}): delete it and download it "
                             f"again.") from None
  finally:
    temp.unlink(missing_ok=True)
  return destination


def extract_tar(archive: str | os.PathLike, directory: str | os.PathLike, members: list[str]) -> list[Path]:
  """Extracts ``members`` (file names, matched by base name) of a tar archive into ``directory``, atomically.

  Members already in ``directory`` are not extracted again.

  Raises:
    DatasetFormatError: the archive is truncated or corrupt, or lacks one of ``members``.
  """
  archive, directory = Path(archive), Path(directory)
  targets = [directory / member for member in members]
  if all(target.exists() for target in targets):
    return targets
  directory.mkdir(parents=True, exist_ok=True)
  temp = _temp_beside(directory / archive.name)
  temp.mkdir()
  try:
    with tarfile.open(archive, "r:*") as tar:
      by_name = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
      missing = [m for m in members if m not in by_name]
      if missing:
        raise DatasetFormatError(f"{archive} lacks {missing}; it holds {sorted(by_name)[:10]}.")
      for member in members:
        info = by_name[member]
        info.name = member  # flatten into temp/
        tar.extract(info, temp, filter="data")
    for member, target in zip(members, targets):
      if not target.exists():
        os.replace(temp / member, target)
  except (tarfile.TarError, EOFError, OSError, ValueError) as error:
    if isinstance(error, DatasetFormatError):
      raise
    raise DatasetFormatError(f"{archive} is not a complete tar archive ({error}): delete it and download it "
                             f"again.") from None
  finally:
    shutil.rmtree(temp, ignore_errors=True)
  return targets
