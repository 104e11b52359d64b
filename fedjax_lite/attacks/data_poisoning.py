"""Data poisoning: malicious clients train on corrupted data (label flipping), chosen by seed each round.

A data attack is a transformation of the round's packed data (:mod:`fedjax_lite.core.packing`: leaves with a
leading client axis, ``num_examples`` marking real clients) given the malicious mask:
``transform(round_data, malicious) -> round_data``. The clients then run the algorithm's honest client update on
their poisoned data, so every aggregator, clipping and DP step sees a well-formed update.

* :func:`label_flip` (Biggio, Nelson & Laskov 2012; Tolpegin et al. 2020 "Data Poisoning Attacks Against
  Federated Learning Systems"): a malicious client's label ``y`` becomes ``num_classes - 1 - y``.
* :func:`with_data_poisoning` wraps an algorithm ``Process`` so that ``next`` poisons the malicious clients'
  data before running; the malicious slots come from
  :func:`~fedjax_lite.attacks.selection.choose_malicious` with the round number read from the server state's
  ``round_num`` (every algorithm of :mod:`fedjax_lite.algorithms` keeps one), so with the same ``seed`` the same
  slots are chosen as by :func:`~fedjax_lite.attacks.byzantine_aggregator`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from fedjax_lite.attacks.selection import check_fraction, check_seed, choose_malicious
from fedjax_lite.core import validation
from fedjax_lite.core.process import Process
from fedjax_lite.core.runner import client_mask
from fedjax_lite.core.tree import PyTree

DataTransform = Callable[[PyTree, jax.Array], PyTree]


def flip_labels(round_data: PyTree, malicious: jax.Array, num_classes: int, label_key: str = "y") -> PyTree:
  """``round_data`` with ``y -> num_classes - 1 - y`` for the malicious clients' labels (others unchanged).

  Args:
    round_data: the packed round, a dict whose ``label_key`` entry holds integer labels ``[clients, ...]``.
    malicious: boolean ``[clients]``.
    num_classes: ``>= 2``; labels are assumed in ``0 .. num_classes - 1``.
    label_key: the entry holding the labels.
  """
  num_classes = validation.check_int("num_classes", num_classes, minimum=2)
  if not isinstance(round_data, dict) or label_key not in round_data:
    raise ValueError(f"round_data must be a dict with a {label_key!r} entry (see label_key).")
  labels = jnp.asarray(round_data[label_key])
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"round_data[{label_key!r}] must hold integer labels, got dtype {labels.dtype}.")
  malicious = jnp.asarray(malicious, bool)
  if malicious.shape != labels.shape[:1]:
    raise ValueError(f"malicious must have shape {labels.shape[:1]} (one entry per client slot), got "
                     f"{malicious.shape}.")
  flipped = (num_classes - 1 - labels).astype(labels.dtype)
  chosen = malicious.reshape((malicious.shape[0],) + (1,) * (labels.ndim - 1))
  return {**round_data, label_key: jnp.where(chosen, flipped, labels)}


def label_flip(num_classes: int, label_key: str = "y") -> DataTransform:
  """The label-flipping data attack ``(round_data, malicious) -> round_data`` (:func:`flip_labels`)."""
  num_classes = validation.check_int("num_classes", num_classes, minimum=2)
  return lambda round_data, malicious: flip_labels(round_data, malicious, num_classes, label_key)


def with_data_poisoning(process: Process, transform: DataTransform, *, fraction: float, seed: int = 0) -> Process:
  """``process`` whose malicious clients (``floor(fraction * n)`` per round) train on ``transform``-ed data.

  ``next(state, round_data, rng, client_states=None)`` poisons the round data and calls ``process.next``; the
  returned :class:`~fedjax_lite.core.RoundOutput`'s metrics gain
  ``{'attack': {'num_malicious_clients': k}}``. The server state must have a ``round_num`` field (as
  :class:`~fedjax_lite.algorithms.ServerState` does).

  Args:
    process: an algorithm ``Process`` (e.g. ``fed_avg(...)``).
    transform: ``(round_data, malicious) -> round_data``, e.g. ``label_flip(10)``.
    fraction: the malicious fraction in ``[0, 1)``.
    seed: the attack's seed, an int ``>= 0``.

  Example::

    process = with_data_poisoning(fed_avg(model, client_learning_rate=0.1), label_flip(10), fraction=0.3)
  """
  if not isinstance(process, Process):
    raise TypeError(f"process must be a fedjax_lite Process, got {type(process).__name__}.")
  if not callable(transform):
    raise TypeError("transform must be a function (round_data, malicious) -> round_data, e.g. label_flip(10).")
  fraction = check_fraction(fraction)
  seed = check_seed(seed)

  def next_fn(state, round_data, rng, client_states=None):
    if not hasattr(state, "round_num"):
      raise TypeError(f"with_data_poisoning needs a server state with a round_num field, got "
                      f"{type(state).__name__}.")
    malicious = choose_malicious(seed, state.round_num, client_mask(round_data), fraction)
    output = process.next(state, transform(round_data, malicious), rng, client_states)
    metrics = {**output.metrics, "attack": {"num_malicious_clients": jnp.sum(malicious, dtype=jnp.int32)}}
    return output._replace(metrics=metrics)

  return Process(init=process.init, next=next_fn, client_state=process.client_state)
