"""Federated CIFAR-100 (TFF's Pachinko-allocation split) with the reference baseline's crop and normalization.

TFF's ``cifar100.load_data``: 500 train clients / 100 test clients of 100 images each (50,000 / 10,000), labels
0-99 (coarse 0-19), partitioned with the Pachinko Allocation Method (coarse labels ~ Dir(0.1), fine given
coarse ~ Dir(10)). The reference's files store ``image`` as int64 ``[32, 32, 3]`` (cached as uint8, as the
reference casts it; a value outside ``[0, 255]`` is an error, never wrapped), ``label`` and ``coarse_label`` as
int64 (checked to lie in ``[0, 100)`` and ``[0, 20)``).

Preprocessing as TFF's baseline (``baselines/cifar100/image_classification_preprocessing.py`` with its default
``distort_image=False``): cast to float32, crop the central ``crop_size x crop_size`` (``resize_with_crop_or_pad``
at offset ``(32 - crop_size) // 2``), then ``per_image_standardization``: ``(x - mean) / max(std, 1/sqrt(n))``
over the ``n = crop_size^2 * 3`` values of each image. Random crops and flips (``distort=True`` in the
reference) are training-time augmentation and are left to the training loop.
"""

from __future__ import annotations

import numpy as np

from fedjax_lite.core import validation
from fedjax_lite.core.federated_data import FederatedData
from fedjax_lite.datasets.feature_spec import FeatureSpec
from fedjax_lite.datasets.records import FederatedDataset
from fedjax_lite.datasets.sources import TFF_URL, DatasetSource, RemoteFile, load_raw_split

__all__ = ["load_cifar100", "cifar100_source", "crop_and_standardize"]

CIFAR100_SPEC = {"image": FeatureSpec("int64", (32, 32, 3), np.uint8),
                 "label": FeatureSpec("int64", (), np.int32, num_classes=100),
                 "coarse_label": FeatureSpec("int64", (), np.int32, num_classes=20)}
CIFAR100_SQLITE = RemoteFile("cifar100.sqlite.lzma", TFF_URL + "cifar100.sqlite.lzma",
                             "23d3916c9caa33395737ee560cc7cb77bbd05fc7b73647ee7be3a7e764172939")
CIFAR100_LEGACY = RemoteFile("fed_cifar100.tar.bz2", TFF_URL + "fed_cifar100.tar.bz2", None)


def cifar100_source(split: str) -> DatasetSource:
  return DatasetSource(title="Federated CIFAR-100", cache_key="cifar100", sqlite=CIFAR100_SQLITE, sql_split=split,
                       spec=CIFAR100_SPEC, hdf5_file=f"fed_cifar100_{split}.h5", hdf5_archive=CIFAR100_LEGACY)


def crop_and_standardize(images: np.ndarray, crop_size: int = 24) -> np.ndarray:
  """Central crop and per-image standardization of uint8 ``[n, 32, 32, 3]`` images; float32 ``[n, c, c, 3]``.

  ``(x - mean) / max(std, 1 / sqrt(c * c * 3))`` per image, statistics in float64 then cast (TensorFlow's
  ``per_image_standardization`` computes them in float32; the two agree to float32 rounding).
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must have shape [n, height, width, 3], got {images.shape}.")
  crop_size = validation.check_int("crop_size", crop_size, minimum=1, maximum=min(images.shape[1:3]))
  top = (images.shape[1] - crop_size) // 2
  left = (images.shape[2] - crop_size) // 2
  crops = images[:, top:top + crop_size, left:left + crop_size].astype(np.float64)
  mean = crops.mean(axis=(1, 2, 3), keepdims=True)
  std = crops.std(axis=(1, 2, 3), keepdims=True)
  adjusted = np.maximum(std, 1.0 / np.sqrt(crop_size * crop_size * 3))
  return ((crops - mean) / adjusted).astype(np.float32)


def load_cifar100(crop_size: int = 24, *, data_dir=None, download: bool = False, cache_dir=None) -> FederatedDataset:
  """Loads Federated CIFAR-100 with the reference baseline's central crop and per-image standardization.

  Args:
    crop_size: side of the central crop (24 in the reference's baseline; 32 keeps the whole image).
    data_dir: a folder with ``cifar100.sqlite`` or ``cifar100.sqlite.lzma`` (or the legacy
      ``fed_cifar100_{train,test}.h5``); ``None`` looks only in the cache root.
    download: fetch ``cifar100.sqlite.lzma`` (153 MB) from the reference's URL if it is not on disk.
    cache_dir: the cache root, overriding ``$FEDJAX_LITE_DATA``.

  Returns:
    A :class:`~.records.FederatedDataset`: ``'x'`` float32 ``[crop_size, crop_size, 3]``, ``'y'`` int32 in
    ``0..99``, ``num_classes`` 100.
  """
  crop_size = validation.check_int("crop_size", crop_size, minimum=1, maximum=32)
  splits = []
  for split in ("train", "test"):
    raw = load_raw_split(cifar100_source(split), split, data_dir=data_dir, cache_dir=cache_dir, download=download)
    examples = {"x": crop_and_standardize(raw.arrays["image"], crop_size), "y": raw.arrays["label"]}
    splits.append(FederatedData(raw.client_ids, examples, raw.client_offsets))
  return FederatedDataset(train=splits[0], test=splits[1], num_classes=100, input_shape=(crop_size, crop_size, 3))
