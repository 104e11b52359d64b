"""Any TensorFlow Datasets (TFDS) dataset as ``FederatedData``, read without TensorFlow.

:func:`from_tfds` reads a prepared dataset from a user's ``data_dir`` with ``tfds.data_source`` (random access
to the ArrayRecord files, which needs no TensorFlow), then groups the examples into clients: by a natural
client key when the dataset has one (a feature named ``client_id``, ``user_id``, ``speaker_id``, ``writer_id``
or ``author_id``, or the one named by ``client_key``), else with the partitioners of
:mod:`fedjax_lite.core.partition` (IID, Dirichlet label skew, label-sorted shards). TFDS is an optional
dependency: ``pip install 'fedjax_lite[tfds]'``.

Preparing a dataset for it: ``from_tfds(..., download=True)`` asks TFDS for ArrayRecord files; by hand, run
``tfds build NAME --data_dir DIR --file_format=array_record`` -- a plain ``tfds build NAME`` writes TFRecord files,
which ``tfds.data_source`` cannot read (convert those once with ``tfds convert_format --dataset_dir DIR/NAME
--out_file_format array_record``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from fedjax_lite.core import partition as partition_lib
from fedjax_lite.core import validation
from fedjax_lite.core.federated_data import FederatedData
from fedjax_lite.datasets.errors import DatasetNotFoundError, missing_extra

__all__ = ["from_tfds", "federate_examples", "not_prepared_message", "NATURAL_CLIENT_KEYS"]

NATURAL_CLIENT_KEYS = ("client_id", "user_id", "speaker_id", "writer_id", "author_id")
_PARTITIONS = ("auto", "natural", "iid", "dirichlet", "shards")


def _import_tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise missing_extra("tensorflow-datasets", "tfds", "from_tfds") from None
  return tfds


def _flatten(example: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in example.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f"{prefix}{key}/"))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def federate_examples(examples: list[Mapping[str, Any]], *, partition: str = "auto", client_key: str | None = None,
                      label_key: str = "label", num_clients: int = 100, alpha: float = 0.5,
                      shards_per_client: int = 2, seed: int = 0) -> FederatedData:
  """Groups a list of example dicts (as a TFDS data source returns them) into clients.

  Features are stacked per name (nested dicts flattened as ``'outer/inner'``); ``'image'`` becomes ``'x'``
  (uint8 images as float32 ``/ 255``) and ``label_key`` becomes ``'y'`` (int32) when present. See
  :func:`from_tfds` for the arguments.
  """
  validation.check_choice("partition", partition, _PARTITIONS)
  if not examples:
    raise ValueError("the split holds no examples.")
  flat = [_flatten(example) for example in examples]
  arrays = {name: np.stack([np.asarray(example[name]) for example in flat]) for name in flat[0]}
  if client_key is None and partition in ("auto", "natural"):
    client_key = next((key for key in NATURAL_CLIENT_KEYS if key in arrays), None)
  if partition == "natural" and client_key is None:
    raise ValueError(f"partition='natural' needs a client key feature ({NATURAL_CLIENT_KEYS} or client_key=...); "
                     f"the features are {sorted(arrays)}.")
  if client_key is not None and client_key not in arrays:
    raise ValueError(f"client_key {client_key!r} is not a feature; the features are {sorted(arrays)}.")
  if "image" in arrays and "x" not in arrays:
    image = arrays.pop("image")
    arrays["x"] = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image
  if label_key in arrays and "y" not in arrays:
    arrays["y"] = arrays.pop(label_key).astype(np.int32)
  if partition in ("auto", "natural") and client_key is not None:
    keys = arrays.pop(client_key)
    ids = np.array([k.decode("utf-8") if isinstance(k, bytes) else str(k) for k in keys.tolist()])
    return FederatedData.from_arrays(arrays, ids)
  num_examples = next(iter(arrays.values())).shape[0]
  if partition in ("auto", "iid"):
    assignment = partition_lib.iid_partition(num_examples, num_clients, seed=seed)
  else:
    if "y" not in arrays:
      raise ValueError(f"partition={partition!r} needs labels: no feature {label_key!r} (label_key).")
    if partition == "dirichlet":
      assignment = partition_lib.dirichlet_partition(arrays["y"], num_clients, alpha=alpha, seed=seed)
    else:
      assignment = partition_lib.shard_partition(arrays["y"], num_clients, shards_per_client=shards_per_client,
                                                 seed=seed)
  return partition_lib.partition_dataset(arrays, assignment)


def _prepared_file_formats(folder: Path) -> set[str]:
  """The file formats of the prepared variants under a TFDS dataset folder (read from their dataset_info.json)."""
  formats = set()
  for info_path in folder.glob("**/dataset_info.json"):
    try:
      info = json.loads(info_path.read_text())
    except (OSError, ValueError):
      continue
    formats.add(str(info.get("fileFormat", "tfrecord")).lower())  # TFDS's default when the field is absent
    formats.update(str(other).lower() for other in info.get("alternativeFileFormats", ()))
  return formats


def not_prepared_message(name: str, split: str, data_dir, error: Exception) -> str:
  """What to do when ``tfds.data_source`` cannot open ``name``: prepare it as ArrayRecord, or convert TFRecord.

  ``tfds.data_source`` reads ArrayRecord (random access without TensorFlow). ``tfds build NAME`` writes TFRecord
  unless it is given ``--file_format=array_record``, and a dataset prepared as TFRecord cannot be read here: it is
  converted once with ``tfds convert_format`` or rebuilt.
  """
  where = str(data_dir) if data_dir is not None else os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
  folder = f"{where}/{name.split(':')[0].split('/')[0]}"
  detail = f"{type(error).__name__}: {' '.join(str(error).split())}"
  formats = _prepared_file_formats(Path(folder).expanduser())
  if "tfrecord" in formats and not formats & {"array_record", "parquet"}:
    return (f"TFDS dataset {name!r} is prepared in {where} as TFRecord files, which tfds.data_source cannot read "
            f"(it needs the ArrayRecord format; `tfds build` writes TFRecord unless told otherwise). Convert it once "
            f"with `tfds convert_format --dataset_dir {folder} --out_file_format array_record` (on a machine with "
            f"TensorFlow, which reads the TFRecord files), or rebuild it with `tfds build {name} --data_dir {where} "
            f"--file_format=array_record`. ({detail})")
  return (f"TFDS dataset {name!r} (split {split!r}) is not prepared in {where} ({detail}). Prepare it in the "
          f"ArrayRecord format, which fedjax_lite reads without TensorFlow: pass download=True (TFDS then downloads "
          f"and prepares it; most datasets need TensorFlow for that), or on a machine with network and TensorFlow run "
          f"`tfds build {name} --data_dir {where} --file_format=array_record` and copy {folder} here.")


def from_tfds(name: str, *, split: str, data_dir=None, partition: str = "auto", client_key: str | None = None,
              label_key: str = "label", num_clients: int = 100, alpha: float = 0.5, shards_per_client: int = 2,
              seed: int = 0, download: bool = False) -> FederatedData:
  """Loads a TFDS dataset split as federated clients.

  Args:
    name: the TFDS name, e.g. ``'mnist'`` or ``'cifar10:3.0.2'``.
    split: e.g. ``'train'``, ``'test[:10%]'``.
    data_dir: the folder holding prepared TFDS datasets (``None``: TFDS's default, ``~/tensorflow_datasets``).
    partition: ``'auto'`` (the natural client key if the dataset has one, else IID), ``'natural'``, ``'iid'``,
      ``'dirichlet'`` (Hsu et al. 2019, concentration ``alpha``) or ``'shards'`` (McMahan et al. 2017,
      ``shards_per_client`` label-sorted shards).
    client_key: the feature naming each example's client (overrides the automatic choice).
    label_key: the label feature (renamed ``'y'``).
    num_clients, alpha, shards_per_client, seed: for the partitioners.
    download: let TFDS download and prepare the dataset, as ArrayRecord files, when it is not in ``data_dir``
      (needs network and, for most datasets, TensorFlow).

  Returns:
    ``FederatedData``.

  Raises:
    MissingDependencyError: ``tensorflow-datasets`` is not installed (``pip install 'fedjax_lite[tfds]'``).
    DatasetNotFoundError: the dataset is not prepared in ``data_dir``, or only as TFRecord files (the message
      gives the ``tfds build`` / ``tfds convert_format`` command that prepares ArrayRecord files).
  """
  if not isinstance(name, str) or not name:
    raise TypeError(f"name must be a non-empty str, got {name!r}.")
  if not isinstance(split, str) or not split:
    raise TypeError(f"split must be a non-empty str, got {split!r}.")
  validation.check_choice("partition", partition, _PARTITIONS)
  tfds = _import_tfds()
  try:
    # tfds.data_source prepares ArrayRecord files by itself only without a data_dir: ask for them explicitly.
    source = tfds.data_source(name, split=split, data_dir=None if data_dir is None else str(data_dir),
                              download=download, builder_kwargs={"file_format": "array_record"} if download else None)
  except Exception as error:  # TFDS raises assertion, registry and file errors alike
    raise DatasetNotFoundError(not_prepared_message(name, split, data_dir, error)) from None
  count = len(source)
  try:
    examples = list(source.__getitems__(list(range(count))))  # one batched read of the ArrayRecord files
  except (AttributeError, TypeError):  # sources without batched reads (e.g. TFDS's mock data)
    examples = [source[i] for i in range(count)]
  return federate_examples(examples, partition=partition, client_key=client_key, label_key=label_key,
                           num_clients=num_clients, alpha=alpha, shards_per_client=shards_per_client, seed=seed)
