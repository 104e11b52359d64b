"""The flax adapter: :func:`from_flax` turns a ``flax.linen`` module into a :class:`~fedjax_lite.core.model.Model`.

It sits with the models (layer 5) so that ``fedjax_lite.core`` stays free of flax: algorithms only ever see the
``Model``'s pure functions.

A module with variable collections besides ``params`` (BatchNorm's ``batch_stats``) becomes a model with state
(:attr:`~fedjax_lite.core.model.Model.state_collections`): its params are flax's whole variables dict
``{'params': ..., 'batch_stats': ...}``, training runs the module with those collections mutable and the example
mask, and evaluation (``train=False``) reads the stored running statistics. A module without other collections
keeps exactly the params it always had (``variables['params']``).
"""

from __future__ import annotations

import inspect
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_lite.core.model import (
    Batch,
    Model,
    Params,
    PerExampleFn,
    accuracy_metric,
    softmax_cross_entropy_loss,
)


def _takes(module: nn.Module, argument: str) -> bool:
  """Whether ``module.__call__`` accepts ``argument`` (by name, or through ``**kwargs``)."""
  try:
    parameters = inspect.signature(type(module).__call__).parameters
  except (TypeError, ValueError):
    return True
  return argument in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def _takes_train(module: nn.Module) -> bool:
  """Whether ``module.__call__`` accepts a ``train`` argument (by name, or through ``**kwargs``)."""
  return _takes(module, "train")


