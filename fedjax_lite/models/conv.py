"""A 2-D convolution whose gradient stays fast inside rolled loops on XLA:CPU.

Where this sits: every convolutional model in :mod:`fedjax_lite.models.zoo` uses :class:`Conv`, so that a client's
local epoch can run as a rolled ``lax.scan`` over batches (short compiles) at the speed of unrolled code.

Why it exists (jax-ml/jax#12868): XLA:CPU's ``ConvCanonicalization`` pass rewrites only the convolutions of the
*entry* computation into the NHWC/HWIO form (``dim_labels=b01f_01io->b01f``) that its library conv kernels
(YNNPACK/Eigen) accept. JAX's autodiff emits the two backward convolutions in other layouts (``b01f_01oi->b01f``
with a reversed kernel for the input gradient, ``f01b_i01o->01bf`` for the kernel gradient). Inside a while loop
(``lax.scan``, ``fori_loop``, ``lax.map``, ``cond`` branches) nothing rewrites them, and XLA falls back to a generic
loop-nest emitter that is about 10x slower. :func:`conv2d_canonical` carries a ``jax.custom_vjp`` whose backward
convolutions are written in the canonical form with explicit transposes, i.e. the rewrite the pass would have done,
so it survives inside loops. Its values and gradients equal those of ``lax.conv_general_dilated``.
"""

from __future__ import annotations

import functools
from typing import Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax import lax

# NHWC inputs, HWIO kernel, NHWC outputs: the layout XLA:CPU's conv kernels take (dim_labels b01f_01io->b01f).
CANONICAL_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")

PaddingPairs = tuple[tuple[int, int], tuple[int, int]]
PaddingLike = Union[str, int, Sequence[Union[int, tuple[int, int]]]]
PrecisionLike = Union[None, str, lax.Precision, tuple[str, str], tuple[lax.Precision, lax.Precision]]


def _plain_canonical_conv(lhs: jax.Array, rhs: jax.Array, padding: PaddingPairs, precision) -> jax.Array:
  return lax.conv_general_dilated(
      lhs,
      rhs,
      window_strides=(1, 1),
      padding=padding,
      dimension_numbers=CANONICAL_DIMENSION_NUMBERS,
      precision=precision,
  )


@functools.lru_cache(maxsize=None)
def _per_client_conv(padding: PaddingPairs, precision):
  """The canonical conv as a ``custom_vmap`` function whose batching rule keeps the mapped convs separate on CPU.

  JAX batches a convolution whose kernel is mapped (``vmap`` over clients, each with its own weights) into ONE
  grouped convolution (``feature_group_count`` = the mapped size). XLA:CPU has no fast kernel for grouped
  convolutions: on the 2-core reference machine the standard round with ``vmap`` over clients was 5-7x slower than
  a scan over clients. On CPU this rule instead emits one canonical convolution per mapped element (they are
  independent, so XLA's runtime may run them concurrently on different cores); an unmapped kernel folds the mapped
  axis into the conv's batch dim. Elsewhere (GPU/TPU, whose grouped convolutions are fast) it defers to JAX's own batching rule.
  """

  @jax.custom_batching.custom_vmap
  def conv(lhs, rhs):
    return _plain_canonical_conv(lhs, rhs, padding, precision)

  @conv.def_vmap
  def batching_rule(axis_size, in_batched, lhs, rhs):
    lhs_batched, rhs_batched = in_batched
    if jax.default_backend() != "cpu":
      in_axes = (0 if lhs_batched else None, 0 if rhs_batched else None)
      return jax.vmap(lambda x, w: _plain_canonical_conv(x, w, padding, precision), in_axes=in_axes)(lhs, rhs), True
    if not rhs_batched:  # one kernel for every mapped element: fold the mapped axis into the batch dim
      folded = conv(lhs.reshape((-1,) + lhs.shape[2:]), rhs)
      return folded.reshape((axis_size, lhs.shape[1]) + folded.shape[1:]), True
    per_client = [conv(lhs[k] if lhs_batched else lhs, rhs[k]) for k in range(axis_size)]
    return jnp.stack(per_client), True

  return conv


