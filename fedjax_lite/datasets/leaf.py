"""LEAF's JSON client files (FEMNIST, Shakespeare, Synthetic, ...) as ``FederatedData``.

Caldas et al. 2018, "LEAF: A Benchmark for Federated Settings" (arXiv:1812.01097). LEAF's preprocessing writes
``data/<dataset>/data/{train,test}/*.json``, each file ::

  {"users": [id, ...], "num_samples": [n, ...], "user_data": {id: {"x": [...], "y": [...]}, ...}}

:func:`load_leaf` reads one such file or every ``*.json`` of a folder (in name order), keeps the users in the
files' order, and converts the examples with numpy: numeric ``x`` (FEMNIST's 784 pixels, Synthetic's 60
features) to float32, numeric ``y`` to int32; text (Shakespeare's 80-character ``x`` strings and 1-character
``y``) to the character ids of :mod:`.text` (one id per byte, OOV for bytes outside the 86-character
vocabulary; no BOS/EOS, as LEAF's own models).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from fedjax_lite.core.federated_data import FederatedData
from fedjax_lite.datasets.errors import DatasetFormatError, DatasetNotFoundError
from fedjax_lite.datasets.text import _BYTE_TABLE

__all__ = ["load_leaf"]


def _text_ids(strings: list[str], where: str) -> np.ndarray:
  encoded = [s.encode("utf-8") for s in strings]
  lengths = {len(s) for s in encoded}
  if len(lengths) != 1:
    raise DatasetFormatError(f"{where}: text examples have different lengths {sorted(lengths)[:5]}.")
  flat = np.frombuffer(b"".join(encoded), np.uint8)
  return _BYTE_TABLE[flat].reshape(len(encoded), lengths.pop()) if encoded else np.zeros((0, 0), np.int32)


def _convert(values: list[Any], where: str, integer: bool) -> np.ndarray:
  if values and isinstance(values[0], str):
    ids = _text_ids(values, where)
    return ids[:, 0] if ids.shape[1] == 1 else ids
  try:
    array = np.asarray(values)
  except ValueError as error:
    raise DatasetFormatError(f"{where}: examples of different shapes ({error}).") from None
  if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
    raise DatasetFormatError(f"{where}: unsupported values of dtype {array.dtype}.")
  if integer and np.all(np.mod(array, 1) == 0):
    return array.astype(np.int32)
  return array.astype(np.float32)


def load_leaf(path: str | os.PathLike, *, input_shape: tuple[int, ...] | None = None) -> FederatedData:
  """Loads LEAF JSON client data from a file or a folder of ``*.json`` files.

  Args:
    path: a LEAF ``.json`` file, or a folder whose ``*.json`` files are all read (e.g. ``.../data/train``).
    input_shape: reshape each ``'x'`` to this shape (e.g. ``(28, 28, 1)`` for FEMNIST), or ``None``.

  Returns:
    ``FederatedData`` with ``'x'`` (float32, or int32 character ids for text) and ``'y'`` (int32).

  Raises:
    DatasetNotFoundError: ``path`` does not exist or the folder has no ``.json`` file.
    DatasetFormatError: a file is not valid LEAF JSON (truncated, missing keys, inconsistent counts).
  """
  if not isinstance(path, (str, os.PathLike)):
    raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}.")
  path = Path(path).expanduser()
  if path.is_dir():
    files = sorted(path.glob("*.json"))
    if not files:
      raise DatasetNotFoundError(f"{path} holds no LEAF .json file (LEAF writes them to data/<dataset>/data/train "
                                 f"and .../test; see https://github.com/TalwalkarLab/leaf).")
  elif path.is_file():
    files = [path]
  else:
    raise DatasetNotFoundError(f"{path} does not exist: pass a LEAF .json file or a folder of them (LEAF writes "
                               f"data/<dataset>/data/train/*.json; see https://github.com/TalwalkarLab/leaf).")
  clients: dict[str, dict[str, np.ndarray]] = {}
  for file in files:
    try:
      content = json.loads(file.read_text(encoding="utf-8"))
      users, user_data = content["users"], content["user_data"]
      num_samples = content.get("num_samples")
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
      raise DatasetFormatError(f"{file} is not valid JSON ({error}); it is probably truncated.") from None
    except (KeyError, TypeError):
      raise DatasetFormatError(f"{file} is not LEAF JSON: it needs 'users' and 'user_data'.") from None
    for index, user in enumerate(users):
      where = f"{file}, user {user!r}"
      if user in clients:
        raise DatasetFormatError(f"{where} appears in more than one file.")
      if user not in user_data or "x" not in user_data[user] or "y" not in user_data[user]:
        raise DatasetFormatError(f"{where} has no 'x'/'y' in user_data.")
      x = _convert(user_data[user]["x"], where, integer=False)
      y = _convert(user_data[user]["y"], where, integer=True)
      if x.shape[0] != y.shape[0] or (num_samples is not None and num_samples[index] != x.shape[0]):
        raise DatasetFormatError(f"{where}: {x.shape[0]} x, {y.shape[0]} y, num_samples "
                                 f"{None if num_samples is None else num_samples[index]}.")
      if x.shape[0] == 0:
        continue
      if input_shape is not None:
        try:
          x = x.reshape((x.shape[0], *input_shape))
        except ValueError:
          raise ValueError(f"input_shape {tuple(input_shape)} does not fit examples of shape {x.shape[1:]}.") from None
      clients[str(user)] = {"x": x, "y": y}
  if not clients:
    raise DatasetFormatError(f"{path} holds no user with examples.")
  return FederatedData.from_clients(clients)
