"""Simulated secure summation (TFF ``SecureSumFactory``, ``SecureModularSumFactory``) and the ``secure_aggregator``.

Secure aggregation (SecAgg, Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving Machine
Learning") lets the server learn only the SUM of the clients' integer vectors, computed modulo a group size
``2^B``. Real values must therefore be turned into bounded non-negative integers on the clients and decoded on the
server. This module simulates that exactly; nothing is encrypted.

Secure sum of bounded values, :func:`secure_sum` (bounds ``L <= U``, ``n`` real clients):

* INT mode (int bounds, integer values): client ``i`` sends ``v_i = clip(x_i, L, U) - L`` in ``[0, U - L]``, a
  summand of ``b = ceil(log2(U - L + 1))`` bits. The server gets ``S = (sum_i v_i) mod 2^B`` and returns
  ``S + n * L``.
* FLOAT mode (float bounds or :class:`EstimationProcess` bounds, floating values): with ``M = 2^32 - 1`` and the
  float64 scale ``s = M / (U - L)`` (``s = 0`` if ``U == L``), client ``i`` sends the ``b = 32``-bit integer
  ``q_i = clip(round(clip(x_i, L, U) * s) - round(L * s), 0, M)`` (int64 arithmetic). ``round`` is
  round-half-to-even and DETERMINISTIC, as in the reference, so the decoded sum can be biased: every client may err
  by up to half a step ``(U - L) / (2M)`` in the same direction. The server decodes
  ``sum_x = (S + n * round(L * s)) * (U - L) / M`` in float64 (``n * L`` when ``U == L``; NaN when an adaptive
  ``U < L``) and casts it to the value's dtype.

The group size. Real SecAgg works modulo a group large enough to hold the whole sum; the simulation uses
``B = min(62, b + ceil(log2(num_client_slots)))``, computed at trace time from the static number of client slots
that the server part receives in its :class:`~fedjax_lite.aggregators.base.AggregationContext` (the same in
``next`` and in a streamed round); since ``n * (2^b - 1) < 2^B`` for every ``B >= b + ceil(log2 n)``, the sum is
exact. A user-given ``modulus_bits`` replaces ``B``; when it is too small the result WRAPS AROUND:
``(sum_i v_i mod 2^modulus_bits) + n * L`` (INT mode), and likewise for ``S`` in FLOAT mode. (TFF's simulation
instead sums in int64 and only asserts that every summand fits ``b`` bits; it never reduces the sum.)

Exactness. Each client's integer summand is split into 16-bit limbs held in uint32 arrays,
``v = sum_k limb_k * 2^(16 k)``; a limb sum over at most 65,536 clients is below ``2^32``, so the contributions add
exactly with plain ``+`` (the streaming runner's ``jnp.add``). The int64/float64 formulas (quantization,
recombining the limb sums, the modular reduction, decoding) are computed as written, in int64 and float64, inside
ONE scoped x64 region, :func:`in_x64`: a nested ``jax.jit`` named ``secure_sum_x64``, traced under JAX's
``enable_x64`` context, that takes and returns 32-bit arrays only. Each client enters it once (all leaves) and the
server once; everything else -- the rest of the library, the round's state, every value leaving the aggregator --
stays 32-bit (tests check a round's program for 64-bit values outside the region). The client count ``n`` and the
clipping indicators are 1-bit secure sums of their own.

Backends. FLOAT mode needs IEEE float64, which TPUs (and Apple's Metal plugin) do not provide: there it raises
one error naming the backend and the alternatives (INT mode, or running the aggregator on CPU) instead of a
compiler error or emulated float64 results. INT mode and :func:`secure_modular_sum` use 64-bit integers only.
XLA:CPU flushes subnormal float32 inputs to zero, so a subnormal bound acts as 0 there (a subnormal value rounds to
the level of 0 anyway unless the bounds are subnormal too).

Adaptive bounds (FLOAT mode): ``upper_bound`` an :class:`EstimationProcess` gives ``U = report(state)`` (cast to the
value's dtype) and ``L = -U``; each client feeds the process ``max(|min(x_i)|, |max(x_i)|)`` over all leaves,
BEFORE clipping. With both bounds processes, the upper one is fed ``max(x_i)`` and the lower one ``min(x_i)``. The
bounds used in a round are the reports of the state before its update.

State: ``()`` for constant bounds, the process state for one process, ``(upper_state, lower_state)`` for two.
Measurements (clients, not coordinates, are counted; ``max``/``min`` run over all leaves)::

  {'secure_upper_clipped_count': sum_i 1[max(x_i) > U], 'secure_lower_clipped_count': sum_i 1[min(x_i) < L],
   'secure_upper_threshold': U, 'secure_lower_threshold': L, 'secure_non_finite_count': sum_i 1[x_i not finite]}

Non-finite values (beyond the reference, which encodes them into garbage group elements): a client whose value
holds any NaN or Inf cannot be encoded in the finite group, so it is REJECTED -- it uploads zeros, is left out of
the client count (its clipping indicators are 0) and is counted in ``secure_non_finite_count`` (a fourth 1-bit
secure sum). The result is the sum over the finite clients; a NaN never becomes a finite coordinate unnoticed.

Modular secure sum, :func:`secure_modular_sum` (integers only): ``(sum_i x_i) mod M`` in ``[0, M - 1]``; inputs out
of range wrap around. With ``symmetric_range`` the sum is taken modulo ``2M - 1`` and mapped to
``[-(M - 1), M - 1]`` by ``v - (2M - 1) * 1[v >= M]``.

:func:`secure_aggregator` is the reference's preset (``tff.learning.secure_aggregator``): adaptive zeroing and
clipping whose quantile estimates are themselves summed securely, around a mean whose value and weight sums are
secure sums.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.experimental
import jax.numpy as jnp
import numpy as np

from fedjax_lite.aggregators.base import AggregationContext, Aggregator, as_template
from fedjax_lite.aggregators.estimation import EstimationProcess
from fedjax_lite.aggregators.wrapping import Inner, total_upload_bits
from fedjax_lite.core import validation
from fedjax_lite.core.process import MeasuredOutput
from fedjax_lite.core.tree import PyTree, tree_all_finite, tree_num_elements, tree_select

LIMB_BITS = 16
LIMB_MASK = (1 << LIMB_BITS) - 1
MAX_CLIENT_SLOTS = 2**16  # limb sums stay below 2^32 for this many clients
MAX_MODULUS_BITS = 62
FLOAT_SUMMAND_BITS = 32
FLOAT_QUANTIZATION_LEVELS = 2**32 - 1  # M
COUNT_BITS = 1  # the client count and each clipping indicator are 1-bit secure sums

X64_REGION = "secure_sum_x64"  # the name of the nested jit that holds ALL of the secure sums' 64-bit values
PLATFORMS_WITHOUT_FLOAT64 = ("tpu", "metal")

_CONSTANT, _SYMMETRIC_PROCESS, _TWO_PROCESSES = "constant", "symmetric_process", "two_processes"


# ---------------------------------------------------------------------------------------------------------------
# The x64 region.


def _enable_x64():
  """JAX's scoped x64 switch as a context manager.

  ``jax.enable_x64(True)`` (a config state that is also a context manager) in every supported release, 0.10.2 to
  0.12.x; ``jax.experimental.enable_x64()``, its name in older releases, if a build has only that one.
  """
  state = getattr(jax, "enable_x64", None)
  if callable(state):
    return state(True)
  legacy = getattr(jax.experimental, "enable_x64", None)
  if legacy is None:
    raise NotImplementedError(f"jax {jax.__version__} has neither jax.enable_x64 nor jax.experimental.enable_x64; "
                              "the secure sums need JAX's scoped x64 mode (jax >= 0.10.2 has it).")
  return legacy()


def default_platform() -> str:
  """The platform a computation built now runs on: that of ``jax.default_device`` when set, else the default
  backend's (``'cpu'``, ``'gpu'``, ``'tpu'``, ...)."""
  device = jax.config.jax_default_device
  if device is None:
    return jax.default_backend()
  return device if isinstance(device, str) else device.platform