def from_flax(
    module: nn.Module,
    sample_input: jax.Array,
    *,
    input_key: str = "x",
    loss: PerExampleFn | None = None,
    metrics: Mapping[str, PerExampleFn] | None = None,
    label_key: str = "y",
    name: str | None = None,
    require_mask: bool = True,
) -> Model:
  """Adapts a ``flax.linen`` module to a :class:`~fedjax_lite.core.model.Model`.

  The module is called as ``module(inputs, train=train)`` when its ``__call__`` takes a ``train`` argument (dropout
  and the like switch on during local training), else as ``module(inputs)``.

  Defaults suit classification: softmax cross-entropy against ``batch[label_key]`` and accuracy. The ``params``
  collection is what gradients train.

  Non-trainable collections (BatchNorm's ``batch_stats``): the model's params are then the whole variables dict
  ``{'params': ..., 'batch_stats': ...}`` and the model has state (``Model.state_collections``, every collection
  but ``params``; ``Model.train_apply``). In training the module runs as ``module(inputs, train=True,
  mask=mask)`` with those collections mutable, ``mask`` ``[batch]`` marking the real examples (pass it on to
  ``nn.BatchNorm(...)(x, mask=...)``, broadcast to ``x``'s shape, so that padded slots stay out of the batch
  statistics), and :func:`~fedjax_lite.algorithms.train_locally` writes the new statistics over the old after each
  step; in evaluation it runs as ``module(inputs, train=False)`` and should read its running averages
  (``use_running_average=not train``). Such a module must take ``train``, and ``mask`` unless ``require_mask`` is
  False. How the statistics federate is a matter of labels (:mod:`fedjax_lite.core.param_partition`): ``local``
  (FedBN) or ``global``, and :func:`~fedjax_lite.core.split_model_state` separates them from the trained
  parameters, e.g. to aggregate them as a plain mean.

  Example, a model with batch statistics::

    class Net(nn.Module):
      @nn.compact
      def __call__(self, x, train: bool = False, mask=None):
        x = nn.Dense(16)(x)
        x = nn.BatchNorm(use_running_average=not train)(x, mask=None if mask is None else mask[:, None])
        return nn.Dense(3)(nn.relu(x))

    model = from_flax(Net(), jnp.zeros((1, 5)))   # params: {'params': ..., 'batch_stats': ...}

  Args:
    module: the flax module.
    sample_input: an input batch of the right shape and dtype (batch size does not matter), used by ``init``.
    input_key: the batch key holding the module's input.
    loss: per-example loss; default softmax cross-entropy with integer labels.
    metrics: per-example metrics; default ``{'accuracy': ...}``.
    label_key: the batch key holding labels for the default loss and metrics.
    name: a label; default the module's class name.
    require_mask: for a module with non-trainable collections, refuse one whose ``__call__`` takes no ``mask``
      (its batch statistics would include padded slots, which hold copies of a real example); False accepts it.
  """
  if not isinstance(module, nn.Module):
    raise TypeError(f"module must be a flax.linen.Module, got {type(module).__name__}.")
  sample_input = jnp.asarray(sample_input)
  if sample_input.ndim < 1:
    raise ValueError("sample_input must have a leading batch axis.")
  takes_train = _takes_train(module)
  train_kwargs = (lambda train: {"train": train}) if takes_train else (lambda train: {})
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), sample_input, **train_kwargs(False)))
  if "params" not in variables and variables:
    raise ValueError(f"module has variable collections {sorted(variables)} but no 'params'.")
  state_collections = tuple(sorted(set(variables) - {"params"}))
  name = name or type(module).__name__
  loss = loss if loss is not None else softmax_cross_entropy_loss(label_key)
  metrics = dict(metrics) if metrics is not None else {"accuracy": accuracy_metric(label_key)}

  def rngs_for(rng: jax.Array | None, train: bool) -> dict:
    return {"dropout": rng} if (train and rng is not None) else {}

  if not state_collections:

    def init(rng: jax.Array) -> Params:
      return module.init({"params": rng, "dropout": rng}, sample_input, **train_kwargs(False))["params"]

    def apply(params: Params, batch: Batch, rng: jax.Array | None, train: bool) -> jax.Array:
      return module.apply({"params": params}, batch[input_key], rngs=rngs_for(rng, train), **train_kwargs(train))

    return Model(init=init, apply=apply, loss=loss, metrics=metrics, name=name)

  if not takes_train:
    raise ValueError(
        f"module {name} has non-trainable variable collections {list(state_collections)} but its __call__ takes "
        "no `train` argument: evaluation must read the running statistics (use_running_average=not train) while "
        "training computes them from the batch. Add a `train: bool = False` argument.")
  takes_mask = _takes(module, "mask")
  if require_mask and not takes_mask:
    raise ValueError(
        f"module {name} has non-trainable variable collections {list(state_collections)} (e.g. BatchNorm's "
        "batch_stats) but its __call__ takes no `mask` argument: in training, padded slots (copies of a real "
        "example) would enter the batch statistics. Add `mask=None` to __call__ and pass it on, e.g. "
        "nn.BatchNorm(use_running_average=not train)(x, mask=mask[:, None]) (broadcast to x's shape); or pass "
        "require_mask=False to accept the padded slots in the statistics.")
  mutable = list(state_collections)

  def init(rng: jax.Array) -> Params:
    return dict(module.init({"params": rng, "dropout": rng}, sample_input, **train_kwargs(False)))

  def apply(params: Params, batch: Batch, rng: jax.Array | None, train: bool) -> jax.Array:
    if not train:
      return module.apply(params, batch[input_key], train=False)
    predictions, _ = module.apply(params, batch[input_key], rngs=rngs_for(rng, True), mutable=mutable, train=True)
    return predictions

  def train_apply(params: Params, batch: Batch, mask: jax.Array, rng: jax.Array | None):
    mask_kwargs = {"mask": mask} if takes_mask else {}
    predictions, updated = module.apply(params, batch[input_key], rngs=rngs_for(rng, True), mutable=mutable,
                                        train=True, **mask_kwargs)
    return predictions, {collection: updated[collection] for collection in state_collections}

  return Model(init=init, apply=apply, loss=loss, metrics=metrics, name=name, train_apply=train_apply,
               state_collections=state_collections)
