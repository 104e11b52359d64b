"""Datasets for federated simulation: loaders that return :class:`~fedjax_lite.core.federated_data.FederatedData`.

* :func:`load_digits` -- scikit-learn's bundled 8x8 handwritten digits (offline), split into a centralized test
  set and non-IID training clients.
* :func:`synthetic_leaf` -- LEAF's Synthetic(alpha, beta) of the FedProx paper, with :func:`synthetic_leaf_task`
  for its ground-truth teachers.
"""

from fedjax_lite.datasets.digits import DIGITS_NUM_CLASSES, DIGITS_NUM_EXAMPLES, DigitsData, load_digits
from fedjax_lite.datasets.synthetic import SyntheticLeafTask, synthetic_leaf, synthetic_leaf_task

__all__ = [
    "DIGITS_NUM_CLASSES",
    "DIGITS_NUM_EXAMPLES",
    "DigitsData",
    "load_digits",
    "SyntheticLeafTask",
    "synthetic_leaf",
    "synthetic_leaf_task",
]