def check_float64_platform() -> None:
  """Raises NotImplementedError, naming the backend and the alternatives, when it has no float64 (TPU, Metal)."""
  platform = default_platform()
  if platform.lower() in PLATFORMS_WITHOUT_FLOAT64:
    raise NotImplementedError(
        f"secure_sum in FLOAT mode (float or EstimationProcess bounds, as inside secure_aggregator) quantizes and "
        f"decodes in float64, which the {platform!r} backend does not support. Use secure_sum with int bounds on "
        "integer values (INT mode, 64-bit integer arithmetic only), or run this aggregator on CPU: build and run the "
        "round under `with jax.default_device(jax.devices('cpu')[0]):`.")


def _check_32_bit(tree: PyTree, what: str) -> None:
  wide = sorted({str(np.dtype(leaf.dtype)) for leaf in jax.tree.leaves(tree) if np.dtype(leaf.dtype).itemsize > 4})
  if wide:
    raise TypeError(f"the secure sum's x64 region {what} arrays of at most 32 bits, got dtypes {wide}.")


def in_x64(compute: Callable[..., PyTree], *arrays: PyTree, float64: bool) -> PyTree:
  """``compute(*arrays)`` with JAX's 64-bit types: the ONE x64 region of the secure sums.

  ``compute`` is traced as a nested ``jax.jit`` named ``secure_sum_x64`` (:data:`X64_REGION`) inside JAX's
  scoped ``enable_x64`` context, so it may use int64, uint64 and float64 even inside a 32-bit traced round. Its
  arguments and results are arrays of at most 32 bits (checked), so no 64-bit value enters or leaves it.
  ``float64`` says whether it computes in float64, which the backend must then support
  (:func:`check_float64_platform`).
  """
  if float64:
    check_float64_platform()
  _check_32_bit(arrays, "takes")

  def secure_sum_x64(*args):
    return compute(*args)

  with _enable_x64():
    outputs = jax.jit(secure_sum_x64)(*arrays)
  _check_32_bit(outputs, "returns")
  return outputs


