"""Randomized Hadamard rotation of client values before an inner aggregator (TFF ``HadamardTransformFactory``).

A rotation spreads a vector's energy evenly over its coordinates, so a vector with a few large entries becomes one
whose entries are all of similar size. A quantizer with a per-client range (``quantize_above_threshold``) then
wastes far fewer levels, which is why compression presets rotate before they quantize (Suresh, Yu, Kumar &
McMahan 2017, "Distributed Mean Estimation with Limited Communication", arXiv:1611.00429).

Clients, per leaf ``j``: flatten, cast to float32, zero-pad to ``d2 = 2^ceil(log2 d)``, then for
``r = 0, ..., num_repeats - 1``::

  x <- H_norm (D_r x),   D_r = diag(+-1) (random signs),   H_norm = H / sqrt(d2)

where ``H`` is the Sylvester Hadamard matrix, applied by the fast Walsh-Hadamard transform in ``O(d2 log d2)``.
``H_norm`` is orthonormal and symmetric, hence its own inverse. The inner aggregator sees the rotated leaves
(1-D float32 of length ``d2``). The server applies the inverse in reverse order, ``x <- D_r (H_norm x)`` for
``r = num_repeats - 1, ..., 0``, slices the first ``d`` entries, reshapes and casts back (integer dtypes rounded).
Since the rotation is linear, the result is the inner aggregate of the original values whenever the inner
aggregator is linear (a sum or a mean).

Shared randomness: clients and server must use the same signs, and the signs must be fresh every round. The
state keeps a round counter ``round_seed`` (int32) that the server broadcasts and increments after each round;
all signs of a round come from one draw keyed by ``fold_in(key(seed), round_seed)`` with a fixed base ``seed``,
leaf ``j`` taking the ``j``-th block (``num_repeats`` rows of its padded length). TFF seeds with a timestamp and
a counter advanced by ``num_repeats * num_leaves`` per round; a fixed base key keeps our runs reproducible (the
signs are not secret; pass a different ``seed`` for independent runs).

The server slices and reshapes with the value template of its static
:class:`~fedjax_lite.aggregators.base.AggregationContext`; the clients upload only the inner contribution.

State ``{'inner_agg': <inner state>, 'round_seed': int32}``; measurements ``{'hd': <inner measurements>}``.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lite.aggregators.base import Aggregator, as_template, check_aggregator
from fedjax_lite.aggregators.sum import sum_aggregator
from fedjax_lite.aggregators.wrapping import Inner, wrapper
from fedjax_lite.core import validation
from fedjax_lite.core.process import MeasuredOutput


def padded_size(size: int) -> int:
  """``d2 = 2^ceil(log2 d)``, the power of two a leaf of ``d`` elements is padded to (1 for an empty leaf)."""
  return 1 if size <= 1 else 1 << (int(size) - 1).bit_length()


def fast_walsh_hadamard(x: jax.Array) -> jax.Array:
  """``H_norm x = H x / sqrt(d2)`` along the last axis, whose length ``d2`` must be a power of two.

  ``H`` is the Sylvester Hadamard matrix ``H_2 (x) H_2 (x) ... (x) H_2``; see :func:`_hadamard_unnormalized` for
  the ``O(d2 log d2)`` butterfly. Orthonormal and self-inverse.
  """
  return _hadamard_unnormalized(x) * _normalization(x.shape[-1], 1, x.dtype)


def _hadamard_unnormalized(x: jax.Array) -> jax.Array:
  """``H x`` along the last axis (``H`` has entries +-1), by ``log2(d2)`` butterfly stages: only adds and subtracts.

  View the last axis as ``k = log2(d2)`` binary axes. ``H = H_2^{(x) k}`` applies ``H_2 = [[1, 1], [1, -1]]`` along
  each of them, in any order. A stage reshapes to ``[..., 2, d2/2]``, forms ``(a + b, a - b)`` from the two halves
  and interleaves them as ``[..., d2/2, 2]``: the butterfly on the leading binary axis, which then moves to the
  end. After ``k`` stages every axis was transformed once and the original order is back. Every stage has the
  same shapes, so the stages run in a ``lax.fori_loop`` whose compiled size does not grow with ``d2``.
  """
  size = x.shape[-1]
  if size & (size - 1):
    raise ValueError(f"the last axis of x must have a power-of-two length, got {size}.")
  if size == 1:
    return x
  batch_shape = x.shape[:-1]

  def stage(_, values):
    halves = values.reshape(batch_shape + (2, size // 2))
    first, second = halves[..., 0, :], halves[..., 1, :]
    return jnp.stack([first + second, first - second], axis=-1).reshape(batch_shape + (size,))

  return jax.lax.fori_loop(0, size.bit_length() - 1, stage, x)


def _normalization(size: int, num_transforms: int, dtype) -> jax.Array:
  """``size^(-num_transforms / 2)``, the scale of ``num_transforms`` unnormalized transforms, as one constant.

  Scaling once, by a multiplication, keeps the arithmetic identical inside and outside ``vmap``: XLA reassociates
  chains of constant multiplications (and rewrites divisions by a scalar) differently depending on the layout,
  which would change the last bit of a per-client result.
  """
  return jnp.asarray(float(size) ** (-num_transforms / 2), dtype)


def round_signs(seed: int, round_seed: jax.Array, padded_sizes: Sequence[int], num_repeats: int) -> list[jax.Array]:
  """The diagonals of ``D_0, ..., D_{R-1}`` for every leaf in one round: float32 ``+-1``, leaf ``j`` shaped
  ``[num_repeats, padded_sizes[j]]``.

  All of a round's signs come from ONE flat draw keyed by ``fold_in(key(seed), round_seed)``; leaf ``j`` takes the
  ``j``-th block. (Folding the leaf index into a key per leaf gives the same distribution, but every draw inlines
  a threefry hash into the compiled program, and the client and server programs each need all the leaves' signs:
  one draw compiles about 2x faster for a five-leaf model.)
  """
  key = jax.random.fold_in(jax.random.key(seed), round_seed)
  block_sizes = [num_repeats * size for size in padded_sizes]
  flat = jax.random.rademacher(key, (sum(block_sizes),), jnp.float32)
  offsets = np.cumsum([0] + block_sizes)
  return [flat[offsets[j]:offsets[j + 1]].reshape(num_repeats, size) for j, size in enumerate(padded_sizes)]


def rotate(x: jax.Array, signs: jax.Array) -> jax.Array:
  """Forward rotations ``x <- H_norm (D_r x)`` of a 1-D power-of-two-long ``x`` for each row ``signs[r]``.

  Computed as ``d2^(-R/2) H D_{R-1} ... H D_0 x``: the scalars commute with ``H`` and ``D``.
  """
  for repeat in range(signs.shape[0]):
    x = _hadamard_unnormalized(signs[repeat] * x)
  return x * _normalization(x.shape[-1], signs.shape[0], x.dtype)


def unrotate(x: jax.Array, signs: jax.Array) -> jax.Array:
  """The inverse of :func:`rotate`: ``x <- D_r (H_norm x)`` for ``r`` from last to first."""
  for repeat in reversed(range(signs.shape[0])):
    x = signs[repeat] * _hadamard_unnormalized(x)
  return x * _normalization(x.shape[-1], signs.shape[0], x.dtype)


def hadamard_rotation(inner: Aggregator | None = None, *, num_repeats: int = 1, seed: int = 0) -> Aggregator:
  """Rotates each leaf by random signs and the fast Walsh-Hadamard transform before ``inner`` (TFF
  ``HadamardTransformFactory``); the server rotates the inner result back. See the module docstring.

  Combines as ``inner`` does (streams when it sums); ``upload_bits`` is the inner aggregator's on the rotated
  template (every leaf a float32 vector of its padded length ``d2``), plus nothing of its own. A quantizing inner
  aggregator's ``threshold`` therefore applies to the padded lengths.

  Args:
    inner: the aggregator of the rotated values; default the plain sum.
    num_repeats: an int ``>= 1``, how many sign-and-transform rotations to chain.
    seed: an int ``>= 0``, the base key of the shared random signs (combined with the round counter).
  """
  inner_aggregator = check_aggregator(sum_aggregator() if inner is None else inner, "inner")
  num_repeats = validation.check_int("num_repeats", num_repeats, minimum=1)
  seed = validation.check_int("seed", seed, minimum=0)

  def rotate_value(round_seed, value):
    leaves, treedef = jax.tree.flatten(value)
    flat_leaves = [jnp.ravel(jnp.asarray(leaf, jnp.float32)) for leaf in leaves]
    sizes = [padded_size(flat.shape[0]) for flat in flat_leaves]
    signs = round_signs(seed, round_seed, sizes, num_repeats)
    rotated = [rotate(jnp.pad(flat, (0, size - flat.shape[0])), leaf_signs)
               for flat, size, leaf_signs in zip(flat_leaves, sizes, signs)]
    return jax.tree.unflatten(treedef, rotated)

  def unrotate_value(round_seed, rotated_value, value_template):
    template_leaves, treedef = jax.tree.flatten(value_template)
    rotated_leaves = treedef.flatten_up_to(rotated_value)
    signs = round_signs(seed, round_seed, [leaf.shape[0] for leaf in rotated_leaves], num_repeats)
    restored = []
    for template, leaf, leaf_signs in zip(template_leaves, rotated_leaves, signs):
      flat = unrotate(leaf, leaf_signs)
      size = int(np.prod(template.shape, dtype=np.int64))
      values = flat[:size].reshape(template.shape)
      if jnp.issubdtype(template.dtype, jnp.integer):
        values = jnp.round(values)
      restored.append(values.astype(template.dtype))
    return jax.tree.unflatten(treedef, restored)

  def rotated_template(value_template):
    return jax.tree.map(
        lambda t: jax.ShapeDtypeStruct((padded_size(int(np.prod(t.shape, dtype=np.int64))),), jnp.float32),
        as_template(value_template))

  # The inner aggregator keeps the wrapper's keys and sees the rotated template.
  inner = Inner(inner_aggregator, template=rotated_template)

  def init(value_template):
    template = as_template(value_template)
    for leaf in jax.tree.leaves(template):
      if not (jnp.issubdtype(leaf.dtype, jnp.floating) or jnp.issubdtype(leaf.dtype, jnp.integer)):
        raise TypeError(f"hadamard_rotation needs float or integer values, got a leaf of dtype {leaf.dtype}.")
    return {"inner_agg": inner.init(template), "round_seed": jnp.zeros((), jnp.int32)}

  def broadcast(state):
    return (state["round_seed"], inner.broadcast(state["inner_agg"]))

  def client(client_params, value, weight, rng):
    round_seed, inner_params = client_params
    return inner.client(inner_params, rotate_value(round_seed, value), weight, rng)

  def server(state, combined, rng, context):
    inner_output = inner.server(state["inner_agg"], combined, rng, context)
    return MeasuredOutput(
        state={"inner_agg": inner_output.state, "round_seed": state["round_seed"] + 1},
        result=unrotate_value(state["round_seed"], inner_output.result, context.value_template),
        measurements={"hd": inner_output.measurements},
    )

  return wrapper(inner, client, server, init=init, broadcast=broadcast)
