"""Reads the reference's legacy HDF5 layout (TFF before 2021): ``/examples/<client_id>/<feature>``.

The legacy archives (``fed_emnist.tar.bz2`` -> ``fed_emnist_train.h5`` / ``fed_emnist_test.h5``, and likewise
for Shakespeare, StackOverflow and CIFAR-100) hold one HDF5 group per client under ``/examples``, one dataset per
feature; the reference's client ids were the sorted group names and a client's examples were the rows of its
datasets. :func:`convert_hdf5_split` converts such a file into the same memory-mapped cache as the SQLite
reader (features under the reference's names), so the loaders do not care which format was on disk. h5py is an
optional dependency (``pip install 'fedjax_lite[hdf5]'``); errors from a truncated or foreign file become a
:class:`~.errors.DatasetFormatError` naming it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from fedjax_lite.datasets.array_cache import RaggedBytes, SplitWriter, source_fingerprint
from fedjax_lite.datasets.errors import DatasetFormatError, missing_extra
from fedjax_lite.datasets.feature_spec import FeatureSpec

__all__ = ["convert_hdf5_split"]


def _import_h5py():
  try:
    import h5py  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise missing_extra("h5py", "hdf5", "Reading the legacy HDF5 files") from None
  return h5py


def _as_bytes(value) -> bytes:
  return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def convert_hdf5_split(path: str | os.PathLike, spec: Mapping[str, FeatureSpec],
                       cache_directory: str | os.PathLike) -> None:
  """Converts a legacy ``*.h5`` client-data file into a cache directory.

  Args:
    path: the ``.h5`` file.
    spec: feature name -> :class:`FeatureSpec` (the numeric features are cast to ``spec.dtype`` and checked
      against ``spec.shape``; ``'bytes'`` features are read as one byte string per example).
    cache_directory: where the converted split goes (written atomically).

  Raises:
    DatasetFormatError: the file cannot be read as HDF5, has no ``/examples`` group, or a client's features do
      not match ``spec``.
  """
  h5py = _import_h5py()
  path = Path(path)
  try:
    with h5py.File(path, "r") as file:
      if "examples" not in file:
        raise DatasetFormatError(f"{path} has no '/examples' group: not a TFF HDF5 client-data file.")
      examples = file["examples"]
      client_ids = sorted(examples.keys())
      if not client_ids:
        raise DatasetFormatError(f"{path} has no clients under '/examples'.")
      first = next(iter(spec))
      counts = np.array([examples[cid][first].shape[0] if first in examples[cid] else -1 for cid in client_ids])
      if np.any(counts < 0):
        raise DatasetFormatError(f"{path}: client {client_ids[int(np.argmax(counts < 0))]!r} lacks feature "
                                 f"{first!r}.")
      offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
      with SplitWriter(cache_directory, client_ids=tuple(client_ids), client_offsets=offsets,
                       source=source_fingerprint(path)) as writer:
        outputs = {name: writer.allocate(name, s.shape, s.dtype) for name, s in spec.items() if s.kind != "bytes"}
        texts: dict[str, list[bytes]] = {name: [] for name, s in spec.items() if s.kind == "bytes"}
        for k, cid in enumerate(client_ids):
          group = examples[cid]
          for name, feature_spec in spec.items():
            if name not in group:
              raise DatasetFormatError(f"{path}: client {cid!r} lacks feature {name!r} (has {sorted(group)}).")
            values = group[name][()]
            if values.shape[0] != counts[k]:
              raise DatasetFormatError(f"{path}: client {cid!r} has {values.shape[0]} rows of {name!r} but "
                                       f"{counts[k]} of {first!r}.")
            if feature_spec.kind == "bytes":
              texts[name].extend(_as_bytes(v) for v in values.reshape(-1).tolist())
            elif values.size != counts[k] * feature_spec.size:
              raise DatasetFormatError(f"{path}: client {cid!r} feature {name!r} has shape {values.shape}, not "
                                       f"{counts[k]} examples of {feature_spec.describe()}.")
            else:
              outputs[name][offsets[k]:offsets[k + 1]] = values.reshape((counts[k], *feature_spec.shape))
        for name, items in texts.items():
          writer.put_ragged(name, RaggedBytes.from_list(items))
  except OSError as error:
    raise DatasetFormatError(f"{path} is not a readable HDF5 file ({error}). The file is probably truncated or "
                             f"corrupt: delete it and obtain it again.") from None
