"""Reads the reference's legacy HDF5 layout (TFF before 2021): ``/examples/<client_id>/<feature>``.

The legacy archives (``fed_emnist.tar.bz2`` -> ``fed_emnist_train.h5`` / ``fed_emnist_test.h5``, and likewise
for Shakespeare, StackOverflow and CIFAR-100) hold one HDF5 group per client under ``/examples``, one dataset per
feature; the reference's client ids were the sorted group names and a client's examples were the rows of its
datasets. :func:`convert_hdf5_split` converts such a file into the same memory-mapped cache as the SQLite
reader (features under the reference's names), so the loaders do not care which format was on disk. h5py is an
optional dependency (``pip install 'fedjax_lite[hdf5]'``); errors from a truncated or foreign file, a client
with no examples, and values that the cached dtype or classes cannot hold unchanged (a float label ``1.7``, a
negative label, a pixel of 300 for ``uint8``) become a :class:`~.errors.DatasetFormatError` naming the file,
the client and what was expected; nothing is cast silently, and a failed conversion leaves no cache.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from fedjax_lite.datasets.array_cache import RaggedBytes, SplitWriter
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


def _check_values(path: Path, cid: str, name: str, feature_spec: FeatureSpec, values: np.ndarray) -> None:
  """Raises unless ``values`` can be stored as ``feature_spec`` unchanged (numbers, integers in range)."""
  if not (np.issubdtype(values.dtype, np.number) or values.dtype == np.bool_):
    raise DatasetFormatError(f"{path}: client {cid!r} feature {name!r} holds {values.dtype} values; expected "
                             f"numbers ({feature_spec.describe()}).")
  bad = feature_spec.out_of_range(values)
  if bad is not None:
    example = int(bad[0]) // max(1, feature_spec.size)
    value = values.reshape(-1)[int(bad[0])].item()
    raise DatasetFormatError(f"{path}: client {cid!r} example {example} has {name!r} value {value!r} "
                             f"({values.dtype}); expected {feature_spec.expected_values()} ({bad.size} such value(s) "
                             f"in this client).")


def convert_hdf5_split(path: str | os.PathLike, spec: Mapping[str, FeatureSpec],
                       cache_directory: str | os.PathLike, *, source: Mapping[str, Any]) -> None:
  """Converts a legacy ``*.h5`` client-data file into a cache directory.

  Args:
    path: the ``.h5`` file.
    spec: feature name -> :class:`FeatureSpec` (the numeric features are stored as ``spec.dtype``, integer ones
      only when every value fits unchanged, and checked against ``spec.shape``; ``'bytes'`` features are read
      as one byte string per example).
    cache_directory: where the converted split goes (written atomically).
    source: the source's identity, recorded in the cache's manifest (:func:`.source_identity.identify`).

  Raises:
    DatasetFormatError: the file cannot be read as HDF5, has no ``/examples`` group, a client has no examples,
      or a client's features do not match ``spec`` (shape, numbers, integers in the dtype's range or the
      spec's classes).
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
      counts = []
      for cid in client_ids:
        group = examples[cid]
        if not isinstance(group, h5py.Group) or first not in group or not isinstance(group[first], h5py.Dataset):
          raise DatasetFormatError(f"{path}: client {cid!r} lacks feature {first!r}; expected a group "
                                   f"/examples/{cid} with one dataset per feature {sorted(spec)}.")
        if group[first].ndim == 0 or group[first].shape[0] == 0:
          raise DatasetFormatError(f"{path}: client {cid!r} has no examples (feature {first!r} has shape "
                                   f"{group[first].shape}); expected at least one example per client.")
        counts.append(group[first].shape[0])
      counts = np.array(counts, np.int64)
      offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
      with SplitWriter(cache_directory, client_ids=tuple(client_ids), client_offsets=offsets,
                       source=source) as writer:
        outputs = {name: writer.allocate(name, s.shape, s.dtype) for name, s in spec.items() if s.kind != "bytes"}
        texts: dict[str, list[bytes]] = {name: [] for name, s in spec.items() if s.kind == "bytes"}
        for k, cid in enumerate(client_ids):
          group = examples[cid]
          for name, feature_spec in spec.items():
            if name not in group or not isinstance(group[name], h5py.Dataset):
              raise DatasetFormatError(f"{path}: client {cid!r} lacks feature {name!r} (has {sorted(group)}).")
            values = group[name][()]
            if not isinstance(values, np.ndarray) or values.ndim == 0 or values.shape[0] != counts[k]:
              rows = values.shape[0] if isinstance(values, np.ndarray) and values.ndim else "no"
              raise DatasetFormatError(f"{path}: client {cid!r} has {rows} rows of {name!r} but {counts[k]} of "
                                       f"{first!r}; expected one row per example in every feature.")
            if feature_spec.kind == "bytes":
              items = values.reshape(-1).tolist()
              if values.dtype.kind not in "OSU" or not all(isinstance(v, (bytes, str)) for v in items):
                raise DatasetFormatError(f"{path}: client {cid!r} feature {name!r} holds {values.dtype} values; "
                                         f"expected one byte string per example.")
              texts[name].extend(_as_bytes(v) for v in items)
            elif values.size != counts[k] * feature_spec.size:
              raise DatasetFormatError(f"{path}: client {cid!r} feature {name!r} has shape {values.shape}, not "
                                       f"{counts[k]} examples of {feature_spec.describe()}.")
            else:
              _check_values(path, cid, name, feature_spec, values)
              outputs[name][offsets[k]:offsets[k + 1]] = values.reshape((counts[k], *feature_spec.shape))
        for name, items in texts.items():
          writer.put_ragged(name, RaggedBytes.from_list(items))
  except OSError as error:
    raise DatasetFormatError(f"{path} is not a readable HDF5 file ({error}). The file is probably truncated or "
                             f"corrupt: delete it and obtain it again.") from None