# The arithmetic below runs inside the region only (int64/uint64/float64).


def _to_limbs(summand: jax.Array, num_limbs: int) -> jax.Array:
  """uint32 ``[num_limbs, *shape]`` 16-bit limbs, least significant first, of a non-negative int64 ``summand``.

  One broadcast shift (not ``jnp.stack``): XLA:CPU fuses it into the elementwise chain that computes ``summand``.
  """
  shifts = (np.arange(num_limbs, dtype=np.int64) * LIMB_BITS).reshape((num_limbs,) + (1,) * summand.ndim)
  return ((summand[None] >> shifts) & LIMB_MASK).astype(jnp.uint32)


def _from_limbs(limb_sums: jax.Array, modulus_bits: int) -> jax.Array:
  """``(sum_k limb_sums[k] * 2^(16 k)) mod 2^modulus_bits`` as int64, for uint32 ``limb_sums[num_limbs, ...]``.

  uint64 arithmetic wraps modulo ``2^64``, a multiple of ``2^modulus_bits``, so the reduction is exact however
  large the limb sums are.
  """
  total = jnp.zeros(limb_sums.shape[1:], jnp.uint64)
  for k in range(limb_sums.shape[0]):
    total = total + (limb_sums[k].astype(jnp.uint64) << (LIMB_BITS * k))
  return (total & ((1 << modulus_bits) - 1)).astype(jnp.int64)


def _scale(upper: jax.Array, lower: jax.Array) -> jax.Array:
  """``s = M / (U - L)`` in float64, 0 when ``U <= L``."""
  width = upper.astype(jnp.float64) - lower.astype(jnp.float64)
  return jnp.where(width > 0, FLOAT_QUANTIZATION_LEVELS / jnp.where(width > 0, width, 1.0), 0.0)


def _finite_bounds(upper: jax.Array, lower: jax.Array) -> jax.Array:
  return jnp.isfinite(upper) & jnp.isfinite(lower)


