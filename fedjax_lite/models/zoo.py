"""The model zoo: the standard federated-learning benchmark models, as flax modules and ready :class:`Model` s.

Where this sits: experiments and tests build a model here and hand the resulting
:class:`fedjax_lite.core.model.Model` (via :func:`fedjax_lite.core.model.from_flax`) to an algorithm. Every module
maps ``(inputs, train)`` to logits ``[batch, num_classes]`` (no softmax layer: the default loss is softmax
cross-entropy on logits). Inputs are images ``[B, H, W]`` (a channel axis is added) or ``[B, H, W, C]``; integer
inputs are cast to float32. The convolutional models use :class:`fedjax_lite.models.conv.Conv` and
``reshape + max`` pooling so that they stay fast inside rolled ``lax.scan`` loops on XLA:CPU.

Initializers follow the TFF/Keras originals (Glorot-uniform kernels, zero biases; zero kernel for the TFF
tutorial's dense model), so learning curves are comparable with TFF's.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_lite.core.model import Model
from fedjax_lite.models.adapter import from_flax
from fedjax_lite.models.conv import Conv
from fedjax_lite.models.pooling import max_pool_2x2

# Keras' defaults for Dense and Conv2D, which the TFF reference models use.
_KERAS_KERNEL_INIT = nn.initializers.glorot_uniform()
_KERAS_BIAS_INIT = nn.initializers.zeros_init()


def _as_float(inputs: jax.Array) -> jax.Array:
  inputs = jnp.asarray(inputs)
  if not jnp.issubdtype(inputs.dtype, jnp.floating):
    inputs = inputs.astype(jnp.float32)
  return inputs


def _as_images(inputs: jax.Array) -> jax.Array:
  """``[B, H, W]`` -> ``[B, H, W, 1]``; ``[B, H, W, C]`` unchanged; anything else is an error."""
  inputs = _as_float(inputs)
  if inputs.ndim == 3:
    return inputs[..., None]
  if inputs.ndim == 4:
    return inputs
  raise ValueError(f"inputs must be images [B, H, W] or [B, H, W, C], got shape {inputs.shape}.")


def _flatten(inputs: jax.Array) -> jax.Array:
  """``[B, ...]`` -> ``[B, prod(...)]``."""
  inputs = _as_float(inputs)
  if inputs.ndim < 2:
    raise ValueError(f"inputs must have a batch axis and at least one feature axis, got shape {inputs.shape}.")
  return inputs.reshape(inputs.shape[0], -1)


def _check_num_classes(num_classes) -> int:
  if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
    raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}.")
  return num_classes


def _check_input_shape(input_shape, *, image: bool) -> tuple[int, ...]:
  """A tuple of positive ints; for image models of length 2 ``(H, W)`` or 3 ``(H, W, C)``."""
  try:
    shape = tuple(input_shape)
  except TypeError:
    raise TypeError(f"input_shape must be a tuple of positive ints, got {input_shape!r}.") from None
  if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape):
    raise ValueError(f"input_shape must be a non-empty tuple of positive ints, got {input_shape!r}.")
  if image and len(shape) not in (2, 3):
    raise ValueError(f"input_shape must be (H, W) or (H, W, C) for an image model, got {input_shape!r}.")
  return shape


def _check_hidden(hidden) -> tuple[int, ...]:
  try:
    widths = tuple(hidden)
  except TypeError:
    raise TypeError(f"hidden must be a tuple of positive ints, got {hidden!r}.") from None
  if not widths or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths):
    raise ValueError(f"hidden must be a non-empty tuple of positive ints, got {hidden!r}.")
  return widths


def _sample_input(input_shape: tuple[int, ...]) -> jax.Array:
  return jnp.zeros((1,) + input_shape, jnp.float32)


class DenseSoftmax(nn.Module):
  """One dense layer on the flattened input: ``logits = W flatten(x) + b``.

  The model of TFF's "Federated Learning for Image Classification" tutorial (``Dense(10,
  kernel_initializer='zeros')`` followed by softmax; the softmax lives in the loss here). On 28x28x1 with 10 classes
  it has 784 * 10 + 10 = 7,850 parameters.
  """

  num_classes: int = 10

  def __post_init__(self):
    _check_num_classes(self.num_classes)
    super().__post_init__()

  @nn.compact
  def __call__(self, inputs: jax.Array, train: bool = False) -> jax.Array:
    del train  # no randomness
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros_init(), bias_init=_KERAS_BIAS_INIT)(
        _flatten(inputs)
    )


class MLP(nn.Module):
  """McMahan et al.'s "2NN": dense ReLU hidden layers on the flattened input, then a dense output layer.

  ``h_0 = flatten(x)``, ``h_{l+1} = relu(W_l h_l + b_l)``, ``logits = W_L h_L + b_L``. McMahan, Moore, Ramage,
  Hampson, Agüera y Arcas, "Communication-Efficient Learning of Deep Networks from Decentralized Data" (AISTATS
  2017): two hidden layers of 200 units, 199,210 parameters on MNIST.
  """

  num_classes: int = 10
  hidden: Sequence[int] = (200, 200)

  def __post_init__(self):
    _check_num_classes(self.num_classes)
    _check_hidden(self.hidden)
    super().__post_init__()

  @nn.compact
  def __call__(self, inputs: jax.Array, train: bool = False) -> jax.Array:
    del train  # no randomness
    hidden = _flatten(inputs)
    for width in self.hidden:
      hidden = nn.relu(nn.Dense(width, kernel_init=_KERAS_KERNEL_INIT, bias_init=_KERAS_BIAS_INIT)(hidden))
    return nn.Dense(self.num_classes, kernel_init=_KERAS_KERNEL_INIT, bias_init=_KERAS_BIAS_INIT)(hidden)


class OriginalFedAvgCNN(nn.Module):
  """The CNN of McMahan et al. 2017 as TFF's ``create_original_fedavg_cnn_model`` builds it.

  conv 5x5x32 SAME + ReLU, max-pool 2x2/2, conv 5x5x64 SAME + ReLU, max-pool 2x2/2, flatten, dense 512 + ReLU,
  dense ``num_classes``. 1,663,370 parameters for 10 classes on 28x28x1 (1,690,046 for EMNIST's 62).
  (McMahan, Moore, Ramage, Hampson, Agüera y Arcas, AISTATS 2017.) Keras' 'same' pooling pads odd sizes where
  :func:`max_pool_2x2` drops the last row/column; the two agree on even sizes such as 28 -> 14 -> 7 and 8 -> 4 -> 2.
  """

  num_classes: int = 10

  def __post_init__(self):
    _check_num_classes(self.num_classes)
    super().__post_init__()

  @nn.compact
  def __call__(self, inputs: jax.Array, train: bool = False) -> jax.Array:
    del train  # no randomness
    hidden = _as_images(inputs)
    for features in (32, 64):
      hidden = Conv(features, (5, 5), padding="SAME", kernel_init=_KERAS_KERNEL_INIT, bias_init=_KERAS_BIAS_INIT)(
          hidden
      )
      hidden = max_pool_2x2(nn.relu(hidden))
    hidden = hidden.reshape(hidden.shape[0], -1)
    hidden = nn.relu(nn.Dense(512, kernel_init=_KERAS_KERNEL_INIT, bias_init=_KERAS_BIAS_INIT)(hidden))
    return nn.Dense(self.num_classes, kernel_init=_KERAS_KERNEL_INIT, bias_init=_KERAS_BIAS_INIT)(hidden)


class CNNDropout(nn.Module):
  """TFF's EMNIST ``cnn_dropout`` model (``create_conv_dropout_model``, used by Reddi et al., "Adaptive Federated
  Optimization", ICLR 2021).

  conv 3x3x32 VALID + ReLU, conv 3x3x64 VALID + ReLU, max-pool 2x2/2, dropout 0.25, flatten, dense 128 + ReLU,
  dropout 0.5, dense ``num_classes``. 1,199,882 parameters for 10 classes on 28x28x1. Dropout runs only when
  ``train`` is True and then needs a ``'dropout'`` rng.
  """

  num_classes: int = 10

  def __post_init__(self):
    _check_num_classes(self.num_classes)
    super().__post_init__()

  @nn.compact
  def __call__(self, inputs: jax.Array, train: bool = False) -> jax.Array:
    hidden = _as_images(inputs)
    for features in (32, 64):
      hidden = Conv(features, (3, 3), padding="VALID", kernel_init=_KERAS_KERNEL_INIT, bias_init=_KERAS_BIAS_INIT)(
          hidden
      )
      hidden = nn.relu(hidden)
    hidden = max_pool_2x2(hidden)
    hidden = nn.Dropout(rate=0.25, deterministic=not train)(hidden)
    hidden = hidden.reshape(hidden.shape[0], -1)
    hidden = nn.relu(nn.Dense(128, kernel_init=_KERAS_KERNEL_INIT, bias_init=_KERAS_BIAS_INIT)(hidden))
    hidden = nn.Dropout(rate=0.5, deterministic=not train)(hidden)
    return nn.Dense(self.num_classes, kernel_init=_KERAS_KERNEL_INIT, bias_init=_KERAS_BIAS_INIT)(hidden)


def dense_softmax(num_classes: int = 10, input_shape: Sequence[int] = (28, 28, 1)) -> Model:
  """:class:`DenseSoftmax` as a :class:`Model` (softmax cross-entropy loss, accuracy metric).

  Args:
    num_classes: number of classes, an int >= 2.
    input_shape: shape of one example (any non-empty tuple of positive ints; it is flattened).
  """
  num_classes = _check_num_classes(num_classes)
  shape = _check_input_shape(input_shape, image=False)
  return from_flax(DenseSoftmax(num_classes=num_classes), _sample_input(shape), name="dense_softmax")


def mlp(num_classes: int = 10, input_shape: Sequence[int] = (28, 28, 1), hidden: Sequence[int] = (200, 200)) -> Model:
  """:class:`MLP` (McMahan et al.'s 2NN by default) as a :class:`Model`.

  Args:
    num_classes: number of classes, an int >= 2.
    input_shape: shape of one example (any non-empty tuple of positive ints; it is flattened).
    hidden: widths of the hidden ReLU layers, a non-empty tuple of positive ints.
  """
  num_classes = _check_num_classes(num_classes)
  shape = _check_input_shape(input_shape, image=False)
  hidden = _check_hidden(hidden)
  return from_flax(MLP(num_classes=num_classes, hidden=hidden), _sample_input(shape), name="mlp")


def original_fedavg_cnn(num_classes: int = 10, input_shape: Sequence[int] = (28, 28, 1)) -> Model:
  """:class:`OriginalFedAvgCNN` as a :class:`Model`.

  Args:
    num_classes: number of classes, an int >= 2 (10 for MNIST/EMNIST digits, 62 for EMNIST).
    input_shape: ``(H, W)`` or ``(H, W, C)`` with ``H, W >= 4`` (two 2x2 pools must leave at least 1x1).
  """
  num_classes = _check_num_classes(num_classes)
  shape = _check_input_shape(input_shape, image=True)
  if min(shape[:2]) < 4:
    raise ValueError(f"input_shape must have H, W >= 4 for two 2x2 max-pools, got {input_shape!r}.")
  return from_flax(OriginalFedAvgCNN(num_classes=num_classes), _sample_input(shape), name="original_fedavg_cnn")


def cnn_dropout(num_classes: int = 10, input_shape: Sequence[int] = (28, 28, 1)) -> Model:
  """:class:`CNNDropout` as a :class:`Model`.

  Args:
    num_classes: number of classes, an int >= 2 (10 for EMNIST digits, 62 for EMNIST).
    input_shape: ``(H, W)`` or ``(H, W, C)`` with ``H, W >= 6`` (two VALID 3x3 convs and a 2x2 pool must leave
      at least 1x1).
  """
  num_classes = _check_num_classes(num_classes)
  shape = _check_input_shape(input_shape, image=True)
  if min(shape[:2]) < 6:
    raise ValueError(
        f"input_shape must have H, W >= 6 for two VALID 3x3 convs and a 2x2 max-pool, got {input_shape!r}."
    )
  return from_flax(CNNDropout(num_classes=num_classes), _sample_input(shape), name="cnn_dropout")
