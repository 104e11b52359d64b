"""LEAF's JSON client files (FEMNIST, Shakespeare, Synthetic, ...) as ``FederatedData``.

Caldas et al. 2018, "LEAF: A Benchmark for Federated Settings" (arXiv:1812.01097). LEAF's preprocessing writes
``data/<dataset>/data/{train,test}/*.json``, each file ::

  {"users": [id, ...], "num_samples": [n, ...], "user_data": {id: {"x": [...], "y": [...]}, ...}}

:func:`load_leaf` reads one such file or every ``*.json`` of a folder (in name order), keeps the users in the
files' order, and converts the examples with numpy: numeric ``x`` (FEMNIST's 784 pixels, Synthetic's 60
features) to float32; text ``x`` (Shakespeare's 80-character strings) to the character ids of :mod:`.text` (one
id per byte, OOV for bytes outside the 86-character vocabulary; no BOS/EOS, as LEAF's own models).

Labels ``y`` are never converted silently: numeric labels must be whole non-negative numbers (below
``num_classes`` when given) and become int32; string labels need an explicit ``label_vocabulary`` (Shakespeare's
next characters: ``'characters'``). Anything else, and a file that is not LEAF's layout (``users`` not a list,
``num_samples`` of another length, a user without ``x``/``y``), is one :class:`~.errors.DatasetFormatError`
naming the file, the user and what was expected. JSON object keys are strings, so an integer user id ``1`` is
looked up as ``"1"`` (and the client is ``"1"``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fedjax_lite.core import validation
from fedjax_lite.core.federated_data import FederatedData
from fedjax_lite.datasets.errors import DatasetFormatError, DatasetNotFoundError
from fedjax_lite.datasets.text import _BYTE_TABLE, SHAKESPEARE_VOCABULARY

__all__ = ["load_leaf"]

_CHARACTERS = "characters"


def _text_ids(strings: list[str], where: str) -> np.ndarray:
  encoded = [s.encode("utf-8") for s in strings]
  lengths = {len(s) for s in encoded}
  if len(lengths) != 1:
    raise DatasetFormatError(f"{where}: text examples have different lengths {sorted(lengths)[:5]}; expected "
                             f"strings of one length.")
  flat = np.frombuffer(b"".join(encoded), np.uint8)
  return _BYTE_TABLE[flat].reshape(len(encoded), lengths.pop())


def _features(values: Any, where: str) -> np.ndarray:
  """``x``: strings to character ids (int32), numbers to float32."""
  if not isinstance(values, list):
    raise DatasetFormatError(f"{where}: 'x' is a {type(values).__name__}; expected a list of examples.")
  if values and all(isinstance(v, str) for v in values):
    return _text_ids(values, where)
  try:
    array = np.asarray(values)
  except ValueError as error:
    raise DatasetFormatError(f"{where}: 'x' holds examples of different shapes ({error}).") from None
  if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
    raise DatasetFormatError(f"{where}: 'x' holds {array.dtype} values; expected numbers, or strings of one length.")
  return array.astype(np.float32)


def _labels(values: Any, where: str, num_classes: int | None, label_vocabulary) -> np.ndarray:
  """``y`` as int32 class ids, or one error saying which label is not one."""
  if not isinstance(values, list):
    raise DatasetFormatError(f"{where}: 'y' is a {type(values).__name__}; expected a list of labels.")
  if any(isinstance(v, str) for v in values):
    if label_vocabulary is None:
      raise DatasetFormatError(f"{where}: string labels such as {next(v for v in values if isinstance(v, str))!r} "
                               f"need label_vocabulary: a sequence of the label strings (label = its index) or "
                               f"'characters' (one-character labels as the character ids of 'x').")
    ids = []
    for index, value in enumerate(values):
      if not isinstance(value, str):
        raise DatasetFormatError(f"{where}: label {index} is {value!r} among string labels; expected a string.")
      if label_vocabulary == _CHARACTERS:
        if len(value) != 1:
          raise DatasetFormatError(f"{where}: label {index} is {value!r}; label_vocabulary='characters' expects "
                                   f"one character.")
        encoded = value.encode("utf-8")
        ids.append(int(_BYTE_TABLE[encoded[0]]) if len(encoded) == 1 else len(SHAKESPEARE_VOCABULARY) + 1)
      elif value in label_vocabulary:
        ids.append(label_vocabulary[value])
      else:
        raise DatasetFormatError(f"{where}: label {index} is {value!r}, which is not in label_vocabulary "
                                 f"({len(label_vocabulary)} labels).")
    labels = np.asarray(ids, np.int64)
  else:
    try:
      labels = np.asarray(values)
    except ValueError as error:
      raise DatasetFormatError(f"{where}: 'y' holds labels of different shapes ({error}).") from None
    if labels.size and not (np.issubdtype(labels.dtype, np.number) and not np.issubdtype(labels.dtype,
                                                                                          np.complexfloating)):
      raise DatasetFormatError(f"{where}: 'y' holds {labels.dtype} values; expected integer class labels.")
  high = np.iinfo(np.int32).max if num_classes is None else num_classes - 1
  flat = labels.reshape(-1)
  with np.errstate(invalid="ignore"):
    bad = ~((flat >= 0) & (flat <= high) & (np.floor(flat) == flat)) if flat.size else np.zeros(0, bool)
  if bad.any():
    first = int(np.flatnonzero(bad)[0])
    expected = f"[0, {num_classes})" if num_classes is not None else "[0, 2^31)"
    shown = values[first] if labels.ndim == 1 else flat[first].item()  # as the file spells it
    raise DatasetFormatError(f"{where}: label {first} is {shown!r}; expected a whole number in "
                             f"{expected} ({int(bad.sum())} such label(s) for this user).")
  return labels.astype(np.int32)


def _check_label_vocabulary(label_vocabulary) -> dict[str, int] | str | None:
  if label_vocabulary is None or label_vocabulary == _CHARACTERS:
    return label_vocabulary
  if isinstance(label_vocabulary, (str, bytes)) or not isinstance(label_vocabulary, Sequence) or not all(
      isinstance(label, str) for label in label_vocabulary) or not label_vocabulary:
    raise TypeError(f"label_vocabulary must be None, 'characters' or a non-empty sequence of str, got "
                    f"{label_vocabulary!r:.80}.")
  ids = {label: index for index, label in enumerate(label_vocabulary)}
  if len(ids) != len(label_vocabulary):
    raise ValueError("label_vocabulary must not repeat a label.")
  return ids


def _read(file: Path) -> tuple[list, dict, list | None]:
  """``(users, user_data, num_samples)`` of one file, checked for LEAF's layout."""
  try:
    content = json.loads(file.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise DatasetFormatError(f"{file} is not valid JSON ({error}); it is probably truncated.") from None
  if not isinstance(content, dict) or "users" not in content or "user_data" not in content:
    raise DatasetFormatError(f"{file} is not LEAF JSON: it needs 'users' and 'user_data'.")
  users, user_data, num_samples = content["users"], content["user_data"], content.get("num_samples")
  if not isinstance(users, list):
    raise DatasetFormatError(f"{file}: 'users' is a {type(users).__name__} ({users!r:.40}); expected a list of user "
                             f"ids.")
  if not isinstance(user_data, dict):
    raise DatasetFormatError(f"{file}: 'user_data' is a {type(user_data).__name__}; expected an object mapping each "
                             f"user id to its 'x' and 'y'.")
  for user in users:
    if isinstance(user, bool) or not isinstance(user, (str, int)):
      raise DatasetFormatError(f"{file}: 'users' holds {user!r} ({type(user).__name__}); expected string (or "
                               f"integer) user ids.")
  if num_samples is not None:
    if not isinstance(num_samples, list) or len(num_samples) != len(users):
      length = len(num_samples) if isinstance(num_samples, list) else type(num_samples).__name__
      raise DatasetFormatError(f"{file}: 'num_samples' has {length} entries but 'users' has {len(users)}; "
                               f"expected one count per user.")
    for user, count in zip(users, num_samples):
      if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise DatasetFormatError(f"{file}: 'num_samples' gives user {str(user)!r} {count!r}; expected a "
                                 f"non-negative integer.")
  return users, user_data, num_samples


def load_leaf(path: str | os.PathLike, *, input_shape: tuple[int, ...] | None = None, num_classes: int | None = None,
              label_vocabulary: Sequence[str] | str | None = None) -> FederatedData:
  """Loads LEAF JSON client data from a file or a folder of ``*.json`` files.

  Args:
    path: a LEAF ``.json`` file, or a folder whose ``*.json`` files are all read (e.g. ``.../data/train``).
    input_shape: reshape each ``'x'`` to this shape (e.g. ``(28, 28, 1)`` for FEMNIST), or ``None``.
    num_classes: when given, every label must lie in ``[0, num_classes)`` (FEMNIST: 62); otherwise labels must
      be non-negative.
    label_vocabulary: how string labels become class ids: ``None`` (string labels are an error), a sequence of
      the label strings (a label's id is its index), or ``'characters'`` (Shakespeare's next-character labels:
      each one character, mapped to the same character ids as ``'x'``).

  Returns:
    ``FederatedData`` with ``'x'`` (float32, or int32 character ids for text) and ``'y'`` (int32). Users with
    no examples are left out.

  Raises:
    DatasetNotFoundError: ``path`` does not exist or the folder has no ``.json`` file.
    DatasetFormatError: a file is not valid LEAF JSON (truncated, missing keys, inconsistent counts), or a
      label is not a class id (fractional, negative, at least ``num_classes``, or a string without
      ``label_vocabulary``).

  Example:
    >>> import json, pathlib, tempfile
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (folder / "train.json").write_text(json.dumps({"users": ["u"], "num_samples": [2],
    ...     "user_data": {"u": {"x": [[0.5, 1.0], [2.0, 3.0]], "y": [1, 0]}}}))
    >>> load_leaf(folder, num_classes=2)["u"]["y"]
    array([1, 0], dtype=int32)
  """
  if not isinstance(path, (str, os.PathLike)):
    raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}.")
  if num_classes is not None:
    num_classes = validation.check_int("num_classes", num_classes, minimum=1)
  label_vocabulary = _check_label_vocabulary(label_vocabulary)
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
  seen: set[str] = set()
  for file in files:
    users, user_data, num_samples = _read(file)
    for index, user in enumerate(users):
      key = str(user)  # JSON object keys are strings: user 1's data is under "1"
      where = f"{file}, user {key!r}"
      if key in seen:
        raise DatasetFormatError(f"{where} appears more than once; expected each user once.")
      seen.add(key)
      data = user_data.get(key)
      if not isinstance(data, dict) or "x" not in data or "y" not in data:
        raise DatasetFormatError(f"{where} has no 'x'/'y' in user_data; expected user_data[{key!r}] = "
                                 f"{{'x': [...], 'y': [...]}}.")
      x = _features(data["x"], where)
      y = _labels(data["y"], where, num_classes, label_vocabulary)
      if x.shape[0] != y.shape[0] or (num_samples is not None and num_samples[index] != x.shape[0]):
        raise DatasetFormatError(f"{where}: {x.shape[0]} x, {y.shape[0]} y, num_samples "
                                 f"{None if num_samples is None else num_samples[index]}; expected equal counts.")
      if x.shape[0] == 0:
        continue
      if input_shape is not None:
        try:
          x = x.reshape((x.shape[0], *input_shape))
        except ValueError:
          raise ValueError(f"input_shape {tuple(input_shape)} does not fit examples of shape {x.shape[1:]}.") from None
      clients[key] = {"x": x, "y": y}
  if not clients:
    raise DatasetFormatError(f"{path} holds no user with examples.")
  return FederatedData.from_clients(clients)