def _quantize(value: jax.Array, upper: jax.Array, lower: jax.Array) -> jax.Array:
  """FLOAT mode client step: ``q = clip(round(clip(x, L, U) s) - round(L s), 0, M)`` as int64 (0 for non-finite
  bounds); ``upper``/``lower`` are in the value's dtype."""
  scale = _scale(upper, lower)
  shift = jnp.round(lower.astype(jnp.float64) * scale).astype(jnp.int64)
  levels = jnp.round(jnp.clip(value, lower, upper).astype(jnp.float64) * scale).astype(jnp.int64) - shift
  return jnp.where(_finite_bounds(upper, lower), jnp.clip(levels, 0, FLOAT_QUANTIZATION_LEVELS), 0)


def _dequantize(summed_levels: jax.Array, count: jax.Array, upper: jax.Array, lower: jax.Array) -> jax.Array:
  """FLOAT mode server step: ``(S + n round(L s)) (U - L) / M`` in float64; ``n L`` if ``U == L``, NaN if
  ``U < L`` or a bound is not finite."""
  upper64, lower64, count64 = upper.astype(jnp.float64), lower.astype(jnp.float64), count.astype(jnp.float64)
  shift = jnp.round(lower64 * _scale(upper, lower))
  decoded = (summed_levels.astype(jnp.float64) + count64 * shift) * ((upper64 - lower64) / FLOAT_QUANTIZATION_LEVELS)
  decoded = jnp.where(upper64 == lower64, count64 * lower64, decoded)
  return jnp.where((upper64 < lower64) | ~_finite_bounds(upper, lower), jnp.nan, decoded)


# ---------------------------------------------------------------------------------------------------------------
# Group size and client slots.


