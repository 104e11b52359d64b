"""Small federated datasets in the reference's formats, generated for the dataset tests (fixed seeds)."""

from __future__ import annotations

import numpy as np

EMNIST_SIZES = {"f0001_01": 3, "f0002_07": 1, "f0000_14": 4}  # unsorted on purpose


def emnist_clients(seed: int, num_classes: int = 10) -> dict[str, dict[str, np.ndarray]]:
  """Client id -> {'pixels' float32 [n, 28, 28] in [0, 1], 'label' int64 [n]}; values exactly float32."""
  rng = np.random.default_rng(seed)
  return {cid: {"pixels": rng.integers(0, 256, size=(n, 28, 28)).astype(np.float32) / np.float32(255),
                "label": rng.integers(0, num_classes, size=n).astype(np.int64)}
          for cid, n in EMNIST_SIZES.items()}


def emnist_splits() -> dict[str, dict[str, dict[str, np.ndarray]]]:
  """All four SQL splits of emnist_all.sqlite."""
  return {"digits_only_train": emnist_clients(0), "digits_only_test": emnist_clients(1),
          "all_train": emnist_clients(2, 62), "all_test": emnist_clients(3, 62)}


def expected_federated(clients: dict[str, dict[str, np.ndarray]], feature: str) -> np.ndarray:
  """A feature concatenated in the loaders' storage order: sorted client ids, rows in file order."""
  return np.concatenate([clients[cid][feature] for cid in sorted(clients)])


def with_label(splits: dict, split: str, client: str, index: int, label) -> dict:
  """``splits`` with example ``index`` of ``client`` in ``split`` relabelled ``label`` (the rest shared, not copied)."""
  changed = {name: dict(clients) for name, clients in splits.items()}
  features = dict(changed[split][client])
  labels = np.array(features["label"], dtype=np.float64 if isinstance(label, float) else np.int64)  # a copy
  labels[index] = label
  features["label"] = labels
  changed[split][client] = features
  return changed
