"""Federated StackOverflow (TFF's posts grouped by user) as next-word prediction data.

TFF's ``stackoverflow.load_data``: train 342,477 users / 135,818,730 sentences (posts before 2018), held-out
38,758 users (``user_id % 10 == 0``), test 204,088 users (posts from 2018). Each example has ``tokens`` (the
sentence, space-separated), ``title``, ``tags`` (``'|'``-joined), ``type``, ``creation_date`` and ``score``.
:func:`load_stackoverflow` caches those (memory-mapped) and turns ``tokens`` into rows of ``sequence_length``
word ids with the ``vocabulary_size`` most frequent words of the reference's ``stackoverflow.word_count`` file,
OOV buckets and BOS/EOS, as the reference's baseline (:func:`.text.word_sequences`). The full dataset is large
(the train split alone holds about 136 M sentences); the conversion streams it, but the id rows of a split are
built in memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from fedjax_lite.core import validation
from fedjax_lite.core.federated_data import FederatedData
from fedjax_lite.datasets import download as download_lib
from fedjax_lite.datasets.array_cache import RawSplit
from fedjax_lite.datasets.errors import DatasetNotFoundError
from fedjax_lite.datasets.feature_spec import FeatureSpec
from fedjax_lite.datasets.records import FederatedDataset
from fedjax_lite.datasets.source_identity import unpacked
from fedjax_lite.datasets.sources import TFF_URL, DatasetSource, RemoteFile, find_first, load_raw_split
from fedjax_lite.datasets.text import word_sequences, word_special_tokens

__all__ = ["load_stackoverflow", "load_stackoverflow_vocabulary", "stackoverflow_source"]

STACKOVERFLOW_SPEC = {
    "tokens": FeatureSpec("bytes"), "title": FeatureSpec("bytes"), "tags": FeatureSpec("bytes"),
    "type": FeatureSpec("bytes"), "creation_date": FeatureSpec("bytes"), "score": FeatureSpec("int64", (), np.int64),
}
STACKOVERFLOW_SQLITE = RemoteFile("stackoverflow.sqlite.lzma", TFF_URL + "stackoverflow.sqlite.lzma", None)
STACKOVERFLOW_LEGACY = RemoteFile("stackoverflow.tar.bz2", TFF_URL + "stackoverflow.tar.bz2",
                                  "99eca2f8b8327a09e5fc123979df2d237acbc5e52322f6d86bf523ee47b961a2")
WORD_COUNTS = RemoteFile("stackoverflow.word_count.tar.bz2", TFF_URL + "stackoverflow.word_count.tar.bz2",
                         "1dc00256d6e527c54b9756d968118378ae14e6692c0b3b6cad470cdd3f0c519c")
_SQL_SPLITS = {"train": "train", "held_out": "heldout", "test": "test"}


def stackoverflow_source(split: str) -> DatasetSource:
  return DatasetSource(title="Federated StackOverflow", cache_key="stackoverflow", sqlite=STACKOVERFLOW_SQLITE,
                       sql_split=_SQL_SPLITS[split], spec=STACKOVERFLOW_SPEC,
                       hdf5_file=f"stackoverflow_{split}.h5", hdf5_archive=STACKOVERFLOW_LEGACY)


def load_stackoverflow_vocabulary(vocabulary_size: int = 10000, *, data_dir=None, download: bool = False,
                                  cache_dir=None) -> tuple[str, ...]:
  """The ``vocabulary_size`` most frequent words of the reference's ``stackoverflow.word_count`` file.

  The file (one ``word count`` per line, most frequent first) or ``stackoverflow.word_count.tar.bz2`` (extracted
  once into the cache root's ``unpacked/``) is looked for in ``data_dir``, then in the cache root; else the
  archive is downloaded with ``download=True``.
  """
  vocabulary_size = validation.check_int("vocabulary_size", vocabulary_size, minimum=1)
  cache = Path(cache_dir).expanduser() if cache_dir is not None else download_lib.cache_root()
  dirs = ([Path(data_dir).expanduser()] if data_dir is not None else []) + [cache]
  name = "stackoverflow.word_count"
  path = find_first([name, WORD_COUNTS.name], dirs)
  if path is None and download:
    path = download_lib.download_file(WORD_COUNTS.url, cache / WORD_COUNTS.name, sha256=WORD_COUNTS.sha256)
  if path is None:
    raise DatasetNotFoundError(
        f"the StackOverflow vocabulary is not on disk: no {name} nor {WORD_COUNTS.name} in "
        f"{' or '.join(map(str, dirs))}. Put {WORD_COUNTS.name} (from {WORD_COUNTS.describe()}) into {dirs[0]}, "
        f"or pass download=True, or pass vocabulary=[...] explicitly.")
  if path.name == WORD_COUNTS.name:  # extracted once, beside no other archive's copy
    path = unpacked(path, cache, [name], lambda archive, folder: download_lib.extract_tar(archive, folder, [name]))[0]
  words = []
  with open(path, encoding="utf-8") as file:
    for line in file:
      if len(words) >= vocabulary_size:
        break
      parts = line.split()
      if parts:
        words.append(parts[0])
  return tuple(words)


def _to_federated(raw: RawSplit, vocabulary: Sequence[str], sequence_length: int,
                  num_oov_buckets: int) -> FederatedData:
  x, y = word_sequences(raw.ragged["tokens"], vocabulary, sequence_length, num_oov_buckets)
  return FederatedData(raw.client_ids, {"x": x, "y": y}, raw.client_offsets)


def load_stackoverflow(vocabulary_size: int = 10000, sequence_length: int = 20, num_oov_buckets: int = 1, *,
                       vocabulary: Sequence[str] | None = None, data_dir=None, download: bool = False,
                       cache_dir=None, include_held_out: bool = False) -> FederatedDataset:
  """Loads Federated StackOverflow as next-word prediction data (the reference's baseline preprocessing).

  Args:
    vocabulary_size: the most frequent words kept (10,000 in the reference); ignored if ``vocabulary`` given.
    sequence_length: words per row (20 in the reference).
    num_oov_buckets: OOV ids (1 in the reference).
    vocabulary: the words to use instead of the reference's word counts, most frequent first.
    data_dir: a folder with ``stackoverflow.sqlite`` or ``.sqlite.lzma`` (or the legacy
      ``stackoverflow_{train,held_out,test}.h5``) and ``stackoverflow.word_count`` (or its ``.tar.bz2``).
    download: fetch missing files from the reference's URLs.
    cache_dir: the cache root, overriding ``$FEDJAX_LITE_DATA``.
    include_held_out: also load the held-out clients into ``held_out``.

  Returns:
    A :class:`~.records.FederatedDataset`: ``'x'``/``'y'`` int32 ``[sequence_length]``, ``num_classes``
    ``V + num_oov_buckets + 3``, the ``vocabulary`` and ``special_tokens`` (pad 0, OOV ``V+1..``, BOS, EOS).
  """
  sequence_length = validation.check_int("sequence_length", sequence_length, minimum=1)
  num_oov_buckets = validation.check_int("num_oov_buckets", num_oov_buckets, minimum=1)
  if not isinstance(include_held_out, bool):
    raise TypeError(f"include_held_out must be a bool, got {type(include_held_out).__name__}.")
  if vocabulary is None:
    vocabulary = load_stackoverflow_vocabulary(vocabulary_size, data_dir=data_dir, download=download,
                                               cache_dir=cache_dir)
  elif isinstance(vocabulary, (str, bytes)) or not all(isinstance(w, str) for w in vocabulary) or not vocabulary:
    raise TypeError("vocabulary must be a non-empty sequence of str.")
  vocabulary = tuple(vocabulary)
  names = ("train", "test") + (("held_out",) if include_held_out else ())
  splits = {split: _to_federated(load_raw_split(stackoverflow_source(split), split, data_dir=data_dir,
                                                cache_dir=cache_dir, download=download),
                                 vocabulary, sequence_length, num_oov_buckets) for split in names}
  tokens = word_special_tokens(len(vocabulary), num_oov_buckets)
  return FederatedDataset(train=splits["train"], test=splits["test"], num_classes=tokens.eos + 1,
                          input_shape=(sequence_length,), vocabulary=vocabulary, special_tokens=tokens,
                          held_out=splits.get("held_out"))