def _num_limbs(summand_bits: int) -> int:
  return max(1, -(-summand_bits // LIMB_BITS))


def group_bits(summand_bits: int, num_client_slots: int | None, modulus_bits: int | None = None) -> int:
  """``B``: ``modulus_bits`` if given, else ``min(62, summand_bits + ceil(log2(num_client_slots)))``.

  ``num_client_slots=None`` stands for the largest supported cohort, ``2^16`` slots.
  """
  if modulus_bits is not None:
    return modulus_bits
  slots = MAX_CLIENT_SLOTS if num_client_slots is None else num_client_slots
  return min(MAX_MODULUS_BITS, summand_bits + (max(slots, 1) - 1).bit_length())


def _num_slots(context: AggregationContext) -> int:
  """The round's static number of client slots, checked against what the 16-bit limbs can sum exactly."""
  num_client_slots = int(context.num_client_slots)
  if num_client_slots > MAX_CLIENT_SLOTS:
    raise ValueError(f"secure summation supports at most {MAX_CLIENT_SLOTS} client slots per call (its 16-bit "
                     f"limbs must sum exactly in uint32), got {num_client_slots}.")
  return num_client_slots


def _indicator_contribution(*indicators: jax.Array) -> jax.Array:
  """1-bit secure summands (e.g. ``1`` for the client count, clipping indicators) as one uint32 limb each."""
  return jnp.stack([jnp.asarray(indicator).astype(jnp.uint32) for indicator in indicators])[None]


def _single_dtype(value_template: PyTree, name: str) -> np.dtype:
  leaves = jax.tree.leaves(as_template(value_template))
  if not leaves:
    raise ValueError(f"{name} needs a value with at least one array leaf.")
  dtypes = sorted({str(leaf.dtype) for leaf in leaves})
  if len(dtypes) > 1:
    raise TypeError(f"{name} needs every leaf of the value to share one dtype, got dtypes {dtypes}.")
  dtype = np.dtype(leaves[0].dtype)
  if dtype.itemsize * 8 > 32:
    raise TypeError(f"{name} supports value dtypes of at most 32 bits (JAX's default mode), got {dtype}.")
  return dtype


def _tree_max(tree: PyTree) -> jax.Array:
  return jnp.max(jnp.stack([jnp.max(leaf) for leaf in jax.tree.leaves(tree)]))


def _tree_min(tree: PyTree) -> jax.Array:
  return jnp.min(jnp.stack([jnp.min(leaf) for leaf in jax.tree.leaves(tree)]))


# ---------------------------------------------------------------------------------------------------------------
# secure_sum


class _Bounds(NamedTuple):
  """The parsed bounds of :func:`secure_sum`."""

  kind: str  # _CONSTANT, _SYMMETRIC_PROCESS or _TWO_PROCESSES
  integer: bool  # INT mode (constant int bounds)
  upper: Any  # int, float or EstimationProcess
  lower: Any  # int, float, EstimationProcess, or None for a single process


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_float(value: Any) -> bool:
  return isinstance(value, (float, np.floating))


def _parse_bounds(upper_bound: Any, lower_bound: Any) -> _Bounds:
  upper_is_process = isinstance(upper_bound, EstimationProcess)
  lower_is_process = isinstance(lower_bound, EstimationProcess)
  if upper_is_process or lower_is_process:
    if not upper_is_process:
      raise TypeError("upper_bound must be an EstimationProcess when lower_bound is one, got "
                      f"{type(upper_bound).__name__}.")
    if lower_bound is None:
      return _Bounds(_SYMMETRIC_PROCESS, False, upper_bound, None)
    if not lower_is_process:
      raise TypeError("lower_bound must be None or an EstimationProcess when upper_bound is an EstimationProcess, "
                      f"got {type(lower_bound).__name__}.")
    return _Bounds(_TWO_PROCESSES, False, upper_bound, lower_bound)

  upper_bound = validation.as_number(upper_bound)
  lower_bound = validation.as_number(lower_bound)
  if not (_is_int(upper_bound) or _is_float(upper_bound)):
    raise TypeError("upper_bound must be an int, a float or an EstimationProcess, got "
                    f"{type(upper_bound).__name__}.")
  if lower_bound is None:
    if _is_int(upper_bound):
      validation.check_int("upper_bound", upper_bound, minimum=1)
      return _Bounds(_CONSTANT, True, int(upper_bound), -int(upper_bound))
    upper = validation.check_positive("upper_bound", upper_bound)
    return _Bounds(_CONSTANT, False, upper, -upper)
  if not (_is_int(lower_bound) or _is_float(lower_bound)):
    raise TypeError(f"lower_bound must be None, an int, a float or an EstimationProcess, got "
                    f"{type(lower_bound).__name__}.")
  if _is_int(upper_bound) != _is_int(lower_bound):
    raise TypeError("upper_bound and lower_bound must both be ints (INT mode) or both floats (FLOAT mode), got "
                    f"{type(upper_bound).__name__} and {type(lower_bound).__name__}.")
  if _is_int(upper_bound):
    upper, lower = int(upper_bound), int(lower_bound)
    if not lower < upper:
      raise ValueError(f"lower_bound must be < upper_bound in INT mode, got lower_bound={lower}, "
                       f"upper_bound={upper}.")
    return _Bounds(_CONSTANT, True, upper, lower)
  upper = validation.check_float("upper_bound", upper_bound)
  lower = validation.check_float("lower_bound", lower_bound)
  if not lower <= upper:
    raise ValueError(f"lower_bound must be <= upper_bound in FLOAT mode, got lower_bound={lower}, "
                     f"upper_bound={upper}.")
  return _Bounds(_CONSTANT, False, upper, lower)


def secure_sum(
    upper_bound: int | float | EstimationProcess,
    lower_bound: int | float | EstimationProcess | None = None,
    *,
    modulus_bits: int | None = None,
) -> Aggregator:
  """Simulated secure sum of bounded values (TFF ``SecureSumFactory``); see the module docstring for the formulas.

  Unweighted (weights are ignored) and sum-based. Bounds decide the mode: two ints (or one int ``U > 0``, giving
  ``L = -U``) sum integer values exactly after clipping to ``[L, U]``; two floats (or one float ``U > 0``) or
  :class:`EstimationProcess` bounds quantize floating values to 32 bits over ``[L, U]``, so each client's value is
  off by at most ``(U - L) / (2 (2^32 - 1))`` (round-half-to-even, possibly biased).

  Upload per client (``upload_bits``): ``sum_leaves numel * b + 1 + 2`` bits plus the estimators' records, with
  ``b = ceil(log2(U - L + 1))`` (INT) or 32 (FLOAT); the 1 is the client count, the 2 the clipping indicators.
  (The simulation carries each summand as uint32 16-bit limbs; that is a representation, not the payload.)

  Args:
    upper_bound: ``U``: an int, a float, or an :class:`EstimationProcess` (adaptive, FLOAT mode).
    lower_bound: ``L``: of the same kind as ``upper_bound``, ``L < U`` for ints, ``L <= U`` for floats; None gives
      ``L = -U`` (then ``U > 0``).
    modulus_bits: the group size ``2^modulus_bits`` of the simulated SecAgg, in ``[1, 62]``; default the smallest
      that holds the whole sum. A smaller group makes the (shifted, quantized) sum wrap around.

  Example::

    agg = secure_sum(7, 0)
    state = agg.init(jnp.zeros((2,), jnp.int32))
    agg.next(state, jnp.array([[1, 9], [2, -3]], jnp.int32), jnp.ones(2), jax.random.key(0)).result  # [3, 7]
  """
  bounds = _parse_bounds(upper_bound, lower_bound)
  validation.check_int("modulus_bits", modulus_bits, minimum=1, maximum=MAX_MODULUS_BITS, allow_none=True)
  summand_bits = (bounds.upper - bounds.lower).bit_length() if bounds.integer else FLOAT_SUMMAND_BITS
  num_limbs = _num_limbs(summand_bits)
  processes = {_CONSTANT: (), _SYMMETRIC_PROCESS: (bounds.upper,),
               _TWO_PROCESSES: (bounds.upper, bounds.lower)}[bounds.kind]
  # Process k draws its client and server keys from fold_in(rng, k).
  process_parts = tuple(Inner(process, key=k) for k, process in enumerate(processes))

  def check_template(value_template) -> None:
    dtype = _single_dtype(value_template, "secure_sum")
    if bounds.integer:
      if not np.issubdtype(dtype, np.integer):
        raise TypeError(f"secure_sum with int bounds (INT mode) needs integer values, got dtype {dtype}; use float "
                        "bounds for floating values.")
      info = np.iinfo(dtype)
      for name, bound in (("upper_bound", bounds.upper), ("lower_bound", bounds.lower)):
        if not info.min <= bound <= info.max:
          raise ValueError(f"{name} must lie within the value dtype's range [{info.min}, {info.max}] ({dtype}), "
                           f"got {bound}.")
    elif not np.issubdtype(dtype, np.floating):
      raise TypeError(f"secure_sum with float or EstimationProcess bounds (FLOAT mode) needs floating values, got "
                      f"dtype {dtype}; use int bounds for integer values.")

  def init(value_template):
    check_template(value_template)
    if not bounds.integer:
      check_float64_platform()
    if bounds.kind == _CONSTANT:
      return ()
    if bounds.kind == _SYMMETRIC_PROCESS:
      return bounds.upper.init()
    return (bounds.upper.init(), bounds.lower.init())

  def reported_bounds(state):
    """``(U, L)`` of this round: Python numbers for constant bounds, float32 reports for processes."""
    if bounds.kind == _CONSTANT:
      return bounds.upper, bounds.lower
    if bounds.kind == _SYMMETRIC_PROCESS:
      upper = bounds.upper.report(state)
      return upper, -upper
    return bounds.upper.report(state[0]), bounds.lower.report(state[1])

  def process_states(state):
    return {_CONSTANT: (), _SYMMETRIC_PROCESS: (state,), _TWO_PROCESSES: state}[bounds.kind]

  def broadcast(state):
    if bounds.kind == _CONSTANT:
      return ()
    params = tuple(part.broadcast(s) for part, s in zip(process_parts, process_states(state)))
    return (reported_bounds(state), params)

  def encode(value, finite, upper, lower):
    """The client's limbs (inside the x64 region): ``clip(x, L, U) - L`` (INT) or the level ``q`` (FLOAT)."""

    def limbs(leaf):
      if bounds.integer:
        lower64 = lower.astype(jnp.int64)
        summand = jnp.clip(leaf.astype(jnp.int64), lower64, upper.astype(jnp.int64)) - lower64
      else:
        summand = _quantize(leaf, upper, lower)
      return _to_limbs(summand, num_limbs) * finite.astype(jnp.uint32)

    return jax.tree.map(limbs, value)

  def client(client_params, value, weight, rng):
    dtype = jax.tree.leaves(value)[0].dtype
    if bounds.kind == _CONSTANT:
      upper, lower = bounds.upper, bounds.lower
    else:
      (upper, lower), process_params = client_params
    upper, lower = jnp.asarray(upper, dtype), jnp.asarray(lower, dtype)
    # A client with any NaN/Inf cannot be encoded in the finite group: it is rejected (uploads zeros, is not
    # counted in the client count) and counted in 'secure_non_finite_count'.
    finite = tree_all_finite(value)
    value = tree_select(finite, value, jax.tree.map(jnp.zeros_like, value))
    value_max, value_min = _tree_max(value), _tree_min(value)

    if bounds.kind == _SYMMETRIC_PROCESS:
      magnitude = jnp.maximum(jnp.abs(value_min), jnp.abs(value_max)).astype(jnp.float32)
      records = (process_parts[0].client(process_params[0], magnitude, rng),)
    elif bounds.kind == _TWO_PROCESSES:
      records = (process_parts[0].client(process_params[0], value_max.astype(jnp.float32), rng),
                 process_parts[1].client(process_params[1], value_min.astype(jnp.float32), rng))
    else:
      records = ()

    return {
        "value": in_x64(encode, value, finite, upper, lower, float64=not bounds.integer),
        # [client count, 1[max(x) > U], 1[min(x) < L], 1[non-finite]]: four 1-bit secure sums.
        "indicators": _indicator_contribution(finite, finite & (value_max > upper), finite & (value_min < lower),
                                              ~finite),
        "records": records,
    }

  def server(state, total, rng, context: AggregationContext):
    num_client_slots = _num_slots(context)
    dtype = _single_dtype(context.value_template, "secure_sum")
    upper, lower = reported_bounds(state)
    upper, lower = jnp.asarray(upper, dtype), jnp.asarray(lower, dtype)
    modulus = group_bits(summand_bits, num_client_slots, modulus_bits)

    def decode(value_limb_sums, indicator_limb_sums, upper, lower):
      """The counts and the decoded sum (inside the x64 region): ``S + n L`` (INT) or the dequantized ``S``."""
      counts = _from_limbs(indicator_limb_sums, group_bits(COUNT_BITS, num_client_slots)).astype(jnp.int32)
      count = counts[0].astype(jnp.int64)

      def leaf_sum(limb_sums):
        summed = _from_limbs(limb_sums, modulus)
        if bounds.integer:
          return (summed + count * lower.astype(jnp.int64)).astype(dtype)
        return _dequantize(summed, count, upper, lower).astype(dtype)

      return jax.tree.map(leaf_sum, value_limb_sums), counts

    result, counts = in_x64(decode, total["value"], total["indicators"], upper, lower, float64=not bounds.integer)
    _, upper_clipped_count, lower_clipped_count, non_finite_count = counts  # the client count only decodes

    new_process_states = tuple(part.server(s, records, rng, context)
                               for part, s, records in zip(process_parts, process_states(state), total["records"]))
    if bounds.kind == _CONSTANT:
      new_state = ()
    elif bounds.kind == _SYMMETRIC_PROCESS:
      new_state = new_process_states[0]
    else:
      new_state = new_process_states
    measurements = {
        "secure_upper_clipped_count": upper_clipped_count,
        "secure_lower_clipped_count": lower_clipped_count,
        "secure_upper_threshold": upper,
        "secure_lower_threshold": lower,
        "secure_non_finite_count": non_finite_count,
    }
    return MeasuredOutput(state=new_state, result=result, measurements=measurements)

  def value_bits(value_template):
    check_template(value_template)
    return tree_num_elements(as_template(value_template)) * summand_bits + 4 * COUNT_BITS

  return Aggregator(init, broadcast, client, server, upload_bits=total_upload_bits(process_parts, value_bits))


# ---------------------------------------------------------------------------------------------------------------
# secure_modular_sum


def secure_modular_sum(modulus: int, *, symmetric_range: bool = False) -> Aggregator:
  """Simulated secure modular sum of integers (TFF ``SecureModularSumFactory``).

  ``result = (sum_i x_i) mod M`` in ``[0, M - 1]``: clients send ``x_i mod M`` (inputs out of range wrap around, no
  error) and the server reduces the exact sum modulo ``M``. With ``symmetric_range`` the range is
  ``[-(M - 1), M - 1]``: the sum is taken modulo ``2M - 1`` and ``v >= M`` maps to ``v - (2M - 1)``. Unweighted;
  state ``()``; measurements ``()``. Each client uploads ``ceil(log2(M'))`` bits per element, ``M'`` being the
  modulus actually used (``M`` or ``2M - 1``).

  Args:
    modulus: ``M >= 2``; the result range must fit the value's integer dtype (checked at ``init``).
    symmetric_range: use the range ``[-(M - 1), M - 1]``.

  Example::

    agg = secure_modular_sum(7)
    values = jnp.array([[10], [13]], jnp.int32)  # 23 = 3 * 7 + 2
    agg.next(agg.init(values[0]), values, jnp.ones(2), jax.random.key(0)).result  # [2]
  """
  validation.check_int("modulus", modulus, minimum=2)
  if not isinstance(symmetric_range, bool):
    raise TypeError(f"symmetric_range must be a bool, got {type(symmetric_range).__name__}.")
  modulus = int(modulus)
  group_modulus = 2 * modulus - 1 if symmetric_range else modulus
  summand_bits = (group_modulus - 1).bit_length()
  num_limbs = _num_limbs(summand_bits)

  def check_template(value_template) -> None:
    for leaf in jax.tree.leaves(as_template(value_template)):
      dtype = np.dtype(leaf.dtype)
      if not np.issubdtype(dtype, np.integer):
        raise TypeError(f"secure_modular_sum needs integer values, got a leaf of dtype {dtype}.")
      if dtype.itemsize * 8 > 32:
        raise TypeError(f"secure_modular_sum supports value dtypes of at most 32 bits, got {dtype}.")
      info = np.iinfo(dtype)
      low = -(modulus - 1) if symmetric_range else 0
      if low < info.min or modulus - 1 > info.max:
        raise ValueError(f"modulus must keep the result range [{low}, {modulus - 1}] within the value dtype's "
                         f"range [{info.min}, {info.max}] ({dtype}), got modulus={modulus}.")

  def init(value_template):
    check_template(value_template)
    return ()

  def encode(value):
    """Each leaf's residue ``x mod M'`` as limbs (inside the x64 region)."""
    return jax.tree.map(lambda leaf: _to_limbs(jnp.remainder(leaf.astype(jnp.int64), group_modulus), num_limbs),
                        value)

  def client(client_params, value, weight, rng):
    return in_x64(encode, value, float64=False)

  def server(state, total, rng, context: AggregationContext):
    _num_slots(context)
    templates = as_template(context.value_template)

    def decode(total):
      """The residue of each leaf's limb sums (inside the x64 region); limb sums are below ``2^32`` and there are
      at most two limbs, so the int64 recombination is exact."""

      def leaf_sum(limb_sums, template):
        residue = jnp.remainder(_from_limbs(limb_sums, MAX_MODULUS_BITS), group_modulus)
        if symmetric_range:
          residue = jnp.where(residue >= modulus, residue - group_modulus, residue)
        return residue.astype(template.dtype)

      return jax.tree.map(leaf_sum, total, templates)

    return MeasuredOutput(state=state, result=in_x64(decode, total, float64=False), measurements=())

  def upload_bits(value_template):
    check_template(value_template)
    return tree_num_elements(as_template(value_template)) * summand_bits

  return Aggregator(init, lambda state: (), client, server, upload_bits=upload_bits)
