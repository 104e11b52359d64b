"""The flax adapter: :func:`from_flax` turns a ``flax.linen`` module into a :class:`~fedjax_lite.core.model.Model`.

It sits with the models (layer 5) so that ``fedjax_lite.core`` stays free of flax: algorithms only ever see the
``Model``'s pure functions.
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


def _takes_train(module: nn.Module) -> bool:
  """Whether ``module.__call__`` accepts a ``train`` argument (by name, or through ``**kwargs``)."""
  try:
    parameters = inspect.signature(type(module).__call__).parameters
  except (TypeError, ValueError):
    return True
  return "train" in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def from_flax(
    module: nn.Module,
    sample_input: jax.Array,
    *,
    input_key: str = "x",
    loss: PerExampleFn | None = None,
    metrics: Mapping[str, PerExampleFn] | None = None,
    label_key: str = "y",
    name: str | None = None,
) -> Model:
  """Adapts a ``flax.linen`` module to a :class:`~fedjax_lite.core.model.Model`.

  The module is called as ``module(inputs, train=train)`` when its ``__call__`` takes a ``train`` argument (dropout
  and the like switch on during local training), else as ``module(inputs)``.

  Defaults suit classification: softmax cross-entropy against ``batch[label_key]`` and accuracy. Only the
  ``params`` collection is trained and aggregated; a module with other mutable collections (e.g. BatchNorm
  statistics) is rejected rather than having them silently frozen.

  Args:
    module: the flax module.
    sample_input: an input batch of the right shape and dtype (batch size does not matter), used by ``init``.
    input_key: the batch key holding the module's input.
    loss: per-example loss; default softmax cross-entropy with integer labels.
    metrics: per-example metrics; default ``{'accuracy': ...}``.
    label_key: the batch key holding labels for the default loss and metrics.
    name: a label; default the module's class name.
  """
  if not isinstance(module, nn.Module):
    raise TypeError(f"module must be a flax.linen.Module, got {type(module).__name__}.")
  sample_input = jnp.asarray(sample_input)
  if sample_input.ndim < 1:
    raise ValueError("sample_input must have a leading batch axis.")
  takes_train = _takes_train(module)
  train_kwargs = (lambda train: {"train": train}) if takes_train else (lambda train: {})
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), sample_input, **train_kwargs(False)))
  extra = sorted(set(variables) - {"params"})
  if extra:
    raise ValueError(
        f"module has variable collections {extra} besides 'params'; fedjax_lite trains and aggregates only "
        "'params' and will not silently freeze the others. Use a normalization without running statistics "
        "(e.g. GroupNorm/LayerNorm)."
    )

  def init(rng: jax.Array) -> Params:
    return module.init({"params": rng, "dropout": rng}, sample_input, **train_kwargs(False))["params"]

  def apply(params: Params, batch: Batch, rng: jax.Array | None, train: bool) -> jax.Array:
    rngs = {"dropout": rng} if (train and rng is not None) else {}
    return module.apply({"params": params}, batch[input_key], rngs=rngs, **train_kwargs(train))

  return Model(
      init=init,
      apply=apply,
      loss=loss if loss is not None else softmax_cross_entropy_loss(label_key),
      metrics=dict(metrics) if metrics is not None else {"accuracy": accuracy_metric(label_key)},
      name=name or type(module).__name__,
  )
