"""The model adapter: everything an algorithm needs to know about a model, as pure functions.

A :class:`Model` bundles ``init``, ``apply``, a per-example ``loss`` and per-example ``metrics``. Algorithms never
see flax modules; :func:`fedjax_lite.models.from_flax` adapts a ``flax.linen`` module (core does not import flax).
Batches are dicts of arrays with a leading batch axis; a boolean ``mask`` of the same leading shape
marks real examples. :func:`masked_loss_and_metric_sums` is the one place where padding is excluded: padded
examples are overwritten by a real one before the forward pass and carry no weight in the loss, its gradient or
any metric.

Models with non-trainable state (BatchNorm's running statistics: flax's mutable collections) keep it in their
params, as top-level entries named by :attr:`Model.state_collections` (``{'params': ..., 'batch_stats': ...}``),
so that it is broadcast, labelled (:mod:`fedjax_lite.core.param_partition`: local for FedBN, or global and
aggregated) and checkpointed like any parameter. It is never trained by gradient: the training forward pass
(:attr:`Model.train_apply`, given the example mask so that padding stays out of the batch statistics) returns its
new value, which local training writes over the state after each optimizer step (:func:`with_model_state`);
evaluation (``train=False``) reads the stored running statistics.
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
ModelState = dict  # {collection name: its new value}: what a training forward pass returns besides predictions


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
    train_apply: only for a model with non-trainable state (default None: none). ``(params, batch, mask, rng) ->
      (predictions, new_state)``: the training forward pass, where ``mask`` ``[batch]`` marks the real examples
      (padded ones must not enter batch statistics) and ``new_state`` is ``{collection: new value}`` for each of
      :attr:`state_collections`. ``apply(params, batch, rng, True)`` of such a model gives the same predictions
      without a mask and discards the new state; ``apply(..., False)`` reads the stored state (running averages).
    state_collections: the top-level keys of ``params`` that hold non-trainable state (e.g. ``('batch_stats',)``);
      empty (the default) for a model without; non-empty exactly when ``train_apply`` is set.
  """

  init: Callable[[jax.Array], Params]
  apply: Callable[[Params, Batch, jax.Array | None, bool], jax.Array]
  loss: PerExampleFn
  metrics: Mapping[str, PerExampleFn] = dataclasses.field(default_factory=dict)
  name: str = "model"
  train_apply: Callable[[Params, Batch, jax.Array, jax.Array | None], tuple[jax.Array, ModelState]] | None = None
  state_collections: tuple[str, ...] = ()

  def __post_init__(self):
    for field in ("init", "apply", "loss"):
      if not callable(getattr(self, field)):
        raise TypeError(f"Model.{field} must be callable, got {type(getattr(self, field)).__name__}.")
    if isinstance(self.state_collections, str) or not all(
        isinstance(c, str) for c in _as_tuple(self.state_collections)):
      raise TypeError(f"Model.state_collections must be a tuple of collection names (str), got "
                      f"{self.state_collections!r}.")
    object.__setattr__(self, "state_collections", tuple(self.state_collections))
    if self.train_apply is not None and not callable(self.train_apply):
      raise TypeError(f"Model.train_apply must be callable or None, got {type(self.train_apply).__name__}.")
    if (self.train_apply is None) != (not self.state_collections):
      raise ValueError(
          "Model.train_apply and Model.state_collections go together: a model with non-trainable state sets both "
          f"(got train_apply={'set' if self.train_apply is not None else None}, "
          f"state_collections={self.state_collections!r}).")
    for metric_name, fn in self.metrics.items():
      if not callable(fn):
        raise TypeError(f"Model.metrics[{metric_name!r}] must be callable, got {type(fn).__name__}.")
      if metric_name == "loss" or metric_name.startswith("num_"):
        raise ValueError(f"Model.metrics may not be named {metric_name!r}: 'loss' and names starting with 'num_' "
                         "are reserved for the loss and the counters.")


def _as_tuple(value) -> tuple:
  try:
    return tuple(value)
  except TypeError:
    return (value,)


