"""Downloads with checksums into the data cache, written atomically and never re-extracted once there.

The cache root is ``$FEDJAX_LITE_DATA`` when set, else ``~/.cache/fedjax_lite`` (:func:`cache_root`). Every file
is first written under a temporary name in its destination folder and renamed into place only when complete
and verified (``os.replace``), so an interrupted download, a checksum mismatch or a corrupt archive leaves
nothing that a later run could mistake for the real file. ``http(s)://`` and ``file://`` URLs are supported
(``urllib``); ``.lzma``/``.xz`` files are decompressed by streaming, ``.tar``/``.tar.bz2``/``.tar.gz`` archives
are extracted with tarfile's ``'data'`` filter (no absolute paths, no links out of the folder).

Large transfers show a progress bar (tqdm, on stderr or as a notebook widget): a download of at least
:data:`PROGRESS_MIN_BYTES` (or of unknown size) and the decompression of such a file (EMNIST's 170 MB ``.lzma``
becomes 4.7 GB); ``progress=False`` hides it, ``progress=True`` shows it for any size.
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
PROGRESS_MIN_BYTES = 8 * 10**6  # transfers from 8 MB up show a progress bar (progress=None)


def _progress_bar(progress: bool | None, total: int | None, description: str):
  """A tqdm bar in bytes (decimal units, like the sizes quoted for the files) or None when it is not shown."""
  if progress is None:
    progress = total is None or total >= PROGRESS_MIN_BYTES
  if not progress:
    return None
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

  return tqdm(total=total, desc=description, unit="B", unit_scale=True, unit_divisor=1000, dynamic_ncols=True)


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


class _ReadProgress:
  """A binary file whose ``read`` advances a progress bar by the bytes it returns."""

  def __init__(self, file, bar):
    self._file, self._bar = file, bar

  def read(self, size: int = -1) -> bytes:
    data = self._file.read(size)
    self._bar.update(len(data))
    return data

  def __getattr__(self, name):
    return getattr(self._file, name)


def download_file(url: str, destination: str | os.PathLike, *, sha256: str | None = None,
                  timeout_s: float = 60.0, progress: bool | None = None) -> Path:
  """Downloads ``url`` to ``destination`` (atomically), checking its sha256 when given.

  An existing ``destination`` is returned as is (after checking its sha256 when given): a cached file is never
  fetched twice.

  Args:
    url: an ``http://``, ``https://`` or ``file://`` URL.
    destination: the final path.
    sha256: the expected lowercase hex digest, or ``None`` to skip the check (the reference publishes none for
      some files).
    timeout_s: socket timeout in seconds.
    progress: show a progress bar; ``None`` (default) shows one for a file of at least
      :data:`PROGRESS_MIN_BYTES` or of unknown size.

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
  if progress is not None and not isinstance(progress, bool):
    raise TypeError(f"progress must be a bool or None, got {type(progress).__name__}.")
  destination = Path(destination)
  if destination.exists():
    if sha256 is not None and sha256_of(destination) != sha256.lower():
      raise DatasetFormatError(f"{destination} does not have the expected sha256 {sha256}: delete it and download "
                               f"it again from {url}.")
    return destination
  destination.parent.mkdir(parents=True, exist_ok=True)
  temp = _temp_beside(destination)
  digest = hashlib.sha256()
  bar = None
  try:
    try:
      with urllib.request.urlopen(url, timeout=timeout_s) as response, open(temp, "wb") as out:
        length = response.headers.get("Content-Length") if hasattr(response, "headers") else None
        total = int(length) if length and length.isdigit() else None
        bar = _progress_bar(progress, total, f"downloading {destination.name}")
        for chunk in iter(lambda: response.read(_CHUNK), b""):
          digest.update(chunk)
          out.write(chunk)
          if bar is not None:
            bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as error:
      reason = getattr(error, "reason", error)
      raise DatasetNotFoundError(f"could not download {url} ({reason}); {destination} was not written.") from None
    if sha256 is not None and digest.hexdigest() != sha256.lower():
      raise DatasetFormatError(f"the file downloaded from {url} has sha256 {digest.hexdigest()}, expected {sha256}; "
                               f"it was discarded ({destination} was not written).")
    os.replace(temp, destination)
  finally:
    if bar is not None:
      bar.close()
    temp.unlink(missing_ok=True)
  return destination


def decompress_lzma(source: str | os.PathLike, destination: str | os.PathLike, *,
                    progress: bool | None = None) -> Path:
  """Decompresses an ``.lzma``/``.xz`` file to ``destination`` atomically; an existing destination is kept.

  ``progress``: show a bar over the compressed bytes read; ``None`` shows one from :data:`PROGRESS_MIN_BYTES`.
  """
  source, destination = Path(source), Path(destination)
  if destination.exists():
    return destination
  destination.parent.mkdir(parents=True, exist_ok=True)
  temp = _temp_beside(destination)
  bar = _progress_bar(progress, source.stat().st_size, f"decompressing {source.name}")
  try:
    with open(source, "rb") as raw, open(temp, "wb") as out:
      with lzma.open(raw if bar is None else _ReadProgress(raw, bar), "rb") as compressed:
        shutil.copyfileobj(compressed, out, _CHUNK)
    os.replace(temp, destination)
  except (lzma.LZMAError, EOFError) as error:
    raise DatasetFormatError(f"{source} is not a complete LZMA file ({error}): delete it and download it "
                             f"again.") from None
  finally:
    if bar is not None:
      bar.close()
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
