"""Datasets for federated simulation: loaders that return :class:`~fedjax_lite.core.federated_data.FederatedData`.

* :func:`load_digits` -- scikit-learn's bundled 8x8 handwritten digits (offline), split into a centralized test
  set and non-IID training clients.
* :func:`synthetic_leaf` -- LEAF's Synthetic(alpha, beta) of the FedProx paper, with :func:`synthetic_leaf_task`
  for its ground-truth teachers.
* :func:`grammar_corpus` -- sentences of a small probabilistic grammar as word-level next-word prediction data
  (StackOverflow's layout), with per-client shifts of word choice (offline; pretraining and LoRA fine-tuning).
* The field's federated benchmarks from the reference's own files, offline-first (converted once into a
  memory-mapped cache): :func:`load_emnist`, :func:`load_shakespeare`, :func:`load_stackoverflow`,
  :func:`load_cifar100` (each a :class:`FederatedDataset`), LEAF's JSON (:func:`load_leaf`) and any TFDS
  dataset (:func:`from_tfds`, optional extra ``tfds``). A missing file raises :class:`DatasetNotFoundError`
  saying which file, where to put it and where it comes from; a corrupt one, or a value the model cannot take
  (a label outside the classes, a fractional or negative label), :class:`DatasetFormatError` naming the file,
  the row or client and what was expected. A converted cache is used only for the file it was made from (its
  path and sha256) and is checked against its CRC-32s when opened: a damaged one is rebuilt from the file.
"""

from fedjax_lite.datasets.digits import DIGITS_NUM_CLASSES, DIGITS_NUM_EXAMPLES, DigitsData, load_digits
from fedjax_lite.datasets.synthetic import SyntheticLeafTask, synthetic_leaf, synthetic_leaf_task
from fedjax_lite.datasets.cifar100 import load_cifar100
from fedjax_lite.datasets.download import cache_root
from fedjax_lite.datasets.emnist import load_emnist
from fedjax_lite.datasets.grammar import GRAMMAR_LEXICON, grammar_corpus
from fedjax_lite.datasets.errors import DatasetFormatError, DatasetNotFoundError, MissingDependencyError
from fedjax_lite.datasets.leaf import load_leaf
from fedjax_lite.datasets.records import FederatedDataset, SpecialTokens
from fedjax_lite.datasets.shakespeare import load_shakespeare
from fedjax_lite.datasets.stackoverflow import load_stackoverflow, load_stackoverflow_vocabulary
from fedjax_lite.datasets.tfds_data import from_tfds

__all__ = [
    "load_digits",
    "DigitsData",
    "SyntheticLeafTask",
    "synthetic_leaf",
    "synthetic_leaf_task",
    "GRAMMAR_LEXICON",
    "grammar_corpus",
    "FederatedDataset",
    "SpecialTokens",
    "load_emnist",
    "load_shakespeare",
    "load_stackoverflow",
    "load_stackoverflow_vocabulary",
    "load_cifar100",
    "load_leaf",
    "from_tfds",
    "cache_root",
    "DatasetNotFoundError",
    "DatasetFormatError",
    "MissingDependencyError",
    "DIGITS_NUM_CLASSES",
    "DIGITS_NUM_EXAMPLES",
]
