"""Checks of the data that enters a round, at the boundary, with errors that name the input.

A round's client data (``core.packing``) is one dict of arrays ``[clients, steps, batch, ...]`` with ``mask``
``[clients, steps, batch]`` and ``num_examples`` ``[clients]``. Inside the compiled round a wrong shape is a raw
XLA error or, worse, no error at all: labels outside the model's classes give a NaN loss, every client is rejected
as non-finite and the run silently trains nothing. These checks run on the host before that:

* :func:`check_client_features` -- every client of a population has the same features with the same per-example
  shapes and dtypes (``FederatedData.from_clients``);
* :func:`check_round_data` -- the structure of a packed round: ``mask`` and ``num_examples`` present, every leaf
  with the same client (and step, batch) axes. :class:`RoundDataChecker` runs it once per distinct structure (shapes
  and dtypes), not once per round;
* :func:`check_labels` -- integer labels within ``[0, num_classes)`` for a whole population, once.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from fedjax_lite.core import validation

MASK = "mask"
NUM_EXAMPLES = "num_examples"


def check_client_features(clients: Mapping[Any, Mapping[str, Any]]) -> None:
  """Raises ``ValueError`` naming the first client whose features differ from the first client's.

  Args:
    clients: ``{client_id: {feature: array [examples, ...]}}``.
  """
  reference_id, reference, reference_counts = None, None, {}
  for client_id, examples in clients.items():
    if not isinstance(examples, Mapping):
      raise TypeError(f"client {client_id!r} must map feature names to arrays, got {type(examples).__name__}.")
    spec = {name: (np.shape(value)[1:], np.asarray(value).dtype.kind) for name, value in examples.items()}
    counts = {name: np.shape(value)[0] if np.ndim(value) else None for name, value in examples.items()}
    if any(count is None for count in counts.values()):
      scalar = next(name for name, count in counts.items() if count is None)
      raise ValueError(f"client {client_id!r}: feature {scalar!r} must have a leading examples axis, got a scalar.")
    if len(set(counts.values())) > 1:
      raise ValueError(f"client {client_id!r}: its features have different numbers of examples: {counts}.")
    if reference is None:
      reference_id, reference, reference_counts = client_id, spec, counts
      continue
    if set(spec) != set(reference):
      raise ValueError(f"client {client_id!r} has features {sorted(spec)}, client {reference_id!r} has "
                       f"{sorted(reference)}; every client needs the same features.")
    for name, (shape, kind) in spec.items():
      if shape != reference[name][0]:
        raise ValueError(f"client {client_id!r}: feature {name!r} has per-example shape {shape}, client "
                         f"{reference_id!r} has {reference[name][0]}; every client needs the same shapes.")
      if kind != reference[name][1] and counts[name] and reference_counts[name]:  # (empty arrays carry no kind)
        raise ValueError(f"client {client_id!r}: feature {name!r} has dtype kind {kind!r}, client "
                         f"{reference_id!r} has {reference[name][1]!r}.")


def signature(round_data: Mapping[str, Any]) -> tuple:
  """The round's structure: sorted ``(name, shape, dtype)`` of its leaves (what decides a compilation)."""
  return tuple(sorted((str(name), tuple(np.shape(value)), str(getattr(value, "dtype", type(value).__name__)))
                      for name, value in round_data.items()))


def check_round_data(round_data: Any, *, name: str = "round_data") -> None:
  """Checks a packed round's structure; raises ``ValueError``/``TypeError`` naming ``name`` and the leaf.

  * a dict with ``mask`` ``[clients, steps, batch]`` (bool) and ``num_examples`` ``[clients]`` (integer);
  * every other leaf ``[clients, steps, batch, ...]`` (``client_state`` leaves and other per-client values
    ``[clients, ...]``: only the client axis is checked for dict-valued entries).
  """
  if not isinstance(round_data, Mapping):
    raise TypeError(f"{name} must be a dict of arrays [clients, steps, batch, ...] with 'mask' and "
                    f"'num_examples' (see fedjax_lite.core.pack_clients), got {type(round_data).__name__}.")
  for required in (MASK, NUM_EXAMPLES):
    if required not in round_data:
      raise ValueError(f"{name} has no {required!r} (it has {sorted(map(str, round_data))}); pack rounds with "
                       "fedjax_lite.core.pack_clients, which adds 'mask' [clients, steps, batch] and "
                       "'num_examples' [clients].")
  mask_shape = np.shape(round_data[MASK])
  if len(mask_shape) != 3:
    raise ValueError(f"{name}['mask'] must have shape [clients, steps, batch], got {mask_shape}.")
  mask = round_data[MASK]
  mask_dtype = np.dtype(mask.dtype if hasattr(mask, "dtype") else np.asarray(mask).dtype)  # tracers have a dtype
  if mask_dtype != np.bool_:
    raise TypeError(f"{name}['mask'] must be boolean, got {mask_dtype}.")
  num_clients = mask_shape[0]
  num_examples_shape = np.shape(round_data[NUM_EXAMPLES])
  if num_examples_shape != (num_clients,):
    raise ValueError(f"{name}['num_examples'] must have shape [clients] = ({num_clients},) like 'mask', got "
                     f"{num_examples_shape}.")
  for key, value in round_data.items():
    if key in (MASK, NUM_EXAMPLES):
      continue
    if isinstance(value, Mapping):  # per-client values (e.g. client_state): only the client axis is shared
      for inner_key, leaf in _flat_items(value, f"{name}[{key!r}]"):
        if np.ndim(leaf) < 1 or np.shape(leaf)[0] != num_clients:
          raise ValueError(f"{inner_key} has {np.shape(leaf)[0] if np.ndim(leaf) else 'no'} client rows; 'mask' "
                           f"has {num_clients} clients.")
      continue
    shape = np.shape(value)
    if shape[:3] != mask_shape:
      if len(shape) >= 1 and shape[0] != num_clients:
        raise ValueError(f"{name}[{key!r}] has {shape[0]} clients, 'mask' has {num_clients}: every leaf needs "
                         f"the same leading client axis (shape {shape} vs mask {mask_shape}).")
      raise ValueError(f"{name}[{key!r}] has shape {shape}; it must start with the mask's [clients, steps, batch] "
                       f"= {mask_shape}.")


