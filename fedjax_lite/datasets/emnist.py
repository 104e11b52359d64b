"""Federated EMNIST (LEAF's writers of the Extended MNIST, as TFF ships it), memory-mapped from the cache.

Caldas et al. 2018, "LEAF: A Benchmark for Federated Settings" (arXiv:1812.01097); Cohen et al. 2017, "EMNIST".
Sizes (TFF's ``emnist.load_data``): digits only, 3,383 writers, 341,873 train / 40,832 test examples, 10
classes; all, 3,400 writers, 671,585 / 77,483 examples, 62 classes (``0-9``, ``A-Z`` = 10-35, ``a-z`` = 36-61).
Each writer's examples are split between train and test, so every client is in both splits.

The reference's pixels are float32 in ``[0, 1]`` with **1.0 = background** (the inverse of MNIST). The
reference's baselines train on them as they are, and so does :func:`load_emnist` by default: ``'x'`` is then
a zero-copy read-only view of the memory-mapped cache. ``invert_pixels=True`` gives ``1 - pixels`` (0 =
background, as FedJAX does), at the cost of one pass over the data.
"""

from __future__ import annotations

import numpy as np

from fedjax_lite.core.federated_data import FederatedData
from fedjax_lite.datasets.array_cache import RawSplit
from fedjax_lite.datasets.feature_spec import FeatureSpec
from fedjax_lite.datasets.records import FederatedDataset
from fedjax_lite.datasets.sources import TFF_URL, DatasetSource, RemoteFile, load_raw_split

__all__ = ["load_emnist", "emnist_source", "emnist_spec"]


def emnist_spec(only_digits: bool) -> dict[str, FeatureSpec]:
  """The features of a row: 28x28 float pixels, and a label in ``[0, 10)`` (digits only) or ``[0, 62)``."""
  return {"pixels": FeatureSpec("float", (28, 28), np.float32),
          "label": FeatureSpec("int64", (), np.int32, num_classes=10 if only_digits else 62)}

EMNIST_SQLITE = RemoteFile("emnist_all.sqlite.lzma", TFF_URL + "emnist_all.sqlite.lzma",
                           "c3aaf91b4cf4e69d53d81627ad119eccdc878ff906f68e66063ff10f67faad48")
_LEGACY = {
    True: RemoteFile("fed_emnist_digitsonly.tar.bz2", TFF_URL + "fed_emnist_digitsonly.tar.bz2",
                     "55333deb8546765427c385710ca5e7301e16f4ed8b60c1dc5ae224b42bd5b14b"),
    False: RemoteFile("fed_emnist.tar.bz2", TFF_URL + "fed_emnist.tar.bz2",
                      "fe1ed5a502cea3a952eb105920bff8cffb32836b5173cb18a57a32c3606f3ea0"),
}


def emnist_source(only_digits: bool, split: str) -> DatasetSource:
  """Where split ``'train'`` or ``'test'`` of Federated EMNIST is stored by the reference."""
  prefix = "digits_only" if only_digits else "all"
  legacy = _LEGACY[only_digits]
  return DatasetSource(
      title=f"Federated EMNIST ({'digits only' if only_digits else 'all 62 classes'})",
      cache_key="emnist_digits" if only_digits else "emnist_all",
      sqlite=EMNIST_SQLITE, sql_split=f"{prefix}_{split}", spec=emnist_spec(only_digits),
      hdf5_file=f"{legacy.name[:-len('.tar.bz2')]}_{split}.h5", hdf5_archive=legacy)


def federated_from_raw(raw: RawSplit, examples: dict[str, np.ndarray]) -> FederatedData:
  """A ``FederatedData`` with ``raw``'s clients and the given per-example arrays (not copied if memory-mapped)."""
  return FederatedData(raw.client_ids, examples, raw.client_offsets)


def load_emnist(only_digits: bool = True, *, data_dir=None, download: bool = False, cache_dir=None,
                invert_pixels: bool = False) -> FederatedDataset:
  """Loads Federated EMNIST (train and test clients) from the reference's files, converting them once.

  Args:
    only_digits: the 10-class digits-only version (3,383 writers) or the 62-class one (3,400 writers).
    data_dir: a folder with ``emnist_all.sqlite`` or ``emnist_all.sqlite.lzma`` (TFF's current format), or the
      legacy ``fed_emnist[_digitsonly]_{train,test}.h5`` or their ``.tar.bz2``; ``None`` looks only in the
      cache root (``$FEDJAX_LITE_DATA`` or ``~/.cache/fedjax_lite``).
    download: fetch ``emnist_all.sqlite.lzma`` (170 MB; 4.7 GB decompressed) from the reference's URL if it is
      not on disk.
    cache_dir: the cache root, overriding ``$FEDJAX_LITE_DATA``.
    invert_pixels: return ``1 - pixels`` (0 = background) instead of the reference's values.

  Returns:
    A :class:`~.records.FederatedDataset`: ``'x'`` float32 ``[28, 28, 1]``, ``'y'`` int32; ``num_classes`` 10
    or 62; ``input_shape`` ``(28, 28, 1)``.

  Raises:
    DatasetNotFoundError: the files are not on disk (the message says which, where, and from where).
    DatasetFormatError: a file is truncated or corrupt, or holds a label outside ``[0, num_classes)`` (the
      message names the file, the row or client and the label).
  """
  if not isinstance(only_digits, bool):
    raise TypeError(f"only_digits must be a bool, got {type(only_digits).__name__}.")
  if not isinstance(invert_pixels, bool):
    raise TypeError(f"invert_pixels must be a bool, got {type(invert_pixels).__name__}.")
  splits = []
  for split in ("train", "test"):
    raw = load_raw_split(emnist_source(only_digits, split), split, data_dir=data_dir, cache_dir=cache_dir,
                         download=download)
    pixels = raw.arrays["pixels"][..., np.newaxis]
    if invert_pixels:
      pixels = 1.0 - pixels
    splits.append(federated_from_raw(raw, {"x": pixels, "y": raw.arrays["label"]}))
  return FederatedDataset(train=splits[0], test=splits[1], num_classes=10 if only_digits else 62,
                          input_shape=(28, 28, 1))