def split_model_state(model: Model, params: Params) -> tuple[Params, ModelState]:
  """``(trainable, state)``: ``params`` without and with only its :attr:`Model.state_collections` entries.

  Works on any tree with the params' top-level keys (a partition from
  :func:`fedjax_lite.core.param_partition.split_params`, an update, a client upload), e.g. to aggregate batch
  statistics as a plain mean beside trained parameters. For a model without state: ``(params, {})``.
  """
  if not model.state_collections:
    return params, {}
  _check_state_keys(model, params, "params")
  trainable = {key: value for key, value in params.items() if key not in model.state_collections}
  return trainable, {key: params[key] for key in model.state_collections}


def with_model_state(model: Model, params: Params, state: Mapping[str, PyTree]) -> Params:
  """``params`` with its state collections replaced by ``state`` (``{collection: value}``, all of
  :attr:`Model.state_collections`): the inverse of :func:`split_model_state`, and what local training does after
  each optimizer step with the state returned by the training forward pass. A model without state returns
  ``params`` itself."""
  if not model.state_collections:
    if state:
      raise ValueError(f"model {model.name!r} has no state collections, got state for {sorted(state)}.")
    return params
  _check_state_keys(model, params, "params")
  if set(state) != set(model.state_collections):
    raise ValueError(f"state must hold exactly the model's state collections {list(model.state_collections)}, "
                     f"got {sorted(state)}.")
  return {**{key: value for key, value in params.items() if key not in model.state_collections}, **state}


def _check_state_keys(model: Model, params: Params, name: str) -> None:
  if not isinstance(params, Mapping) or not set(model.state_collections) <= set(params):
    keys = sorted(params) if isinstance(params, Mapping) else type(params).__name__
    raise ValueError(f"{name} of model {model.name!r} must be a dict holding its state collections "
                     f"{list(model.state_collections)} at the top level, got {keys}.")


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
  examples), all over real examples only. The mean loss is what a gradient step differentiates. For a model with
  state, ``train=True`` runs :attr:`Model.train_apply` with ``mask`` (padding stays out of batch statistics) and
  discards the new state; :func:`masked_loss_metric_sums_and_state` returns it.
  """
  mean_loss, sums, _ = _masked_forward(model, params, batch, mask, rng, train)
  return mean_loss, sums


def masked_loss_metric_sums_and_state(
    model: Model,
    params: Params,
    batch: Batch,
    mask: jax.Array,
    rng: jax.Array | None,
) -> tuple[jax.Array, tuple[dict[str, jax.Array], ModelState]]:
  """The training forward pass: ``(mean_loss, (sums, new_state))``, shaped for ``jax.value_and_grad(...,
  has_aux=True)``.

  As :func:`masked_loss_and_metric_sums` with ``train=True``; ``new_state`` is the model's updated non-trainable
  state (``{collection: value}``, from :attr:`Model.train_apply`; ``{}`` for a model without state), to be written
  over the stepped params with :func:`with_model_state`.
  """
  mean_loss, sums, new_state = _masked_forward(model, params, batch, mask, rng, True)
  return mean_loss, (sums, new_state)


def _masked_forward(model, params, batch, mask, rng, train):
  mask = jnp.asarray(mask, bool)
  batch = fill_padding({key: value for key, value in batch.items() if key != "mask"}, mask)
  if train and model.train_apply is not None:
    predictions, new_state = model.train_apply(params, batch, mask, rng)
    if not isinstance(new_state, Mapping) or set(new_state) != set(model.state_collections):
      raise ValueError(f"Model.train_apply of {model.name!r} must return (predictions, {{collection: value}}) for "
                       f"its state collections {list(model.state_collections)}, got state "
                       f"{sorted(new_state) if isinstance(new_state, Mapping) else type(new_state).__name__}.")
    new_state = dict(new_state)
  else:
    predictions, new_state = model.apply(params, batch, rng, train), {}
  num_examples = mask.sum(dtype=jnp.int32)
  per_example_loss = model.loss(batch, predictions).astype(jnp.float32)
  loss_sum = jnp.sum(jnp.where(mask, per_example_loss, 0.0))
  sums = {"loss": loss_sum}
  for metric_name, metric_fn in model.metrics.items():
    values = metric_fn(batch, predictions).astype(jnp.float32)
    sums[metric_name] = jnp.sum(jnp.where(mask, values, 0.0))
  sums["num_examples"] = num_examples
  mean_loss = loss_sum / jnp.maximum(num_examples, 1).astype(jnp.float32)
  return mean_loss, sums, new_state


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
