"""Packing a round's clients into dense padded arrays ``[clients, steps, batch, ...]`` with a mask.

This is the host-side half of a round (numpy, fully vectorized over clients). For each client of the cohort its
examples are repeated for ``num_epochs`` epochs, each epoch shuffled independently, concatenated and cut into
batches of ``batch_size`` (as TFF's ``dataset.shuffle().repeat(E).batch(B)``: only a client's last batch may be
partial), optionally capped at ``max_steps`` batches, and at a per-client ``step_budget`` (the steps a straggler
managed before a deadline, :mod:`fedjax_lite.systems`: its first ``step_budget[k]`` batches of the same shuffled
stream, so ``num_examples`` and the local loop's step count cover only the steps it did). The result is one dict:

* every feature, shaped ``[clients, steps, batch, *example_shape]``;
* ``mask``: bool ``[clients, steps, batch]``, True for real examples;
* ``num_examples``: int32 ``[clients]``, the number of real examples a client processes (epochs included).

Padded entries are zeros and masked; a padded client (when the cohort is padded to ``cohort_size``) has
``num_examples == 0`` and is ignored by the runner. The step axis is bucketed (:func:`bucket_num_steps`) so that
rounds of different clients share a few compiled shapes; pass ``num_steps`` (e.g. from :func:`max_num_steps` over
the whole population) to make every round the same shape and compile once.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from fedjax_lite.core import sampling
from fedjax_lite.core.federated_data import FederatedData


def bucket_num_steps(num_steps: int) -> int:
  """The smallest power of two >= ``num_steps`` (>= 1): the step-axis length used for padding."""
  if num_steps < 1:
    return 1
  return 1 << (int(num_steps) - 1).bit_length()


def _check_positive_int(name: str, value, allow_none: bool = False) -> None:
  if value is None and allow_none:
    return
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}.")


def max_num_steps(
    data: FederatedData, *, batch_size: int, num_epochs: int = 1, max_steps: int | None = None
) -> int:
  """The bucketed step count that fits every client of ``data``: pass it as ``num_steps`` to compile once."""
  _check_positive_int("batch_size", batch_size)
  _check_positive_int("num_epochs", num_epochs)
  _check_positive_int("max_steps", max_steps, allow_none=True)
  return bucket_num_steps(int(data.num_steps(batch_size, num_epochs, max_steps).max()))


def pack_clients(
    data: FederatedData,
    client_indices: Sequence[int] | np.ndarray,
    *,
    batch_size: int,
    num_epochs: int = 1,
    max_steps: int | None = None,
    num_steps: int | None = None,
    cohort_size: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    round_num: int = 0,
    client_slots: tuple[int, int] | None = None,
    step_budget: Sequence[int] | np.ndarray | None = None,
) -> dict[str, np.ndarray]:
  """Packs the clients ``client_indices`` of ``data`` into dense padded arrays.

  Args:
    data: the population.
    client_indices: storage indices of the round's clients (repeats allowed).
    batch_size: examples per local step.
    num_epochs: passes over each client's data.
    max_steps: optional cap on each client's local steps (examples beyond it are not used this round, as TFF's
      ``ClientSpec.max_elements``).
    num_steps: length of the step axis; default the power-of-two bucket of the cohort's largest step count.
      It must fit every client (use ``max_steps`` to cut clients short instead).
    cohort_size: length of the client axis; default ``len(client_indices)``. Extra slots are empty clients.
    shuffle: shuffle each epoch (from ``(seed, round_num)``); False keeps storage order.
    seed: the run's seed.
    round_num: the round, so each round shuffles differently yet reproducibly.
    client_slots: optional ``(start, stop)``: return only client slots ``start..stop-1`` of the packed cohort,
      equal to packing all ``cohort_size`` slots and slicing, but gathering only those clients' examples (a
      process of a multi-process run packs its own share: :mod:`fedjax_lite.training.distributed`).
    step_budget: optional int ``[len(client_indices)]``, >= 0: client ``k`` takes at most ``step_budget[k]``
      local steps this round (after ``max_steps``): its first batches of the same shuffled stream, the rest
      masked, so its ``num_examples`` (its weight) and the local loop's real steps count only the steps done
      (FedProx's "variable amounts of work", Li et al. 2020). A budget of 0 leaves the slot empty (weight 0, like
      padding). The packed shapes do not change.

  Returns:
    dict of numpy arrays as described in the module docstring.
  """
  if not isinstance(data, FederatedData):
    raise TypeError(f"data must be a FederatedData, got {type(data).__name__}.")
  _check_positive_int("batch_size", batch_size)
  _check_positive_int("num_epochs", num_epochs)
  _check_positive_int("max_steps", max_steps, allow_none=True)
  _check_positive_int("num_steps", num_steps, allow_none=True)
  _check_positive_int("cohort_size", cohort_size, allow_none=True)
  client_indices = np.asarray(client_indices, dtype=np.int64).reshape(-1)
  num_real = client_indices.shape[0]
  if np.any((client_indices < 0) | (client_indices >= data.num_clients)):
    raise ValueError(f"client_indices must lie in [0, {data.num_clients}).")
  cohort_size = num_real if cohort_size is None else int(cohort_size)
  if cohort_size < num_real or cohort_size < 1:
    raise ValueError(f"cohort_size ({cohort_size}) must be >= the number of clients given ({num_real}) and >= 1.")
  first, stop = (0, cohort_size) if client_slots is None else (int(client_slots[0]), int(client_slots[1]))
  if client_slots is not None and not 0 <= first < stop <= cohort_size:
    raise ValueError(f"client_slots must be (start, stop) with 0 <= start < stop <= cohort_size ({cohort_size}), "
                     f"got {client_slots!r}.")

  sizes = data.client_sizes[client_indices]
  processed = sizes * num_epochs
  if max_steps is not None:
    processed = np.minimum(processed, max_steps * batch_size)
  if step_budget is not None:
    budget = np.asarray(step_budget)
    if budget.shape != (num_real,) or not (np.issubdtype(budget.dtype, np.integer) or budget.size == 0):
      raise ValueError(f"step_budget must be integers, one per client of client_indices ({num_real}), got shape "
                       f"{budget.shape} and dtype {budget.dtype}.")
    if np.any(budget < 0):
      raise ValueError(f"step_budget must be >= 0, got {budget[budget < 0][:5].tolist()} at client positions "
                       f"{np.flatnonzero(budget < 0)[:5].tolist()}.")
    processed = np.minimum(processed, budget.astype(np.int64) * batch_size)
  steps_needed = -(-processed // batch_size)
  largest = int(steps_needed.max()) if num_real else 1
  if num_steps is None:
    num_steps = bucket_num_steps(largest)
  elif largest > num_steps:
    raise ValueError(
        f"num_steps ({num_steps}) is smaller than the {largest} steps a client of this round needs; raise "
        "num_steps or cap clients with max_steps."
    )
  slots = num_steps * batch_size

  # Row index (into data.examples) of every processed example, grouped by client, then epoch.
  per_client = sizes * num_epochs
  total = int(per_client.sum())
  client_pos = np.repeat(np.arange(num_real), per_client)
  segment_start = np.concatenate([[0], np.cumsum(per_client)[:-1]]) if num_real else np.zeros(0, np.int64)
  position = np.arange(total) - segment_start[client_pos]
  client_size = sizes[client_pos]
  epoch = position // client_size
  rows = data.offsets[client_indices][client_pos] + position % client_size
  if shuffle and total:
    generator = sampling.round_generator(seed, round_num, sampling.PACKING_STREAM)
    order = np.lexsort((generator.random(total), epoch, client_pos))
    rows = rows[order]  # the (client, epoch) groups keep their places; only rows inside a group move.
  keep = (position < processed[client_pos]) & (client_pos >= first) & (client_pos < stop)
  flat = np.full((stop - first) * slots, -1, dtype=np.int64)
  flat[(client_pos[keep] - first) * slots + position[keep]] = rows[keep]
  mask = flat >= 0
  gather = np.where(mask, flat, 0)

  packed = {}
  for key, values in data.examples.items():
    gathered = values[gather]
    gathered[~mask] = 0
    packed[key] = gathered.reshape((stop - first, num_steps, batch_size) + values.shape[1:])
  packed["mask"] = mask.reshape(stop - first, num_steps, batch_size)
  num_examples = np.zeros(cohort_size, np.int32)
  num_examples[:num_real] = processed
  packed["num_examples"] = num_examples[first:stop]
  return packed


def pack_centralized(
    examples: dict[str, np.ndarray], *, batch_size: int, num_steps: int | None = None
) -> dict[str, np.ndarray]:
  """Packs centralized examples (e.g. a test set) as ONE client ``[1, steps, batch, ...]``, in order."""
  data = FederatedData(("all",), examples, np.array([0, len(next(iter(examples.values())))]))
  return pack_clients(data, [0], batch_size=batch_size, num_steps=num_steps, shuffle=False)


@dataclasses.dataclass(frozen=True)
class ClientSpec:
  """How each client's data is turned into local steps (TFF ``ClientSpec``): batch size, epochs, step cap.

  Attributes:
    batch_size: examples per local step (> 0).
    num_epochs: passes over the client's data (> 0).
    max_steps: optional cap on local steps (> 0).
    shuffle: shuffle each epoch from ``(seed, round_num)``.
  """

  batch_size: int
  num_epochs: int = 1
  max_steps: int | None = None
  shuffle: bool = True

  def __post_init__(self):
    _check_positive_int("batch_size", self.batch_size)
    _check_positive_int("num_epochs", self.num_epochs)
    _check_positive_int("max_steps", self.max_steps, allow_none=True)
    if not isinstance(self.shuffle, bool):
      raise TypeError(f"shuffle must be a bool, got {type(self.shuffle).__name__}.")

  def max_num_steps(self, data: FederatedData) -> int:
    """The bucketed step-axis length that fits every client of ``data``."""
    return max_num_steps(data, batch_size=self.batch_size, num_epochs=self.num_epochs, max_steps=self.max_steps)

  def pack(
      self,
      data: FederatedData,
      client_indices,
      *,
      seed: int,
      round_num: int,
      num_steps: int | None = None,
      cohort_size: int | None = None,
      client_slots: tuple[int, int] | None = None,
      step_budget: Sequence[int] | np.ndarray | None = None,
  ) -> dict[str, np.ndarray]:
    """:func:`pack_clients` with this spec."""
    return pack_clients(
        data, client_indices, batch_size=self.batch_size, num_epochs=self.num_epochs, max_steps=self.max_steps,
        num_steps=num_steps, cohort_size=cohort_size, shuffle=self.shuffle, seed=seed, round_num=round_num,
        client_slots=client_slots, step_budget=step_budget,
    )

  def num_examples(self, data: FederatedData, client_indices) -> np.ndarray:
    """The examples each of ``client_indices`` processes under this spec (epochs, ``max_steps``): int64."""
    indices = np.asarray(client_indices, dtype=np.int64).reshape(-1)
    processed = (data.offsets[indices + 1] - data.offsets[indices]) * self.num_epochs
    return processed if self.max_steps is None else np.minimum(processed, self.max_steps * self.batch_size)

  def num_steps(self, data: FederatedData, client_indices) -> np.ndarray:
    """The local steps each of ``client_indices`` takes under this spec: ``ceil(num_examples / batch_size)``."""
    return -(-self.num_examples(data, client_indices) // self.batch_size)