def _canonical_conv(lhs: jax.Array, rhs: jax.Array, padding: PaddingPairs, precision) -> jax.Array:
  """``lax.conv_general_dilated`` in XLA:CPU's canonical layout, stride 1, no dilation, no groups.

  Under ``vmap`` with a mapped kernel it stays one canonical convolution per client on CPU (see
  :func:`_per_client_conv`).
  """
  return _per_client_conv(tuple(map(tuple, padding)), precision)(lhs, rhs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv2d_with_canonical_backward(inputs, kernel, padding, precision):
  return _canonical_conv(inputs, kernel, padding, precision)


def _forward(inputs, kernel, padding, precision):
  # Calls the custom_vjp function itself (not the raw conv), so that differentiating the forward pass again (as
  # reverse-over-reverse does) goes through this same rule rather than through the custom_vmap inside.
  return _conv2d_with_canonical_backward(inputs, kernel, padding, precision), (inputs, kernel)


def _backward(padding, precision, residuals, output_grad):
  """Both gradients as canonical ``b01f_01io->b01f`` convolutions plus explicit transposes.

  With ``y[n, i, j, o] = sum_{a, b, c} x_pad[n, i + a, j + b, c] * w[a, b, c, o]`` (``x`` padded by ``(lo, hi)``):

  * input gradient: ``dx = conv(dy, flip_hw(w) with I and O swapped)`` with padding ``(k - 1 - lo, k - 1 - hi)``
    per spatial dim, which gives back the input's ``[N, H, W, C]`` shape;
  * kernel gradient: ``dw[a, b, c, o] = sum_{n, i, j} x_pad[n, i + a, j + b, c] * dy[n, i, j, o]``, i.e. a conv of
    ``x`` transposed to ``[C, H, W, N]`` (batch = C, features = N) with ``dy`` transposed to ``[H', W', N, O]``
    (an HWIO kernel with I = N), padding ``(lo, hi)``; the ``[C, kh, kw, O]`` result is transposed to HWIO.
  """
  inputs, kernel = residuals
  kernel_h, kernel_w = kernel.shape[0], kernel.shape[1]
  (lo_h, hi_h), (lo_w, hi_w) = padding
  flipped_kernel = jnp.transpose(jnp.flip(kernel, axis=(0, 1)), (0, 1, 3, 2))  # [kh, kw, O, C]
  input_grad_padding = ((kernel_h - 1 - lo_h, kernel_h - 1 - hi_h), (kernel_w - 1 - lo_w, kernel_w - 1 - hi_w))
  # The two backward convolutions are themselves convolutions with canonical backward passes, so the gradient can
  # be differentiated again (reverse over reverse) without differentiating the custom_vmap of _canonical_conv.
  input_grad = _conv2d_with_canonical_backward(output_grad, flipped_kernel, input_grad_padding, precision)
  inputs_t = jnp.transpose(inputs, (3, 1, 2, 0))  # [C, H, W, N]
  output_grad_t = jnp.transpose(output_grad, (1, 2, 0, 3))  # [H', W', N, O]
  kernel_grad_t = _conv2d_with_canonical_backward(inputs_t, output_grad_t, padding, precision)  # [C, kh, kw, O]
  kernel_grad = jnp.transpose(kernel_grad_t, (1, 2, 0, 3))  # [kh, kw, C, O]
  return input_grad.astype(inputs.dtype), kernel_grad.astype(kernel.dtype)


_conv2d_with_canonical_backward.defvjp(_forward, _backward)


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _padding_pairs(padding, rank: int) -> list[tuple[int, int]]:
  """An int, or ``rank`` entries each an int or an ``(lo, hi)`` int pair, as ``rank`` ``(lo, hi)`` pairs.

  The same reading as ``nn.Conv``: an int pads every side by it; an int entry pads both sides of its dim.
  """
  if _is_int(padding):
    return [(padding, padding)] * rank
  try:
    entries = list(padding)
  except TypeError:
    entries = None
  if entries is not None and len(entries) == rank:
    pairs = []
    for entry in entries:
      if _is_int(entry):
        pairs.append((entry, entry))
      elif isinstance(entry, (tuple, list)) and len(entry) == 2 and all(_is_int(p) for p in entry):
        pairs.append((int(entry[0]), int(entry[1])))
    if len(pairs) == rank:
      return pairs
  raise ValueError(
      f"padding must be 'SAME', 'VALID', an int, or {rank} entries each an int or a (lo, hi) pair of ints, "
      f"got {padding!r}."
  )


def _stride1_padding(padding: PaddingLike, kernel_hw: Sequence[int]) -> PaddingPairs:
  """'SAME', 'VALID', an int or per-dim ints/pairs as ``((lo_h, hi_h), (lo_w, hi_w))`` for a stride-1 conv.

  'SAME' pads ``k - 1`` in total per spatial dim, ``lo = (k - 1) // 2`` before and the rest after, as
  ``lax.padtype_to_pads`` does for stride 1 (so an even kernel pads one more after than before).
  """
  if isinstance(padding, str):
    mode = padding.upper()
    if mode == "SAME":
      return tuple(((k - 1) // 2, (k - 1) - (k - 1) // 2) for k in kernel_hw)  # type: ignore[return-value]
    if mode == "VALID":
      return ((0, 0), (0, 0))
    raise ValueError(f"padding must be 'SAME', 'VALID', an int or two (lo, hi) pairs, got {padding!r}.")
  return tuple(_padding_pairs(padding, 2))  # type: ignore[return-value]


def conv2d_canonical(
    inputs: jax.Array,
    kernel: jax.Array,
    padding: PaddingLike = "SAME",
    *,
    precision: PrecisionLike = None,
    strides: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    feature_group_count: int = 1,
) -> jax.Array:
  """A stride-1 2-D convolution whose backward pass is written in XLA:CPU's canonical conv layout.

  ``y[n, i, j, o] = sum_{a, b, c} x_pad[n, i + a, j + b, c] * kernel[a, b, c, o]``, the cross-correlation that
  ``lax.conv_general_dilated(inputs, kernel, (1, 1), padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))``
  computes, with the same value. Its ``jax.custom_vjp`` writes the input and kernel gradients as
  ``b01f_01io->b01f`` convolutions with explicit transposes (see the module docstring and jax-ml/jax#12868), so
  they run on XLA:CPU's library kernels even inside ``lax.scan``/``while_loop`` bodies. Reverse mode only: like any
  ``custom_vjp`` function it does not support ``jax.jvp``/``jax.jacfwd``.

  Args:
    inputs: ``[N, H, W, C]``.
    kernel: ``[kh, kw, C, O]`` (HWIO).
    padding: 'SAME' (odd or even kernels, split as ``lax`` does), 'VALID', an int, or per-dim ints or
      ``(lo, hi)`` pairs, e.g. ``((1, 1), (2, 2))``.
    precision: passed to every convolution, forward and backward.
    strides, dilation, feature_group_count: accepted only so that a caller gets a clear error; they must be 1.
      Use ``lax.conv_general_dilated`` (or :class:`Conv`, which falls back to it) otherwise.

  Returns:
    ``[N, H', W', O]`` with ``H' = H + lo_h + hi_h - kh + 1`` (and likewise ``W'``).
  """
  for name, value in (("strides", strides), ("dilation", dilation)):
    values = (value, value) if _is_int(value) else tuple(value)  # type: ignore[arg-type]
    if values != (1, 1):
      raise ValueError(
          f"conv2d_canonical supports only {name}=1, got {value!r}; use lax.conv_general_dilated (or "
          "fedjax_lite.models.Conv, which falls back to it) for strided or dilated convolutions."
      )
  if feature_group_count != 1:
    raise ValueError(
        f"conv2d_canonical supports only feature_group_count=1, got {feature_group_count!r}; use "
        "lax.conv_general_dilated (or fedjax_lite.models.Conv, which falls back to it) for grouped convolutions."
    )
  inputs = jnp.asarray(inputs)
  kernel = jnp.asarray(kernel)
  if inputs.ndim != 4:
    raise ValueError(f"inputs must be NHWC with 4 dims, got shape {inputs.shape}.")
  if kernel.ndim != 4:
    raise ValueError(f"kernel must be HWIO with 4 dims, got shape {kernel.shape}.")
  if kernel.shape[2] != inputs.shape[3]:
    raise ValueError(
        f"kernel.shape[2] (input features, {kernel.shape[2]}) must equal inputs.shape[3] (channels, "
        f"{inputs.shape[3]}); grouped convolutions are not supported."
    )
  pads = _stride1_padding(padding, kernel.shape[:2])
  for axis, ((lo, hi), size, k) in enumerate(zip(pads, inputs.shape[1:3], kernel.shape[:2])):
    if size + lo + hi < k:
      raise ValueError(
          f"padding {padding!r} leaves spatial dim {axis} of inputs ({size} + {lo} + {hi}) smaller than the "
          f"kernel ({k}); the output would be empty."
      )
  if isinstance(precision, list):
    precision = tuple(precision)
  dtype = jnp.result_type(inputs, kernel)
  inputs, kernel = inputs.astype(dtype), kernel.astype(dtype)
  output_hw = [size + lo + hi - k + 1 for size, (lo, hi), k in zip(inputs.shape[1:3], pads, kernel.shape[:2])]
  if any(out < k for out, k in zip(output_hw, kernel.shape[:2])):
    return _conv2d_by_patches(inputs, kernel, pads, precision)
  return _conv2d_with_canonical_backward(inputs, kernel, pads, precision)


def _conv2d_by_patches(inputs, kernel, pads, precision):
  """The same convolution as one matmul over extracted patches (im2col), for outputs smaller than the kernel.

  When the kernel is larger than the output (e.g. a 5x5 SAME conv on a 4x4 map), XLA's algebraic simplifier swaps
  the convolution's operands into a layout that XLA:CPU runs on its slow generic emitter inside loops, whatever
  form the conv was written in. Such outputs are tiny, so gathering the ``kh * kw`` shifted windows and doing one
  ``[N*H'*W', kh*kw*C] x [kh*kw*C, O]`` matmul is cheap, and its autodiff is slices and matmuls only.
  """
  kernel_h, kernel_w, channels, features = kernel.shape
  padded = jax.lax.pad(inputs, jnp.zeros((), inputs.dtype),
                       ((0, 0, 0),) + tuple((lo, hi, 0) for lo, hi in pads) + ((0, 0, 0),))
  out_h = padded.shape[1] - kernel_h + 1
  out_w = padded.shape[2] - kernel_w + 1
  windows = [padded[:, a:a + out_h, b:b + out_w, :] for a in range(kernel_h) for b in range(kernel_w)]
  patches = jnp.stack(windows, axis=3)  # [N, H', W', kh*kw, C], taps in (a, b) row-major order like HWIO
  patches = patches.reshape(patches.shape[:3] + (kernel_h * kernel_w * channels,))
  return jnp.dot(patches, kernel.reshape(kernel_h * kernel_w * channels, features), precision=precision)


def _as_tuple(value, rank: int, name: str) -> tuple[int, ...]:
  """An int (or None, meaning 1) broadcast to ``rank`` entries, or a sequence of ``rank`` positive ints."""
  if value is None:
    value = 1
  if _is_int(value):
    values = (value,) * rank
  else:
    try:
      values = tuple(value)
    except TypeError:
      raise TypeError(f"{name} must be an int or a sequence of {rank} ints, got {value!r}.") from None
  if len(values) != rank or not all(_is_int(v) and v >= 1 for v in values):
    raise ValueError(f"{name} must be a positive int or a sequence of {rank} positive ints, got {value!r}.")
  return values


class Conv(nn.Module):
  """A drop-in for ``flax.linen.Conv`` whose gradient is fast inside rolled loops on XLA:CPU.

  Same fields, parameter names and shapes (``kernel`` HWIO ``[kh, kw, C, features]``, ``bias [features]``) and
  default initializers (LeCun normal kernel, zero bias) as ``nn.Conv``, so ``nn.Conv`` parameters load into it
  unchanged and give the same outputs. Why it exists: XLA:CPU's ``ConvCanonicalization`` pass only rewrites the
  entry computation, so the backward convolutions that autodiff emits for ``nn.Conv`` run on a ~10x slower
  generic emitter inside ``lax.scan``/``fori_loop`` bodies (jax-ml/jax#12868). Here the common case (2 spatial
  dims, stride 1, no dilation, ``feature_group_count=1``) goes through :func:`conv2d_canonical`, whose custom VJP
  writes the backward convolutions in the canonical layout.

  Fallback: any other case (strides, input or kernel dilation, grouped convolutions, 1-D/3-D kernels, 'CAUSAL'
  padding) calls ``lax.conv_general_dilated`` with plain autodiff, exactly like ``nn.Conv``; it is correct but
  keeps the slow in-loop backward pass on XLA:CPU. 'CIRCULAR' and 'REFLECT' padding pad the inputs first and then
  take the fast path when it applies. ``nn.Conv``'s ``mask``, ``promote_dtype`` and unshared-weight options are not
  offered.

  Attributes:
    features: number of output channels (positive int).
    kernel_size: a sequence of kernel extents, one per spatial dim, e.g. ``(5, 5)``. As in ``nn.Conv``, a bare
      int means a 1-D kernel.
    strides: an int or one int per spatial dim (default 1).
    padding: 'SAME', 'VALID', 'CIRCULAR', 'REFLECT', 'CAUSAL' (1-D only), an int, or per-dim ints or
      ``(lo, hi)`` pairs.
    input_dilation, kernel_dilation: as ``lax.conv_general_dilated``'s ``lhs_dilation``/``rhs_dilation``.
    feature_group_count: splits input channels into groups (default 1).
    use_bias: add a per-feature bias.
    dtype: computation dtype (default: promoted from inputs and params).
    param_dtype: parameter dtype.
    precision: ``lax`` precision of the convolutions.
    kernel_init, bias_init: parameter initializers.
  """

  features: int
  kernel_size: int | Sequence[int]
  strides: None | int | Sequence[int] = 1
  padding: PaddingLike = "SAME"
  input_dilation: None | int | Sequence[int] = 1
  kernel_dilation: None | int | Sequence[int] = 1
  feature_group_count: int = 1
  use_bias: bool = True
  dtype: jnp.dtype | None = None
  param_dtype: jnp.dtype = jnp.float32
  precision: PrecisionLike = None
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()

  def __post_init__(self):
    if not _is_int(self.features) or self.features < 1:
      raise ValueError(f"features must be a positive int, got {self.features!r}.")
    rank = len(self._kernel_shape_spatial())
    _as_tuple(self.strides, rank, "strides")
    _as_tuple(self.input_dilation, rank, "input_dilation")
    _as_tuple(self.kernel_dilation, rank, "kernel_dilation")
    if not _is_int(self.feature_group_count) or self.feature_group_count < 1:
      raise ValueError(f"feature_group_count must be a positive int, got {self.feature_group_count!r}.")
    if self.features % self.feature_group_count:
      raise ValueError(
          f"features ({self.features}) must be divisible by feature_group_count ({self.feature_group_count})."
      )
    if isinstance(self.padding, str):
      if self.padding.upper() not in ("SAME", "VALID", "CIRCULAR", "REFLECT", "CAUSAL"):
        raise ValueError(
            f"padding must be 'SAME', 'VALID', 'CIRCULAR', 'REFLECT', 'CAUSAL', an int or (lo, hi) pairs, "
            f"got {self.padding!r}."
        )
    else:
      _padding_pairs(self.padding, rank)
    super().__post_init__()

  def _kernel_shape_spatial(self) -> tuple[int, ...]:
    kernel_size = (self.kernel_size,) if _is_int(self.kernel_size) else self.kernel_size
    try:
      kernel_size = tuple(kernel_size)  # type: ignore[arg-type]
    except TypeError:
      raise TypeError(f"kernel_size must be a sequence of ints such as (3, 3), got {self.kernel_size!r}.") from None
    if not kernel_size or not all(_is_int(k) and k >= 1 for k in kernel_size):
      raise ValueError(f"kernel_size must be a non-empty sequence of positive ints, got {self.kernel_size!r}.")
    return kernel_size

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    """Convolves ``inputs [*batch, *spatial, C]`` (channels last; any number of batch dims, or none)."""
    kernel_size = self._kernel_shape_spatial()
    rank = len(kernel_size)
    strides = _as_tuple(self.strides, rank, "strides")
    input_dilation = _as_tuple(self.input_dilation, rank, "input_dilation")
    kernel_dilation = _as_tuple(self.kernel_dilation, rank, "kernel_dilation")
    inputs = jnp.asarray(inputs)
    if inputs.ndim < rank + 1:
      raise ValueError(
          f"inputs must have shape [*batch, {rank} spatial dims, channels], got shape {inputs.shape}."
      )

    # Flatten (or add) the leading batch dims to exactly one, as nn.Conv does.
    batch_shape = inputs.shape[: inputs.ndim - rank - 1]
    inputs = inputs.reshape((-1,) + inputs.shape[len(batch_shape):])

    padding = self.padding.upper() if isinstance(self.padding, str) else _padding_pairs(self.padding, rank)
    if padding in ("CIRCULAR", "REFLECT", "CAUSAL"):
      if padding == "CAUSAL":
        if rank != 1:
          raise ValueError(f"padding='CAUSAL' is only defined for 1-D kernels, got kernel_size {kernel_size}.")
        spatial_pads = [(kernel_dilation[0] * (kernel_size[0] - 1), 0)]
        mode = "constant"
      else:
        dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation)]
        spatial_pads = [((k - 1) // 2, k // 2) for k in dilated]
        mode = "wrap" if padding == "CIRCULAR" else "reflect"
      inputs = jnp.pad(inputs, [(0, 0)] + spatial_pads + [(0, 0)], mode=mode)
      padding = "VALID"

    in_features = inputs.shape[-1]
    if in_features % self.feature_group_count:
      raise ValueError(
          f"inputs' channels ({in_features}) must be divisible by feature_group_count ({self.feature_group_count})."
      )
    kernel_shape = kernel_size + (in_features // self.feature_group_count, self.features)
    kernel = self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    inputs, kernel, bias = promote_dtype(inputs, kernel, bias, dtype=self.dtype)

    fast_path = (
        rank == 2
        and strides == (1, 1)
        and input_dilation == (1, 1)
        and kernel_dilation == (1, 1)
        and self.feature_group_count == 1
    )
    if fast_path:
      outputs = conv2d_canonical(inputs, kernel, padding, precision=self.precision)
    else:
      spatial_dims = tuple(range(1, rank + 1))
      dimension_numbers = lax.ConvDimensionNumbers(  # channels-last inputs/outputs, HWIO-style kernel
          lhs_spec=(0, rank + 1) + spatial_dims,
          rhs_spec=(rank + 1, rank) + tuple(range(rank)),
          out_spec=(0, rank + 1) + spatial_dims,
      )
      outputs = lax.conv_general_dilated(
          inputs,
          kernel,
          window_strides=strides,
          padding=padding,
          lhs_dilation=input_dilation,
          rhs_dilation=kernel_dilation,
          dimension_numbers=dimension_numbers,
          feature_group_count=self.feature_group_count,
          precision=self.precision,
      )
    if bias is not None:
      outputs = outputs + bias
    return outputs.reshape(batch_shape + outputs.shape[1:])