def _flat_items(tree: Mapping[str, Any], prefix: str):
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _flat_items(value, f"{prefix}[{key!r}]")
    else:
      yield f"{prefix}[{key!r}]", value


class RoundDataChecker:
  """:func:`check_round_data` once per distinct :func:`signature` (a run has one or a few), then a set lookup."""

  def __init__(self, name: str = "round_data"):
    self.name = name
    self._seen: set[tuple] = set()

  def __call__(self, round_data: Mapping[str, Any]) -> None:
    key = signature(round_data) if isinstance(round_data, Mapping) else None
    if key is not None and key in self._seen:
      return
    check_round_data(round_data, name=self.name)
    self._seen.add(key)


def check_labels(examples: Mapping[str, Any], num_classes: int, *, label_key: str = "y",
                 name: str = "train_data", client_ids: Sequence[Any] | None = None,
                 client_offsets: Any = None) -> None:
  """Integer labels ``examples[label_key]`` must lie in ``[0, num_classes)``.

  Out-of-range labels make softmax cross-entropy NaN (``jax.nn.log_softmax`` indexed out of bounds), every client
  is then rejected as non-finite, and training silently does nothing; this check names the input instead.

  Args:
    examples: the population's examples (``FederatedData.examples``) or a centralized set.
    num_classes: the model's number of classes.
    label_key: the label feature.
    name: the input's name in the message.
    client_ids, client_offsets: with a population (``FederatedData.client_ids`` and ``.offsets``), the
      message names the client holding the first bad label.
  """
  validation.check_int("num_classes", num_classes, minimum=1)
  if label_key not in examples:
    raise ValueError(f"{name} has no label feature {label_key!r} (it has {sorted(examples)}).")
  labels = np.asarray(examples[label_key])
  if labels.size == 0:
    return
  if not np.issubdtype(labels.dtype, np.integer):
    raise TypeError(f"{name}[{label_key!r}] must hold integer class labels, got {labels.dtype}.")
  low, high = int(labels.min()), int(labels.max())
  if low < 0 or high >= num_classes:
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    flat = labels.reshape(-1)
    prefix = f"{name}[{label_key!r}] has labels outside the model's {num_classes} classes [0, {num_classes})"
    if client_ids is not None and client_offsets is not None:
      per_example = max(1, flat.size // max(1, labels.shape[0]))
      offsets = np.asarray(client_offsets)
      examples_of_bad = bad // per_example
      clients_of_bad = np.searchsorted(offsets, examples_of_bad, side="right") - 1
      first = int(clients_of_bad[0])
      others = sorted({client_ids[int(k)] for k in clients_of_bad[1:].tolist()} - {client_ids[first]}, key=str)
      more = (f"; {bad.size - 1} more in {'this client' if not others else 'clients'}"
              f"{'' if not others else ' ' + ', '.join(repr(c) for c in others[:5])}"
              f"{'' if len(others) <= 5 else ', ...'}") if bad.size > 1 else ""
      raise ValueError(f"{prefix}: client {client_ids[first]!r} has label {flat[bad[0]].item()} (its example "
                       f"{int(examples_of_bad[0] - offsets[first])}){more}; labels range over [{low}, {high}].")
    raise ValueError(f"{prefix}: {flat[bad[:5]].tolist()} (at example {bad[:5].tolist()}; {bad.size} in all, "
                     f"range [{low}, {high}]).")
