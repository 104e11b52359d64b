"""Sparsified and sign-compressed uploads, and a count-sketch upload (FetchSGD), with exact upload bit counts.

Wrappers around an inner sum-based aggregator (default :func:`~fedjax_lite.aggregators.mean`): in the client part
each client compresses its value and the inner client part receives the DECODED value (zeros where nothing was
sent), so the round streams like any sum while ``upload_bits`` counts the encoded message:

* :func:`top_k` (Stich, Cordonnier & Jaggi 2018, "Sparsified SGD with Memory"; Aji & Heafield 2017): keep the ``k``
  entries of largest magnitude, globally over all leaves or per leaf (``per_layer``). Message: ``k`` indices of
  ``ceil(log2 d)`` bits and ``k`` values at the leaf's width (global: ``d`` the total size).
* :func:`random_k` (Stich et al. 2018): keep ``k`` entries chosen uniformly without replacement from the client's
  own key, scaled by ``d / k`` so the decoded value is unbiased (``unbiased=False``: unscaled). Message: ``k``
  values and the 32-bit seed of the choice (the server regenerates the indices).
* :func:`sign_compression` (Bernstein et al. 2018 signSGD; Karimireddy et al. 2019, "Error Feedback Fixes SignSGD",
  ICML, scaled sign): ``(||x||_1 / d) sign(x)`` per leaf (or globally): ``d`` sign bits and one float32 scale.
* :func:`shared_random_k` (random-k with a mask SHARED by all clients of a round): round ``t`` keeps the coordinates
  drawn from the public key :func:`shared_mask_key` ``(seed, t) = fold_in(key(seed), t)``; a client uploads its
  ``k`` values only (no indices, no seed), and the inner aggregator receives those ``k`` values -- so a secure sum
  or a quantizer as ``inner`` sums or encodes ``k`` numbers per vector, and ``upload_bits`` is exactly its count.
  The server scatters the inner result back onto the support (times ``d / k`` when ``unbiased``). The aggregator
  counts its rounds in its state and broadcasts ``t`` (32 bits); an algorithm's client work reads it from
  ``Broadcast.aggregator`` for error feedback.

Each is a :class:`Compressor` (``top_k_compressor``, ``random_k_compressor``, ``sign_compressor``: the decoding
function and the exact message bits); :func:`compressed` turns one into an aggregator, and ``top_k``,
``random_k`` and ``sign_compression`` are those aggregators.

Top-k and sign compression are biased; Stich et al. and Karimireddy et al. restore convergence with ERROR FEEDBACK:
each client compresses ``e + x`` and keeps the residual ``e <- e + x - C(e + x)`` for its next round. The residual
is per-client state, which an aggregator does not have: a compressor built with ``error_feedback=True`` is given to
the algorithm (``fed_avg(upload_compressor=...)``, :mod:`fedjax_lite.algorithms.compressed_uploads`), which keeps
the residuals in its client states; :func:`compressed` refuses it. Random-k with error feedback must be unscaled
(``unbiased=False``, Stich et al.'s contraction).

:func:`count_sketch` (Rothchild et al. 2020, "FetchSGD", ICML) is an aggregator, not a wrapper: each client uploads
the count sketch ``S(w_i x_i)`` (``depth x width`` float32: rows of hashed, signed sums of the flattened value);
sketches are linear, so the server sums them into ``S(sum_i w_i x_i)``, divides by ``sum_i w_i``, estimates every
coordinate as the median over rows of its signed bucket, and returns the ``k`` coordinates of largest estimated
magnitude (zeros elsewhere). FetchSGD's server-side momentum and error accumulation in sketch space are not
included (they are server state; compose with a server optimizer instead).

Exact bits. The message's bits replace the inner aggregator's count of the dense value: indices at
``ceil(log2 d)`` bits, values at the leaf's width (or ``b`` bits plus the float32 range), signs at 1 bit, seeds and
scales at 32; the inner aggregator's OTHER uploads (a mean's float32 weight, a DP aggregator's norm records: what
it uploads for a value with no entries) are added.

Composition. Quantizing the kept values (``quantization_bits``) applies stochastic uniform quantization
(:func:`~fedjax_lite.aggregators.quantize_above_threshold`'s quantizer) to the ``k`` values, counted at ``b`` bits
each plus their float32 range (inside ``C``: error feedback's residual includes the quantization error). A
quantizing ``inner`` quantizes the decoded, zero-filled dense value on its way into the sum (its error is outside
the residual, and ``upload_bits`` still counts the sparse message). A secure sum cannot take the client-specific
messages: their indices do not add up under masking, so ``inner=secure_sum(...)`` securely sums the zero-filled
DENSE value (correct sums, but the sparse ``upload_bits`` then understates the dense masked payload). A random-k
mask shared by all clients of a round composes exactly: :func:`shared_random_k` with ``inner=secure_sum(...)``
securely sums the ``k`` values only, at the secure sum's widths. Differential privacy composes as the
inner aggregator (``inner=gaussian_fixed(...)`` clips and noises each decoded message; a message is a function of
one client's data and residual, so the user-level guarantee is unchanged); a DP wrapper around ``compressed``
would clip the dense value before compression, which is also valid.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lite.aggregators.base import SUM, Aggregator, as_template, check_aggregator, client_upload_bits
from fedjax_lite.aggregators.mean import mean
from fedjax_lite.aggregators.quantization import RANGE_BITS, quantize_dequantize
from fedjax_lite.aggregators.wrapping import Inner, wrapper
from fedjax_lite.core import validation
from fedjax_lite.core.process import MeasuredOutput
from fedjax_lite.core.tree import PyTree, dtype_bits

SEED_BITS = 32
SCALE_BITS = 32


def index_bits(size: int) -> int:
  """Bits of one index into ``size`` entries: ``ceil(log2 size)`` (0 for one entry)."""
  return max(0, math.ceil(math.log2(size))) if size > 1 else 0


def _flatten(tree: PyTree) -> tuple[jax.Array, Any]:
  leaves, treedef = jax.tree.flatten(tree)
  flat = jnp.concatenate([jnp.ravel(leaf).astype(jnp.float32) for leaf in leaves])
  return flat, (treedef, [(jnp.shape(leaf), jnp.result_type(leaf)) for leaf in leaves])


def _unflatten(flat: jax.Array, layout) -> PyTree:
  treedef, shapes = layout
  pieces, offset = [], 0
  for shape, dtype in shapes:
    size = int(np.prod(shape, dtype=np.int64))
    pieces.append(flat[offset:offset + size].reshape(shape).astype(dtype))
    offset += size
  return jax.tree.unflatten(treedef, pieces)


def _check_k(k: int | None, fraction: float | None) -> None:
  if (k is None) == (fraction is None):
    raise ValueError("give exactly one of k (entries kept) and fraction (of each vector's entries).")
  validation.check_int("k", k, minimum=1, allow_none=True)
  validation.check_float("fraction", fraction, low=0.0, high=1.0, low_inclusive=False, allow_none=True)


def _kept(size: int, k: int | None, fraction: float | None) -> int:
  return min(size, int(k)) if k is not None else max(1, math.ceil(fraction * size))


def _quantized(values: jax.Array, bits: int | None, rng: jax.Array) -> jax.Array:
  if bits is None:
    return values
  return quantize_dequantize(values, bits, rng)


def _group_dtypes(value_template: PyTree, per_layer: bool) -> list[tuple[int, Any]]:
  """``(size, dtype)`` of each compressed vector: every leaf, or all leaves as one float32 vector."""
  leaves = jax.tree.leaves(as_template(value_template))
  sizes = [int(np.prod(leaf.shape, dtype=np.int64)) for leaf in leaves]
  if per_layer:
    return [(size, leaf.dtype) for size, leaf in zip(sizes, leaves)]
  return [(sum(sizes), jnp.dtype(jnp.float32))]


def _groups(value_template: PyTree, per_layer: bool) -> list[tuple[int, int]]:
  """``(size, value bits)`` of each compressed vector: every leaf, or all leaves as one float32 vector."""
  return [(size, dtype_bits(dtype)) for size, dtype in _group_dtypes(value_template, per_layer)]


class SharedSupport(NamedTuple):
  """The support that every client of a round shares (:func:`shared_random_k_compressor`; module docstring).

  Attributes:
    seed: the public seed of the masks: round ``t``'s mask key is ``shared_mask_key(seed, t)``.
    gather: ``gather(value, mask_key) -> values``: the ``k`` values of each compressed vector at the round's
      support (a tuple of 1-D arrays, one per compressed vector), what a client uploads.
    scatter: ``scatter(values, mask_key, value_template) -> value``: the values (e.g. their sum over the cohort)
      put back at the support, zeros elsewhere (scaled by ``d / k`` when the compressor is unbiased).
    values_template: ``values_template(value_template) -> the template of gather's result`` (shape structs).
  """

  seed: int
  gather: Callable[[PyTree, jax.Array], PyTree]
  scatter: Callable[[PyTree, jax.Array, PyTree], PyTree]
  values_template: Callable[[PyTree], PyTree]


class Compressor(NamedTuple):
  """A compression of ONE client's upload, as the server decodes it (see the module docstring).

  Attributes:
    name: the measurement key of an aggregator built from it (``'top_k'``, ``'random_k'``, ``'sign'``).
    compress: ``compress(value, rng) -> decoded``: the value as the server decodes the message (zeros where
      nothing was sent), same tree, shapes and dtypes.
    upload_bits: ``upload_bits(value_template) -> int``: the exact bits of the encoded message.
    error_feedback: True when the client keeps the residual ``e <- e + x - C(e + x)`` and compresses ``e + x``
      (per-client state: give the compressor to the algorithm, e.g. ``fed_avg(upload_compressor=...)``).
    shared: for a compressor whose support is common to all clients of a round (:func:`shared_random_k_compressor`),
      the :class:`SharedSupport`; ``compress``'s key is then the round's mask key (:func:`shared_mask_key`), not a
      client's own key. None otherwise.
  """

  name: str
  compress: Callable[[PyTree, jax.Array], PyTree]
  upload_bits: Callable[[PyTree], int]
  error_feedback: bool = False
  shared: SharedSupport | None = None


def _tree_compress(compress_vector: Callable[[jax.Array, jax.Array], jax.Array], per_layer: bool
                   ) -> Callable[[PyTree, jax.Array], PyTree]:
  """``compress_vector`` (on a flat float32 vector) applied to every leaf with its own key (``per_layer``) or to
  all leaves flattened into one vector."""

  def compress(value: PyTree, rng: jax.Array) -> PyTree:
    if per_layer:
      leaves, treedef = jax.tree.flatten(value)
      keys = jax.random.split(rng, max(len(leaves), 1))
      return jax.tree.unflatten(treedef, [compress_vector(leaf.ravel().astype(jnp.float32), key)
                                          .reshape(leaf.shape).astype(leaf.dtype) for leaf, key in zip(leaves, keys)])
    flat, layout = _flatten(value)
    return _unflatten(compress_vector(flat, rng), layout)

  return compress


def _check_error_feedback(error_feedback: Any) -> bool:
  if not isinstance(error_feedback, bool):
    raise TypeError(f"error_feedback must be a bool, got {type(error_feedback).__name__}.")
  return error_feedback


def compressed(compressor: Compressor, inner: Aggregator | None = None, *, precompressed: bool = False
               ) -> Aggregator:
  """An aggregator whose clients upload ``compressor``'s message and whose inner sum-based aggregator (default
  :func:`~fedjax_lite.aggregators.mean`) sums the decoded values. Measurements
  ``{compressor.name: <inner measurements>}``; state and broadcast are the inner's. ``upload_bits`` is the message's
  (``compressor.upload_bits``, in place of the inner's dense value) plus the inner aggregator's other uploads (what it uploads for a value with no entries: a mean's 32-bit weight,
  a DP aggregator's norm records).

  ``precompressed=True``: the clients' values arrive already compressed (decoded) by the client work -- what an
  algorithm with error feedback does (``fed_avg(upload_compressor=...)``); the client part then passes them on
  unchanged and only count the message. A compressor with ``error_feedback`` needs per-client state, so it is
  accepted here only with ``precompressed``.

  A compressor with a shared support (:func:`shared_random_k_compressor`) gives a different wrapper: the inner
  aggregator receives the ``k`` VALUES only (not a zero-filled dense value), so it sums, quantizes or securely
  sums ``k`` numbers per compressed vector, and ``upload_bits`` is exactly the inner aggregator's count for them;
  the server puts the inner result back at the round's support. Its state is ``{'round': t, 'inner': <inner
  state>}`` (``t`` the count of its rounds, which names the round's mask), its broadcast ``{'round': t, 'inner':
  <inner broadcast>}`` (32 bits of the download). The client part gathers the values at the support whether or
  not ``precompressed`` (a decoded message holds the same values there).
  """
  if not isinstance(compressor, Compressor):
    raise TypeError(f"compressor must be a Compressor (e.g. top_k_compressor(k=10)), got {type(compressor).__name__}.")
  if compressor.shared is not None:
    if compressor.error_feedback and not precompressed:
      raise ValueError(f"the {compressor.name} compressor has error_feedback=True, which keeps a residual per client: "
                       "give it to the algorithm (e.g. fed_avg(upload_compressor=...)), which stores the residuals in "
                       "its client states, instead of wrapping an aggregator with it.")
    return _shared_support_aggregator(compressor, mean() if inner is None else inner)
  if compressor.error_feedback and not precompressed:
    raise ValueError(f"the {compressor.name} compressor has error_feedback=True, which keeps a residual per client: "
                     "give it to the algorithm (e.g. fed_avg(upload_compressor=...)), which stores the residuals in "
                     "its client states, instead of wrapping an aggregator with it.")
  inner = Inner(check_aggregator(mean() if inner is None else inner, "inner", combine=SUM))

  def client(client_params, value, weight, rng):
    compress_key, inner_key = jax.random.split(rng)
    decoded = value if precompressed else compressor.compress(value, compress_key)
    return inner.client(client_params, decoded, weight, inner_key)

  def server(state, combined, rng, context):
    out = inner.server(state, combined, rng, context)
    return out._replace(measurements={compressor.name: out.measurements})

  def upload_bits(value_template: PyTree) -> int:
    # The message replaces the inner's dense value; the inner's other uploads (a mean's weight, a DP aggregator's
    # norm records) are what it uploads for a value with no entries.
    empty = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct((0,), leaf.dtype), as_template(value_template))
    return int(compressor.upload_bits(value_template)) + client_upload_bits(inner.part, empty)

  return wrapper(inner, client, server)._replace(upload_bits=upload_bits)


def top_k_compressor(*, k: int | None = None, fraction: float | None = None, per_layer: bool = False,
                     quantization_bits: int | None = None, error_feedback: bool = False) -> Compressor:
  """Keep the ``k`` (or ``ceil(fraction d)``) largest-magnitude entries of each client's value (module docstring).

  Upload bits per compressed vector of ``d`` entries: ``k (ceil(log2 d) + value bits)``, value bits the leaf's
  width (float32 globally) or ``quantization_bits`` plus 64 for the kept values' range.
  """
  _check_k(k, fraction)
  validation.check_int("quantization_bits", quantization_bits, minimum=1, maximum=16, allow_none=True)

  def compress(flat, rng):
    kept = _kept(flat.shape[0], k, fraction)
    _, index = jax.lax.top_k(jnp.abs(flat), kept)
    return jnp.zeros_like(flat).at[index].set(_quantized(flat[index], quantization_bits, rng))

  def upload_bits(value_template):
    total = 0
    for size, value_bits in _groups(value_template, per_layer):
      kept = _kept(size, k, fraction)
      values = kept * quantization_bits + RANGE_BITS if quantization_bits else kept * value_bits
      total += kept * index_bits(size) + values
    return total

  return Compressor("top_k", _tree_compress(compress, per_layer), upload_bits, _check_error_feedback(error_feedback))


def _uniform_subset(key: jax.Array, size: int, kept: int) -> jax.Array:
  """The indices of a uniformly random ``kept``-subset of ``range(size)``: the ``kept`` largest of ``size`` i.i.d.
  uniforms drawn from ``key`` (``lax.top_k``, a partial selection: 37x faster on XLA:CPU than
  ``jax.random.choice(..., replace=False)``'s full permutation at ``size = 2^20``, ``kept = 1%``)."""
  return jax.lax.top_k(jax.random.uniform(key, (size,)), kept)[1]


def random_k_compressor(*, k: int | None = None, fraction: float | None = None, per_layer: bool = False,
                        unbiased: bool = True, quantization_bits: int | None = None,
                        error_feedback: bool = False) -> Compressor:
  """Keep ``k`` (or ``ceil(fraction d)``) entries chosen uniformly from the client's key, scaled by ``d / k`` when
  ``unbiased`` (module docstring). Upload bits per vector: ``k`` values (as :func:`top_k_compressor`) plus a
  32-bit seed."""
  _check_k(k, fraction)
  validation.check_int("quantization_bits", quantization_bits, minimum=1, maximum=16, allow_none=True)
  if not isinstance(unbiased, bool):
    raise TypeError(f"unbiased must be a bool, got {type(unbiased).__name__}.")
  if _check_error_feedback(error_feedback) and unbiased:
    raise ValueError("random-k with error feedback must be unbiased=False (Stich et al. 2018's unscaled rand-k, a "
                     "contraction ||x - C(x)||^2 <= (1 - k/d) ||x||^2; the d/k-scaled one is not, and its residual "
                     "can grow without bound).")

  def compress(flat, rng):
    size = flat.shape[0]
    kept = _kept(size, k, fraction)
    choice_key, quantize_key = jax.random.split(rng)
    index = _uniform_subset(choice_key, size, kept)
    scale = size / kept if unbiased else 1.0
    return jnp.zeros_like(flat).at[index].set(_quantized(flat[index], quantization_bits, quantize_key) * scale)

  def upload_bits(value_template):
    total = 0
    for size, value_bits in _groups(value_template, per_layer):
      kept = _kept(size, k, fraction)
      total += SEED_BITS + (kept * quantization_bits + RANGE_BITS if quantization_bits else kept * value_bits)
    return total

  return Compressor("random_k", _tree_compress(compress, per_layer), upload_bits,
                    _check_error_feedback(error_feedback))


def shared_mask_key(seed: int, round_num: jax.Array | int) -> jax.Array:
  """The key of round ``round_num``'s shared mask: ``jax.random.fold_in(jax.random.key(seed), round_num)``.

  Compressed vector ``g`` (``0`` globally; leaf ``g`` in ``jax.tree.leaves`` order per layer) of ``d_g`` entries
  keeps the ``k_g`` entries of largest ``u = jax.random.uniform(jax.random.fold_in(key, g), (d_g,))``
  (``jax.lax.top_k(u, k_g)``): a uniformly random ``k_g``-subset, public, so the server and every client know the
  support from the seed and the round number alone. (A float32 uniform takes 2^23 values, so two entries may tie at
  the boundary; ``top_k`` then keeps the lower index. ``top_k`` of uniforms is a partial selection, 37x faster on
  XLA:CPU than ``jax.random.choice(..., replace=False)``'s full permutation at ``d = 2^20``, ``k = 1%``.)
  """
  return jax.random.fold_in(jax.random.key(seed), jnp.asarray(round_num, jnp.uint32))


def shared_random_k_compressor(*, k: int | None = None, fraction: float | None = None, per_layer: bool = False,
                               unbiased: bool = True, seed: int = 0, error_feedback: bool = False) -> Compressor:
  """Random-k with a mask SHARED by all clients of a round (module docstring): the ``k`` (or ``ceil(fraction d)``)
  coordinates of round ``t`` are drawn from :func:`shared_mask_key` ``(seed, t)``, so every client uploads only
  its ``k`` values (no indices, no seed) and the clients' sparse vectors add up on the same support -- through a
  secure sum or a quantizer as well (give them as ``compressed``'s ``inner``, which then sees the ``k`` values).
  ``unbiased``: the server scales the decoded sum by ``d / k`` (unbiased over the mask's draw); error feedback needs
  ``unbiased=False`` (Stich et al. 2018's unscaled rand-k). ``compress(value, mask_key)`` is ``scatter(gather)``
  with the round's mask key; ``upload_bits`` counts the ``k`` float32 values (the inner aggregator's exact count
  replaces it inside :func:`compressed`)."""
  _check_k(k, fraction)
  validation.check_int("seed", seed, minimum=0, maximum=2**32 - 1)
  if not isinstance(per_layer, bool):
    raise TypeError(f"per_layer must be a bool, got {type(per_layer).__name__}.")
  if not isinstance(unbiased, bool):
    raise TypeError(f"unbiased must be a bool, got {type(unbiased).__name__}.")
  if _check_error_feedback(error_feedback) and unbiased:
    raise ValueError("shared random-k with error feedback must be unbiased=False (Stich et al. 2018's unscaled "
                     "rand-k, a contraction; the d/k-scaled one is not, and its residual can grow without bound).")

  def vectors(value):
    """The compressed vectors: every leaf flattened (``per_layer``), or all leaves as one float32 vector."""
    if per_layer:
      return [jnp.ravel(leaf) for leaf in jax.tree.leaves(value)]
    return [_flatten(value)[0]]

  def index(mask_key, group, size):
    return _uniform_subset(jax.random.fold_in(mask_key, group), size, _kept(size, k, fraction))

  def gather(value, mask_key):
    return tuple(vector[index(mask_key, group, vector.shape[0])] for group, vector in enumerate(vectors(value)))

  def scatter(values, mask_key, value_template):
    leaves, treedef = jax.tree.flatten(as_template(value_template))
    dense = []
    for group, ((size, _), kept_values) in enumerate(zip(_group_dtypes(value_template, per_layer), values)):
      scale = size / _kept(size, k, fraction) if unbiased else 1.0
      dense.append(jnp.zeros((size,), kept_values.dtype).at[index(mask_key, group, size)].set(kept_values * scale))
    if per_layer:
      return jax.tree.unflatten(treedef, [d.reshape(leaf.shape).astype(leaf.dtype) for d, leaf in zip(dense, leaves)])
    return _unflatten(dense[0], (treedef, [(leaf.shape, leaf.dtype) for leaf in leaves]))

  def values_template(value_template):
    return tuple(jax.ShapeDtypeStruct((_kept(size, k, fraction),), dtype)
                 for size, dtype in _group_dtypes(value_template, per_layer))

  def compress(value, mask_key):
    return scatter(gather(value, mask_key), mask_key, value)

  def upload_bits(value_template):
    return sum(_kept(size, k, fraction) * value_bits for size, value_bits in _groups(value_template, per_layer))

  support = SharedSupport(seed=int(seed), gather=gather, scatter=scatter, values_template=values_template)
  return Compressor("shared_random_k", compress, upload_bits, error_feedback, support)


def _shared_support_aggregator(compressor: Compressor, inner_aggregator: Aggregator) -> Aggregator:
  """:func:`compressed` for a compressor with a shared support (its docstring): the inner aggregator sees the
  ``k`` values of each compressed vector; the server scatters its result onto the round's support."""
  support = compressor.shared
  inner = Inner(check_aggregator(inner_aggregator, "inner", combine=SUM), template=support.values_template)

  def init(value_template):
    return {"round": jnp.zeros((), jnp.int32), "inner": inner.init(value_template)}

  def broadcast(state):
    return {"round": state["round"], "inner": inner.broadcast(state["inner"])}

  def client(client_params, value, weight, rng):
    values = support.gather(value, shared_mask_key(support.seed, client_params["round"]))
    return inner.client(client_params["inner"], values, weight, rng)

  def server(state, combined, rng, context):
    out = inner.server(state["inner"], combined, rng, context)
    result = support.scatter(out.result, shared_mask_key(support.seed, state["round"]), context.value_template)
    return MeasuredOutput({"round": state["round"] + 1, "inner": out.state}, result,
                          {compressor.name: out.measurements})

  return wrapper(inner, client, server, init=init, broadcast=broadcast)


def sign_compressor(*, per_layer: bool = True, error_feedback: bool = False) -> Compressor:
  """Scaled sign ``(||x||_1 / d) sign(x)`` of each leaf (or of all leaves together) (module docstring). Upload bits:
  ``d`` sign bits plus a 32-bit scale per compressed vector."""
  if not isinstance(per_layer, bool):
    raise TypeError(f"per_layer must be a bool, got {type(per_layer).__name__}.")

  def compress(flat, rng):
    return jnp.mean(jnp.abs(flat)) * jnp.sign(flat)

  def upload_bits(value_template):
    return sum(size + SCALE_BITS for size, _ in _groups(value_template, per_layer))

  return Compressor("sign", _tree_compress(compress, per_layer), upload_bits, _check_error_feedback(error_feedback))


def top_k(*, k: int | None = None, fraction: float | None = None, per_layer: bool = False,
          quantization_bits: int | None = None, inner: Aggregator | None = None) -> Aggregator:
  """:func:`compressed` with :func:`top_k_compressor` (its arguments): each client uploads its ``k`` (or
  ``ceil(fraction d)``) largest-magnitude entries. Measurements ``{'top_k': <inner measurements>}``."""
  return compressed(top_k_compressor(k=k, fraction=fraction, per_layer=per_layer,
                                     quantization_bits=quantization_bits), inner)


def random_k(*, k: int | None = None, fraction: float | None = None, per_layer: bool = False,
             unbiased: bool = True, quantization_bits: int | None = None,
             inner: Aggregator | None = None) -> Aggregator:
  """:func:`compressed` with :func:`random_k_compressor` (its arguments): ``k`` random entries per client, scaled
  by ``d / k`` when ``unbiased``. Measurements ``{'random_k': <inner measurements>}``."""
  return compressed(random_k_compressor(k=k, fraction=fraction, per_layer=per_layer, unbiased=unbiased,
                                        quantization_bits=quantization_bits), inner)


def shared_random_k(*, k: int | None = None, fraction: float | None = None, per_layer: bool = False,
                    unbiased: bool = True, seed: int = 0, inner: Aggregator | None = None) -> Aggregator:
  """:func:`compressed` with :func:`shared_random_k_compressor` (its arguments): every client of round ``t``
  uploads its values at the same ``k`` coordinates (drawn from ``shared_mask_key(seed, t)``), and ``inner``
  (default the mean) aggregates those ``k`` values -- e.g. ``inner=secure_sum(1.0)`` securely sums ``k`` numbers
  per vector at 32 bits each. Measurements ``{'shared_random_k': <inner measurements>}``."""
  return compressed(shared_random_k_compressor(k=k, fraction=fraction, per_layer=per_layer, unbiased=unbiased,
                                               seed=seed), inner)


def sign_compression(*, per_layer: bool = True, inner: Aggregator | None = None) -> Aggregator:
  """:func:`compressed` with :func:`sign_compressor`: the scaled sign of each leaf (or of all leaves together).
  Measurements ``{'sign': <inner measurements>}``."""
  return compressed(sign_compressor(per_layer=per_layer), inner)


def count_sketch(*, k: int, width: int, depth: int = 5, seed: int = 0) -> Aggregator:
  """FetchSGD's count-sketch upload: the weighted mean's ``k`` heaviest coordinates from the summed sketches
  (module docstring). Hashes: fully random tables from ``numpy.random.default_rng(seed)`` (built at ``init``'s
  size). Upload bits: ``depth * width * 32`` plus the 32-bit weight. State ``()``; measurements ``{}``.
  """
  validation.check_int("k", k, minimum=1)
  validation.check_int("width", width, minimum=1)
  validation.check_int("depth", depth, minimum=1)
  validation.check_int("seed", seed, minimum=0)

  def tables(size: int):
    generator = np.random.default_rng(seed)
    buckets = generator.integers(0, width, size=(depth, size)).astype(np.int32)
    signs = (2 * generator.integers(0, 2, size=(depth, size)) - 1).astype(np.float32)
    return jnp.asarray(buckets), jnp.asarray(signs)

  def client(client_params, value, weight, rng):
    flat, _ = _flatten(value)
    buckets, signs = tables(flat.shape[0])
    rows = jax.vmap(lambda b, s: jnp.zeros((width,), jnp.float32).at[b].add(s * flat * weight))(buckets, signs)
    return {"sketch": rows, "weight": jnp.asarray(weight, jnp.float32)}

  def server(state, combined, rng, context):
    template = context.value_template
    size = sum(int(np.prod(leaf.shape, dtype=np.int64)) for leaf in jax.tree.leaves(template))
    if k > size:
      raise ValueError(f"k ({k}) must be <= the value's {size} entries.")
    buckets, signs = tables(size)
    sketch = combined["sketch"] / jnp.where(combined["weight"] > 0, combined["weight"], 1.0)
    estimates = jnp.median(signs * jnp.take_along_axis(sketch, buckets, axis=1), axis=0)
    _, index = jax.lax.top_k(jnp.abs(estimates), k)
    flat = jnp.zeros((size,), jnp.float32).at[index].set(estimates[index])
    leaves, treedef = jax.tree.flatten(template)
    layout = (treedef, [(leaf.shape, leaf.dtype) for leaf in leaves])
    return MeasuredOutput((), _unflatten(flat, layout), {})

  return Aggregator(lambda template: (), lambda state: (), client, server,
                    upload_bits=lambda template: depth * width * 32 + 32)
