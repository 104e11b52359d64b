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
the signs of leaf ``j`` and repeat ``r`` are drawn from ``fold_in(fold_in(fold_in(key(seed), round_seed), j),
r)`` with a fixed base ``seed``. (TFF seeds with a timestamp and a counter advanced by ``num_repeats * num_leaves``
per round; a fixed base key keeps our runs reproducible. The signs are not secret.)

State ``{'inner_agg': <inner state>, 'round_seed': int32}``; measurements ``{'hd': <inner measurements>}``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lite.aggregators.base import Aggregator, as_template, client_upload_bits, split_rng, sum_based
from fedjax_lite.aggregators.sum import sum_aggregator
from fedjax_lite.core import validation
from fedjax_lite.core.process import MeasuredOutput

PyTree = Any


def padded_size(size: int) -> int:
  """``d2 = 2^ceil(log2 d)``, the power of two a leaf of ``d`` elements is padded to (1 for an empty leaf)."""
  return 1 if size <= 1 else 1 << (int(size) - 1).bit_length()


def fast_walsh_hadamard(x: jax.Array) -> jax.Array:
  """``H_norm x = H x / sqrt(d2)`` along the last axis, whose length ``d2`` must be a power of two.

  ``log2(d2)`` butterfly stages, each a reshape to ``[..., d2 / (2h), 2, h]`` and a sum/difference of the two
  halves: ``O(d2 log d2)`` work, jittable (the number of stages is static). Orthonormal and self-inverse.
  """
  size = x.shape[-1]
  if size & (size - 1):
    raise ValueError(f"the last axis of x must have a power-of-two length, got {size}.")
  batch_shape = x.shape[:-1]
  half = 1
  while half < size:
    pairs = x.reshape(batch_shape + (size // (2 * half), 2, half))
    first, second = pairs[..., 0, :], pairs[..., 1, :]
    x = jnp.stack([first + second, first - second], axis=-2).reshape(batch_shape + (size,))
    half *= 2
  return x / jnp.sqrt(jnp.asarray(size, x.dtype))


def random_signs(base_key: jax.Array, round_seed: jax.Array, leaf_index: int, repeat: int, size: int) -> jax.Array:
  """The diagonal of ``D``: ``size`` float32 signs ``+-1`` for one round, leaf and repeat."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(base_key, round_seed), leaf_index), repeat)
  return jax.random.rademacher(key, (size,), jnp.float32)


def rotate(x: jax.Array, signs: Any) -> jax.Array:
  """``num_repeats`` forward rotations ``x <- H_norm (D_r x)`` of a 1-D power-of-two-long ``x``, ``signs[r]``."""
  for repeat_signs in signs:
    x = fast_walsh_hadamard(repeat_signs * x)
  return x


def unrotate(x: jax.Array, signs: Any) -> jax.Array:
  """The inverse of :func:`rotate`: ``x <- D_r (H_norm x)`` for ``r`` from last to first."""
  for repeat_signs in reversed(list(signs)):
    x = repeat_signs * fast_walsh_hadamard(x)
  return x


def hadamard_rotation(inner: Aggregator | None = None, *, num_repeats: int = 1, seed: int = 0) -> Aggregator:
  """Rotates each leaf by random signs and the fast Walsh-Hadamard transform before ``inner`` (TFF
  ``HadamardTransformFactory``); the server rotates the inner result back. See the module docstring.

  Streams when ``inner`` is sum-based; ``upload_bits`` is the inner aggregator's on the rotated template (every
  leaf a float32 vector of its padded length ``d2``), plus nothing of its own. A quantizing inner aggregator's
  ``threshold`` therefore applies to the padded lengths.

  Args:
    inner: the aggregator of the rotated values; default the plain sum.
    num_repeats: an int ``>= 1``, how many sign-and-transform rotations to chain.
    seed: an int ``>= 0``, the base key of the shared random signs (combined with the round counter).
  """
  inner = sum_aggregator() if inner is None else inner
  if not isinstance(inner, Aggregator):
    raise TypeError(f"inner must be an Aggregator, got {type(inner).__name__}.")
  num_repeats = validation.check_int("num_repeats", num_repeats, minimum=1)
  seed = validation.check_int("seed", seed, minimum=0)

  def leaf_signs(round_seed, leaf_index, size):
    base_key = jax.random.key(seed)
    return [random_signs(base_key, round_seed, leaf_index, repeat, size) for repeat in range(num_repeats)]

  def rotate_value(round_seed, value):
    leaves, treedef = jax.tree.flatten(value)
    rotated = []
    for leaf_index, leaf in enumerate(leaves):
      flat = jnp.ravel(jnp.asarray(leaf, jnp.float32))
      size = padded_size(flat.shape[0])
      flat = jnp.pad(flat, (0, size - flat.shape[0]))
      rotated.append(rotate(flat, leaf_signs(round_seed, leaf_index, size)))
    return jax.tree.unflatten(treedef, rotated)

  def unrotate_value(round_seed, rotated_value, value_template):
    template_leaves, treedef = jax.tree.flatten(value_template)
    rotated_leaves = treedef.flatten_up_to(rotated_value)
    restored = []
    for leaf_index, (template, leaf) in enumerate(zip(template_leaves, rotated_leaves)):
      flat = unrotate(leaf, leaf_signs(round_seed, leaf_index, leaf.shape[0]))
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

  def init(value_template):
    template = as_template(value_template)
    for leaf in jax.tree.leaves(template):
      if not (jnp.issubdtype(leaf.dtype, jnp.floating) or jnp.issubdtype(leaf.dtype, jnp.integer)):
        raise TypeError(f"hadamard_rotation needs float or integer values, got a leaf of dtype {leaf.dtype}.")
    return {"inner_agg": inner.init(rotated_template(template)), "round_seed": jnp.zeros((), jnp.int32)}

  def finish(state, inner_output, value_template):
    return MeasuredOutput(
        state={"inner_agg": inner_output.state, "round_seed": state["round_seed"] + 1},
        result=unrotate_value(state["round_seed"], inner_output.result, value_template),
        measurements={"hd": inner_output.measurements},
    )

  def upload_bits(value_template):
    return client_upload_bits(inner, rotated_template(value_template))

  if inner.parts is not None:

    def broadcast(state):
      return (state["round_seed"], inner.parts.broadcast(state["inner_agg"]))

    def client(client_params, value, weight, rng):
      round_seed, inner_params = client_params
      rotated = inner.parts.client(inner_params, rotate_value(round_seed, value), weight, rng)
      # Zero-element arrays shaped [0, *leaf.shape] carry each leaf's shape and dtype through the sum to the
      # server, which needs them to slice and reshape; they cost nothing to send or add.
      shape_markers = jax.tree.map(lambda leaf: jnp.zeros((0,) + jnp.shape(leaf), jnp.result_type(leaf)), value)
      return {"rotated": rotated, "shapes": shape_markers}

    def server(state, total, rng):
      value_template = jax.tree.map(lambda marker: jax.ShapeDtypeStruct(marker.shape[1:], marker.dtype),
                                    total["shapes"])
      return finish(state, inner.parts.server(state["inner_agg"], total["rotated"], rng), value_template)

    return sum_based(init, broadcast, client, server, upload_bits=upload_bits, dp_event=inner.dp_event)

  def next_fn(state, values, weights, rng, client_mask=None):
    value_template = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape[1:], v.dtype), values)
    rotated = jax.vmap(rotate_value, in_axes=(None, 0))(state["round_seed"], values)
    return finish(state, inner.next(state["inner_agg"], rotated, weights, rng, client_mask), value_template)

  return Aggregator(init=init, next=next_fn, parts=None, upload_bits=upload_bits, dp_event=inner.dp_event)
