"""The record the federated benchmark loaders return, and the token-id conventions of the text datasets."""

from __future__ import annotations

import dataclasses

import numpy as np

from fedjax_lite.core.federated_data import FederatedData

__all__ = ["FederatedDataset", "SpecialTokens"]


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
  """Token ids that are not words (or characters) of the vocabulary.

  Sequence metrics exclude ``pad`` always, and the reference's baselines also report accuracy without ``eos``
  and without the ``oov`` ids (``accuracy_without_out_of_vocab_or_end_of_sentence``); :meth:`excluded` gives the
  ids to mask for each variant.
  """

  pad: int
  oov: tuple[int, ...]
  bos: int
  eos: int

  def excluded(self, *, eos: bool = True, oov: bool = False) -> np.ndarray:
    """int32 ids to mask out of accuracy: always ``pad``, plus ``eos`` and the ``oov`` ids when asked."""
    ids = [self.pad] + ([self.eos] if eos else []) + (list(self.oov) if oov else [])
    return np.asarray(ids, np.int32)


@dataclasses.dataclass(frozen=True)
class FederatedDataset:
  """A federated benchmark: the reference's train and test clients, as ``FederatedData`` with ``'x'``/``'y'``.

  Attributes:
    train: the training clients.
    test: the test clients (for EMNIST and Shakespeare the same writers/roles as ``train``: the reference
      splits each client's examples; for CIFAR-100 and StackOverflow other clients).
    num_classes: the number of output classes (for language models the size of the output vocabulary,
      special tokens included).
    input_shape: the shape of one ``'x'``.
    vocabulary: the words or characters of a text dataset, in id order from id ``1``; ``None`` otherwise.
    special_tokens: the ids of pad / OOV / BOS / EOS for a text dataset; ``None`` otherwise.
    held_out: StackOverflow's held-out clients; ``None`` otherwise.
  """

  train: FederatedData
  test: FederatedData
  num_classes: int
  input_shape: tuple[int, ...]
  vocabulary: tuple[str, ...] | None = None
  special_tokens: SpecialTokens | None = None
  held_out: FederatedData | None = None
