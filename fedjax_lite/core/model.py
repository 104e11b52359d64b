"""The model adapter: everything an algorithm needs to know about a model, as pure functions.

A :class:`Model` bundles ``init``, ``apply``, a per-example ``loss`` and per-example ``metrics``. Algorithms never
see flax modules; :func:`fedjax_lite.models.from_flax` adapts a ``flax.linen`` module (core does not import flax).
Batches are dicts of arrays with a leading batch axis; a boolean ``mask`` of the same leading shape
marks real examples. :func:`masked_loss_and_metric_sums` is the one place where padding is excluded: padded
examples are overwritten by a real one before the forward pass and carry no weight in the loss, its gradient or
any metric.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from fedjax_lite.core.tree import PyTree

Params = PyTree
Batch = Mapping[str, jax.Array]
PerExampleFn = Callable[[Batch, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True, eq=False)  # compared and hashed by identity: usable as a static jit argument
class Model:
  """A model as pure functions.

  Attributes:
    init: ``rng -> params`` (the trainable parameters, a pytree).
    apply: ``(params, batch, rng, train) -> predictions`` with a leading batch axis; ``rng`` may be None when
      ``train`` is False (dropout and other randomness only run in training).
    loss: ``(batch, predictions) -> per-example loss`` of shape ``[batch]``.
    metrics: name -> ``(batch, predictions) -> per-example value [batch]``; each metric is reported as its
      example-weighted mean over real examples (as TFF's ``sum_then_finalize`` does).
    name: a label used in logs.
  """

  init: Callable[[jax.Array], Params]
  apply: Callable[[Params, Batch, jax.Array | None, bool], jax.Array]
  loss: PerExampleFn
  metrics: Mapping[str, PerExampleFn] = dataclasses.field(default_factory=dict)
  name: str = "model"

  def __post_init__(self):
    for field in ("init", "apply", "loss"):
      if not callable(getattr(self, field)):
        raise TypeError(f"Model.{field} must be callable, got {type(getattr(self, field)).__name__}.")
    for metric_name, fn in self.metrics.items():
      if not callable(fn):
        raise TypeError(f"Model.metrics[{metric_name!r}] must be callable, got {type(fn).__name__}.")
      if metric_name == "loss" or metric_name.startswith("num_"):
        raise ValueError(f"Model.metrics may not be named {metric_name!r}: 'loss' and names starting with 'num_' "
                         "are reserved for the loss and the counters.")


def softmax_cross_entropy_loss(label_key: str = "y") -> PerExampleFn:
  """Per-example softmax cross-entropy against integer labels ``batch[label_key]``."""

  def loss(batch: Batch, logits: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[label_key].astype(jnp.int32))

  return loss


def accuracy_metric(label_key: str = "y") -> PerExampleFn:
  """Per-example 0/1 correctness of ``argmax(logits)`` against ``batch[label_key]``."""

  def accuracy(batch: Batch, logits: jax.Array) -> jax.Array:
    return (jnp.argmax(logits, axis=-1) == batch[label_key].astype(jnp.int32)).astype(jnp.float32)

  return accuracy


def fill_padding(batch: Batch, mask: jax.Array) -> dict[str, jax.Array]:
  """Overwrites every padded example with a copy of the batch's first real example (zeros if there is none).

  Applies to every batch entry whose leading axis matches the 1-D ``mask``. After this nothing about a padded
  example's stored values can reach the forward pass, even NaN or Inf; and since a padded slot then holds a real
  example, any model that is finite on real data is finite on it, so the masked-out slots cannot poison the
  gradient through ``0 * NaN`` (zeros would: e.g. a model normalizing its input by its norm).
  """
  mask = jnp.asarray(mask, bool)
  first_real = jnp.argmax(mask)
  any_real = jnp.any(mask)
  out = {}
  for key, value in batch.items():
    value = jnp.asarray(value)
    if value.shape[: mask.ndim] == mask.shape:
      fill = jnp.where(any_real, value[first_real], jnp.zeros((), value.dtype))
      expanded = mask.reshape(mask.shape + (1,) * (value.ndim - mask.ndim))
      value = jnp.where(expanded, value, fill[None])
    out[key] = value
  return out


def masked_loss_and_metric_sums(
    model: Model,
    params: Params,
    batch: Batch,
    mask: jax.Array,
    rng: jax.Array | None,
    train: bool,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The batch's mean loss over real examples, and the sums that metrics are built from.

  ``mean_loss = sum_b mask_b * loss_b / max(1, sum_b mask_b)``. The sums are ``loss`` (sum of per-example losses)
  and one entry per model metric (sum of per-example values), float32, and ``num_examples`` (int32 count of real
  examples), all over real examples only. The mean loss is what a gradient step differentiates.
  """
  mask = jnp.asarray(mask, bool)
  batch = fill_padding({key: value for key, value in batch.items() if key != "mask"}, mask)
  predictions = model.apply(params, batch, rng, train)
  num_examples = mask.sum(dtype=jnp.int32)
  per_example_loss = model.loss(batch, predictions).astype(jnp.float32)
  loss_sum = jnp.sum(jnp.where(mask, per_example_loss, 0.0))
  sums = {"loss": loss_sum}
  for metric_name, metric_fn in model.metrics.items():
    values = metric_fn(batch, predictions).astype(jnp.float32)
    sums[metric_name] = jnp.sum(jnp.where(mask, values, 0.0))
  sums["num_examples"] = num_examples
  mean_loss = loss_sum / jnp.maximum(num_examples, 1).astype(jnp.float32)
  return mean_loss, sums


def finalize_metric_sums(sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Turns summed metrics into means: every key but the counters is divided by ``num_examples``.

  Counters (``num_examples``, ``num_batches`` and any key starting with ``num_``) are returned as they are. With
  no examples the means are NaN (there is nothing to average), as TFF's Keras metrics report.
  """
  num_examples = sums["num_examples"]
  out = {}
  for key, value in sums.items():
    if key.startswith("num_"):
      out[key] = value
    else:
      out[key] = value / num_examples
  return out
