"""Federated Shakespeare (LEAF's speaking roles, as TFF ships it) as next-character sequences.

McMahan et al. 2017 (arXiv:1602.05629) and LEAF; TFF's ``shakespeare.load_data``: 715 roles, 16,068 train /
2,356 test snippets, every role in both splits. The reference's files hold one ``snippets`` string per example;
:func:`load_shakespeare` turns them into rows of ``sequence_length`` character ids with the baseline's
vocabulary and special tokens (:mod:`.text`), vectorized over all snippets of a split. The raw snippets are
cached (memory-mapped CSR bytes); the id rows are recomputed at each load (well under a second).
"""

from __future__ import annotations

import numpy as np

from fedjax_lite.core import validation
from fedjax_lite.core.federated_data import FederatedData
from fedjax_lite.datasets.array_cache import RawSplit
from fedjax_lite.datasets.feature_spec import FeatureSpec
from fedjax_lite.datasets.records import FederatedDataset
from fedjax_lite.datasets.sources import TFF_URL, DatasetSource, RemoteFile, load_raw_split
from fedjax_lite.datasets.text import SHAKESPEARE_VOCABULARY, char_sequences, shakespeare_special_tokens

__all__ = ["load_shakespeare", "shakespeare_source"]

SHAKESPEARE_SPEC = {"snippets": FeatureSpec("bytes")}
SHAKESPEARE_SQLITE = RemoteFile("shakespeare.sqlite.lzma", TFF_URL + "shakespeare.sqlite.lzma",
                                "d3d11fceb9e105439ac6f4d52af6efafed5a2a1e1eb24c5bd2dd54ced242f5c4")
SHAKESPEARE_LEGACY = RemoteFile("shakespeare.tar.bz2", TFF_URL + "shakespeare.tar.bz2", None)


def shakespeare_source(split: str) -> DatasetSource:
  return DatasetSource(title="Federated Shakespeare", cache_key="shakespeare", sqlite=SHAKESPEARE_SQLITE,
                       sql_split=split, spec=SHAKESPEARE_SPEC, hdf5_file=f"shakespeare_{split}.h5",
                       hdf5_archive=SHAKESPEARE_LEGACY)


def snippets_to_federated(raw: RawSplit, sequence_length: int) -> FederatedData:
  """The raw split's snippets as ``'x'``/``'y'`` id rows, grouped by the same clients."""
  x, y, rows_per_snippet = char_sequences(raw.ragged["snippets"], sequence_length)
  rows_per_client = np.add.reduceat(rows_per_snippet, raw.client_offsets[:-1]) if raw.num_examples else []
  offsets = np.concatenate([[0], np.cumsum(rows_per_client)]).astype(np.int64)
  return FederatedData(raw.client_ids, {"x": x, "y": y}, offsets)


def load_shakespeare(sequence_length: int = 80, *, data_dir=None, download: bool = False,
                     cache_dir=None) -> FederatedDataset:
  """Loads Federated Shakespeare as next-character prediction data.

  Args:
    sequence_length: characters per row (80 in the reference's baseline).
    data_dir: a folder with ``shakespeare.sqlite`` or ``shakespeare.sqlite.lzma``, or the legacy
      ``shakespeare_{train,test}.h5``; ``None`` looks only in the cache root.
    download: fetch ``shakespeare.sqlite.lzma`` (1.3 MB) from the reference's URL if it is not on disk.
    cache_dir: the cache root, overriding ``$FEDJAX_LITE_DATA``.

  Returns:
    A :class:`~.records.FederatedDataset`: ``'x'``, ``'y'`` int32 ``[sequence_length]`` (``y`` is ``x`` shifted
    by one), ``num_classes`` 90, ``vocabulary`` the 86 characters (ids 1..86), ``special_tokens`` pad 0, OOV
    87, BOS 88, EOS 89.
  """
  sequence_length = validation.check_int("sequence_length", sequence_length, minimum=1)
  splits = [snippets_to_federated(load_raw_split(shakespeare_source(split), split, data_dir=data_dir,
                                                 cache_dir=cache_dir, download=download), sequence_length)
            for split in ("train", "test")]
  tokens = shakespeare_special_tokens()
  return FederatedDataset(train=splits[0], test=splits[1], num_classes=tokens.eos + 1,
                          input_shape=(int(sequence_length),), vocabulary=SHAKESPEARE_VOCABULARY,
                          special_tokens=tokens)
