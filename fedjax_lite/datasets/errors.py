"""Errors of the dataset loaders: a missing file, a corrupt file, a missing optional dependency.

Each one is raised with a message that a user can act on (which file, where to put it, where it comes from, how
to rebuild it), so that a loader never surfaces a raw traceback from ``sqlite3``, ``h5py``, ``lzma`` or
``urllib``. They subclass the builtin exception a caller would expect (``FileNotFoundError``, ``ValueError``,
``ImportError``), so ``except FileNotFoundError`` keeps working.
"""

from __future__ import annotations

__all__ = ["DatasetNotFoundError", "DatasetFormatError", "MissingDependencyError"]


class DatasetNotFoundError(FileNotFoundError):
  """A dataset file is not on disk and may not (``download=False``) or could not (offline) be downloaded."""

  def __str__(self) -> str:  # FileNotFoundError would prefix "[Errno ...]" when given several args
    return str(self.args[0]) if self.args else ""


class DatasetFormatError(ValueError):
  """A dataset file is truncated, corrupt or not in the expected layout (the message names the file)."""


class MissingDependencyError(ImportError):
  """An optional dependency is not installed; the message names the ``pip install 'fedjax_lite[extra]'``."""


def missing_extra(package: str, extra: str, what: str) -> MissingDependencyError:
  """The error for a missing optional ``package`` that ``pip install 'fedjax_lite[<extra>]'`` installs."""
  return MissingDependencyError(
      f"{what} needs the optional package {package!r}; install it with: pip install 'fedjax_lite[{extra}]'"
  )
