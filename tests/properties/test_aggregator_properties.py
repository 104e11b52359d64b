"""Property and fault-injection tests (hypothesis) for every aggregator and preset of ``fedjax_lite.aggregators``.

Each property is checked on generated rounds: random values in a few fixed shape classes (so each aggregator is
compiled once per shape class; compiled functions live in ``_COMPILED``), random weights including zeros, random
padding slots (``client_mask``) holding garbage (NaN, +-Inf, 1e30), and NaN/+-Inf injected into random real
clients, leaves and coordinates. Hypothesis runs derandomized, so CI sees the same cases on every run; the number
of cases per property is ``max_examples`` of its ``settings`` (listed in ``tests/README.md``).

Properties:

* padding invariance: garbage in padding slots changes nothing, bit for bit;
* permutation invariance of the client axis (aggregators whose clients draw no slot-keyed randomness): bit for bit
  where every sum is an exact integer sum (secure sums, sorting statistics, Krum), else to the float32 rounding of
  a sum in another order (``tests/tolerances.py``: ulps x terms x the sum of the terms' magnitudes);
* streaming equals stacked: the client parts summed by ``fedjax_lite.core.runner.run_clients`` (sequential, on
  one device or a mesh that deals the clients by size, vmap, chunked) then the server part equals ``next``;
* linearity of the linear sum-based aggregators;
* faults: a NaN/Inf client never becomes a silent finite wrong value -- each aggregator follows the rule its module
  docstring states (propagate; zero and count; reject and count; NaN coordinate; never selected);
* measurements count what they claim; the state stays finite over rounds with faults;
* the secure sums are exact modulo ``2^b`` (and ``M``) on integer inputs at and beyond their bounds;
* no 64-bit value leaves an aggregator: state, result, measurements and client contributions are at most 32-bit
  (the secure sums compute in int64/float64 inside their x64 region only).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedjax_lite import aggregators as agg
from fedjax_lite.aggregators.base import AggregationContext, as_template, contribution_template, split_rng
from fedjax_lite.core.runner import Runner, client_mesh, run_clients
from tests.aggregators.helpers import run_streaming
from tests.tolerances import float_atol

BF16 = jnp.bfloat16
GARBAGE = (np.nan, np.inf, -np.inf, 1e30, -1e30)
INT_GARBAGE = (np.iinfo(np.int32).min, np.iinfo(np.int32).max, 12345)
FAULTS = (np.nan, np.inf, -np.inf)
ZEROING_NORM = 5.0  # L-inf threshold; values are drawn in [-8, 8] so some clients are zeroed, some not
CLIPPING_NORM = 3.0  # L2 threshold
DP_CLIP, DP_CLIENTS = 2.0, 4.0
DP_NOISE = 0.2  # adaptive clipping needs z < 2 sigma_b = 2 (0.05 m) = 0.4


def _settings(max_examples: int):
  return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# Cases generated per property (and per aggregator where the test is parametrized over aggregators).
EXAMPLES = {
    "padding": 6,
    "permutation": 6,
    "streaming": 4,
    "faults": 6,
    "state_finite": 3,
    "measurements": 8,
    "linearity": 8,
    "secure_int_exact": 12,
    "secure_modular_exact": 12,
}


@dataclasses.dataclass(frozen=True)
class ShapeClass:
  """A value template: leaf name -> (shape, dtype), and the number of client slots."""

  leaves: tuple[tuple[str, tuple[int, ...], Any], ...]
  slots: int

  def template(self):
    return {name: jnp.zeros(shape, dtype) for name, shape, dtype in self.leaves}


SHAPES = {
    "two_f32": ShapeClass((("a", (3,), jnp.float32), ("b", (2, 2), jnp.float32)), slots=6),
    "mixed_bf16": ShapeClass((("w", (5,), jnp.float32), ("h", (3,), BF16)), slots=5),
    "scalar_3d": ShapeClass((("s", (), jnp.float32), ("t", (2, 1, 3), jnp.float32)), slots=4),
    "int32": ShapeClass((("a", (3,), jnp.int32), ("b", (2,), jnp.int32)), slots=6),
}


@dataclasses.dataclass(frozen=True)
class Case:
  """An aggregator and what it promises.

  scale: how the float tolerance of a reordered sum is bounded: 'exact' (bit for bit), 'sum', 'weighted',
    'unweighted', 'rotation', 'dp' (see ``_scales``).
  permutation: whether the client order cannot matter (False: clients draw slot-keyed randomness).
  nan_rule: 'propagate' (the non-finite coordinate stays non-finite), 'propagate_leaf' (the leaf gets a non-finite
    value), 'zero' (the client's value becomes zeros and is counted), 'reject' (the client is left out and counted),
    'nan_coordinate' (a NaN coordinate of a real client makes that coordinate NaN), 'krum' (never selected while
    enough finite clients remain), None (not applicable).
  count_key: the measurement path (tuple) counting the zeroed/rejected clients, for nan_rule 'zero'/'reject'.
  """

  name: str
  make: Callable[[], agg.Aggregator]
  shapes: tuple[str, ...] = ("two_f32",)
  scale: str = "weighted"
  permutation: bool = True
  nan_rule: str | None = "propagate"
  count_key: tuple | None = None
  min_real: int = 1
  stateful: bool = False


CASES = [
    Case("sum_aggregator", agg.sum_aggregator, ("two_f32", "mixed_bf16", "scalar_3d"), scale="sum"),
    Case("mean", agg.mean, ("two_f32", "mixed_bf16", "scalar_3d")),
    Case("unweighted_mean", agg.unweighted_mean, scale="unweighted"),
    Case("zeroing", lambda: agg.zeroing(ZEROING_NORM, agg.mean()), ("two_f32", "mixed_bf16"), nan_rule="zero",
         count_key=("zeroed_count",)),
    Case("clipping", lambda: agg.clipping(CLIPPING_NORM, agg.mean()), ("two_f32", "scalar_3d"), nan_rule="zero",
         count_key=("clipped_count",)),
    Case("gaussian_fixed", lambda: agg.gaussian_fixed(DP_NOISE, DP_CLIENTS, DP_CLIP), scale="dp", nan_rule="zero"),
    Case("gaussian_adaptive", lambda: agg.gaussian_adaptive(DP_NOISE, DP_CLIENTS, initial_l2_norm_clip=DP_CLIP),
         scale="dp", nan_rule="zero", stateful=True),
    Case("quantize_above_threshold", lambda: agg.quantize_above_threshold(4, 0), scale="sum", permutation=False,
         nan_rule="propagate_leaf"),
    Case("hadamard_rotation", agg.hadamard_rotation, ("two_f32", "scalar_3d"), scale="rotation",
         nan_rule="propagate_leaf", stateful=True),
    Case("secure_sum_float", lambda: agg.secure_sum(8.0), ("two_f32", "scalar_3d"), scale="exact", nan_rule="reject",
         count_key=("secure_non_finite_count",)),
    Case("secure_sum_int", lambda: agg.secure_sum(100, -50), ("int32",), scale="exact", nan_rule=None),
    Case("secure_modular_sum", lambda: agg.secure_modular_sum(1000), ("int32",), scale="exact", nan_rule=None),
    Case("coordinate_median", agg.coordinate_median, ("two_f32", "mixed_bf16", "scalar_3d"), scale="exact",
         nan_rule="nan_coordinate"),
    Case("trimmed_mean", lambda: agg.trimmed_mean(0.2), scale="exact", nan_rule="nan_coordinate"),
    Case("krum", lambda: agg.krum(1), scale="exact", nan_rule="krum"),
    Case("multi_krum", lambda: agg.multi_krum(1), scale="unweighted", nan_rule="krum"),
    Case("add_debug_measurements", lambda: agg.add_debug_measurements(agg.mean())),
    Case("robust_aggregator", agg.robust_aggregator, ("two_f32", "scalar_3d"), nan_rule="zero",
         count_key=("zeroed_count",), stateful=True),
    Case("compression_aggregator", lambda: agg.compression_aggregator(threshold=0), permutation=False,
         nan_rule="zero", count_key=("zeroed_count",), stateful=True),
    Case("secure_aggregator", agg.secure_aggregator, scale="exact", nan_rule="zero", count_key=("zeroed_count",),
         stateful=True),
    Case("dp_aggregator", lambda: agg.dp_aggregator(DP_NOISE, DP_CLIENTS), scale="dp", nan_rule="zero",
         count_key=("zeroed_count",), stateful=True),
]
CASE_IDS = [case.name for case in CASES]
BY_NAME = {case.name: case for case in CASES}
FLOAT_CASES = [case for case in CASES if case.shapes[0] != "int32"]
STREAMABLE = [case for case in CASES if case.name not in ("coordinate_median", "trimmed_mean", "krum", "multi_krum")]

# ---------------------------------------------------------------------------------------------------------------
# Compiled functions, one per (aggregator, shape class, what): every generated case reuses them.

_COMPILED: dict = {}


def _cached(key, build):
  if key not in _COMPILED:
    _COMPILED[key] = build()
  return _COMPILED[key]


def aggregator_of(case: Case) -> agg.Aggregator:
  return _cached(("aggregator", case.name), case.make)


def initial_state(case: Case, shape: str):
  return _cached(("init", case.name, shape), lambda: aggregator_of(case).init(SHAPES[shape].template()))


def compiled_next(case: Case):
  return _cached(("next", case.name), lambda: jax.jit(aggregator_of(case).next))


def compiled_streaming(case: Case, runner: Runner):
  """Through ``run_clients``: the client parts summed by the runner, then the server part."""

  def build():
    parts = aggregator_of(case)
    assert parts.combine == "sum"

    def streamed(state, values, weights, rng, client_mask):
      clients_key, server_key = split_rng(rng)
      round_data = {"num_examples": client_mask.astype(jnp.int32), "value": values, "weight": weights}

      def one_client(client_params, data, key):
        return parts.client(client_params, data["value"], data["weight"], key), None

      total, _ = run_clients(one_client, parts.broadcast(state), round_data, clients_key, runner=runner)
      context = AggregationContext(as_template(jax.tree.map(lambda v: v[0], values)), client_mask.shape[0])
      return parts.server(state, total, server_key, context)

    return jax.jit(streamed)

  return _cached(("streaming", case.name, runner), build)


def run(case: Case, shape: str, values, weights, mask, state=None, seed: int = 0):
  state = initial_state(case, shape) if state is None else state
  return compiled_next(case)(state, values, jnp.asarray(weights, jnp.float32), jax.random.key(seed),
                             jnp.asarray(mask))


# ---------------------------------------------------------------------------------------------------------------
# Generated rounds.


@dataclasses.dataclass
class Round:
  values: dict  # leaf name -> np array [slots, ...]
  weights: np.ndarray
  mask: np.ndarray
  faults: list  # (slot, leaf name, flat coordinate, value), real slots only


@st.composite
def rounds(draw, shape: str, min_real: int = 1, faults: bool = False, garbage: bool = True, int_range=None):
  """A round of ``SHAPES[shape]``: values, weights (zeros included), a mask with >= min_real real slots, garbage in
  the padding slots, and (with ``faults``) 1 to 3 NaN/Inf injected into real clients."""
  shape_class = SHAPES[shape]
  slots = shape_class.slots
  num_real = draw(st.integers(min(min_real, slots), slots))
  order = draw(st.permutations(range(slots)))
  mask = np.zeros(slots, bool)
  mask[list(order[:num_real])] = True
  values = {}
  for name, leaf_shape, dtype in shape_class.leaves:
    full = (slots,) + leaf_shape
    if jnp.issubdtype(dtype, jnp.integer):
      low, high = int_range or (-200, 200)
      values[name] = draw(hnp.arrays(np.int32, full, elements=st.integers(low, high)))
    else:
      drawn = draw(hnp.arrays(np.float32, full, elements=st.floats(-8, 8, width=32)))
      values[name] = drawn.astype(dtype)
  weights = draw(hnp.arrays(np.float32, (slots,), elements=st.one_of(st.just(0.0), st.floats(0.25, 16, width=32))))
  if garbage:
    for slot in np.flatnonzero(~mask):
      for name in values:
        values[name][slot] = draw(st.sampled_from(garbage_of(shape)))
  injected = []
  if faults:
    real = list(np.flatnonzero(mask))
    names = list(values)
    for _ in range(draw(st.integers(1, 3))):
      slot = int(draw(st.sampled_from(real)))
      name = draw(st.sampled_from(names))
      coordinate = draw(st.integers(0, values[name][slot].size - 1))
      value = draw(st.sampled_from(FAULTS))
      values[name][(slot,) + np.unravel_index(coordinate, values[name].shape[1:])] = value
      injected.append((slot, name, coordinate, value))
  return Round(values=values, weights=weights, mask=mask, faults=injected)


def garbage_of(shape: str) -> tuple:
  return INT_GARBAGE if jnp.issubdtype(SHAPES[shape].leaves[0][2], jnp.integer) else GARBAGE


def with_padding(round_: Round, fill: float) -> dict:
  """The round's values with every padding slot set to ``fill``."""
  values = {name: v.copy() for name, v in round_.values.items()}
  for name in values:
    values[name][~round_.mask] = fill
  return values


def participants(case: Case, round_: Round) -> np.ndarray:
  """Boolean [slots] of the clients that take part: the real ones, and for a stacked statistic (median, trimmed
  mean, Krum) only those with a positive weight (weight 0 is the contract's "takes no part", as for padding)."""
  if aggregator_of(case).combine == agg.STACK:
    return round_.mask & (np.asarray(round_.weights) > 0)
  return round_.mask


def faulty_slots(round_: Round) -> np.ndarray:
  """Boolean [slots]: real clients with any non-finite value."""
  bad = np.zeros(round_.mask.shape, bool)
  for name, v in round_.values.items():
    bad |= ~np.all(np.isfinite(np.asarray(v, np.float32).reshape(v.shape[0], -1)), axis=1)
  return bad & round_.mask


# ---------------------------------------------------------------------------------------------------------------
# Tolerances from the computation.


def _scales(case: Case, values: dict, weights, mask, result) -> dict:
  """Per leaf, the magnitude ``S`` such that a sum in another order differs by at most ``ulps * terms * eps * S``.

  For ``s = sum_i t_i`` in two orders the difference is at most ``2 (n - 1) eps sum_i |t_i|`` (Higham eq. 4.4), so
  ``S`` bounds ``sum_i max_j |t_ij|`` divided as the aggregator divides: 'sum' ``sum_i max|x_i|``; 'weighted'
  ``sum_i w_i max|x_i| / sum_i w_i`` (zeroing and clipping only shrink values; a quantized value lies within the
  client's own min/max); 'unweighted' ``/ n``; 'rotation' ``sqrt(d) sum_i ||x_i||_2`` (every rotated coordinate is
  at most ``||x_i||_2``, and rotating an error back keeps its L2 norm, at most ``sqrt(d)`` times its largest
  coordinate); 'dp' ``(2 n C) / m + 2 max|result|`` (clipped values are at most ``C`` per coordinate and the noise is
  at most ``m |result| + n C``).
  """
  real = np.asarray(mask, bool)
  n = int(real.sum())
  w = np.where(real, np.asarray(weights, np.float64), 0.0)
  scales = {}
  for name, v in values.items():
    v = np.asarray(v, np.float64).reshape(v.shape[0], -1)
    magnitude = np.where(real, np.max(np.abs(np.nan_to_num(v, nan=0, posinf=0, neginf=0)), axis=1), 0.0)
    if case.scale == "sum":
      scales[name] = magnitude.sum()
    elif case.scale == "weighted":
      scales[name] = (w * magnitude).sum() / w.sum() if w.sum() > 0 else 0.0
    elif case.scale == "unweighted":
      scales[name] = magnitude.sum() / max(n, 1)
    elif case.scale == "rotation":
      norms = np.where(real, np.linalg.norm(np.nan_to_num(v, nan=0, posinf=0, neginf=0), axis=1), 0.0)
      scales[name] = math.sqrt(2 ** math.ceil(math.log2(v.shape[1]))) * norms.sum()
    elif case.scale == "dp":
      leaf = np.asarray(result[name], np.float64)
      scales[name] = 2 * n * DP_CLIP / DP_CLIENTS + 2 * np.max(np.abs(leaf), initial=0.0)
    else:
      scales[name] = 0.0
  return scales


def atol_of(num_terms: int, scale: float, dtype, ulps: float) -> float:
  """``float_atol`` for any float dtype (bfloat16 too): ``ulps * num_terms * eps(dtype) * scale``."""
  ratio = float(jnp.finfo(dtype).eps) / float(np.finfo(np.float32).eps)
  return float_atol(num_terms, scale * ratio, dtype=np.float32, ulps=ulps)


def assert_reordered_equal(case: Case, actual: dict, desired: dict, values: dict, weights, mask, slots: int):
  """Equal bit for bit for 'exact' aggregators, else to the rounding of a ``slots``-term sum in another order."""
  scales = _scales(case, values, weights, mask, desired)
  ulps = 2.0 * (math.log2(8) + 2) if case.scale == "rotation" else 2.0
  for name in desired:
    a, d = _host(actual[name]), _host(desired[name])
    if case.scale == "exact":
      np.testing.assert_array_equal(a, d, err_msg=f"{case.name} leaf {name}")
    else:
      atol = atol_of(slots + 2, scales[name], np.asarray(desired[name]).dtype, ulps)
      np.testing.assert_allclose(a.astype(np.float64), d.astype(np.float64), rtol=0, atol=atol,
                                 err_msg=f"{case.name} leaf {name}")


def shape_params(cases, all_shapes: bool = True):
  return [pytest.param(case, shape, id=f"{case.name}-{shape}")
          for case in cases for shape in (case.shapes if all_shapes else case.shapes[:1])]


def _host(x) -> np.ndarray:
  """A NumPy array; bfloat16 widened to float32 (exactly) so that NumPy compares NaNs as equal."""
  x = np.asarray(x)
  return x.astype(np.float32) if x.dtype == BF16 else x


def _tree_equal(a, b) -> None:
  """Equal bit for bit (NaN equal to NaN), leaf by leaf."""
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_array_equal(_host(x), _host(y), err_msg=jax.tree_util.keystr(path))


def _measurement(measurements, path):
  for key in path:
    measurements = measurements[key]
  return measurements


# ---------------------------------------------------------------------------------------------------------------
# Properties.


@pytest.mark.parametrize("case, shape", shape_params(CASES))
@_settings(EXAMPLES["padding"])
@given(data=st.data())
def test_padding_slots_change_nothing(case, shape, data):
  """Garbage (NaN, +-Inf, 1e30) in padding slots gives bit for bit the output of zeros there: result, state and
  measurements."""
  round_ = data.draw(rounds(shape, case.min_real))
  fill = data.draw(st.sampled_from(garbage_of(shape)))
  clean = run(case, shape, with_padding(round_, 0), round_.weights, round_.mask)
  dirty = run(case, shape, with_padding(round_, fill), round_.weights, round_.mask)
  _tree_equal(dirty, clean)


@pytest.mark.parametrize("case, shape", shape_params([c for c in CASES if c.permutation]))
@_settings(EXAMPLES["permutation"])
@given(data=st.data())
def test_client_order_does_not_matter(case, shape, data):
  """Permuting the client axis (values, weights and mask together) changes the result at most by the rounding of
  the reordered sum; bit for bit for exact aggregators."""
  round_ = data.draw(rounds(shape, case.min_real))
  permutation = np.asarray(data.draw(st.permutations(range(SHAPES[shape].slots))))
  values = round_.values
  original = run(case, shape, values, round_.weights, round_.mask)
  permuted = run(case, shape, {k: v[permutation] for k, v in values.items()}, round_.weights[permutation],
                 round_.mask[permutation])
  assert_reordered_equal(case, permuted.result, original.result, values, round_.weights, round_.mask,
                         SHAPES[shape].slots)


# A mesh, even of one device, runs the clients in by-size order (another summation order).
STREAM_RUNNERS = [Runner("sequential"), Runner("sequential", mesh=client_mesh(1)), Runner("vmap"),
                  Runner("chunked", chunk_size=4)]


HOST_LOOP_CASES = ("mean", "zeroing", "secure_sum_float", "secure_modular_sum")  # the loop is slow: a few only


@pytest.mark.parametrize("case, shape", shape_params(STREAMABLE, all_shapes=False))
@_settings(EXAMPLES["streaming"])
@given(data=st.data())
def test_streaming_equals_stacked(case, shape, data):
  """``parts`` summed by ``run_clients`` (one runner strategy per aggregator, rotating through sequential on one
  device and on a mesh, vmap and chunked) equals ``next``, and so does the host loop of
  ``tests/aggregators/helpers.py`` (for ``HOST_LOOP_CASES``): bit for bit for exact aggregators, else to the
  rounding of the reordered sum."""
  runner = STREAM_RUNNERS[STREAMABLE.index(case) % len(STREAM_RUNNERS)]
  round_ = data.draw(rounds(shape, case.min_real))
  stacked = run(case, shape, round_.values, round_.weights, round_.mask, seed=3)
  streamed = compiled_streaming(case, runner)(initial_state(case, shape), round_.values,
                                              jnp.asarray(round_.weights), jax.random.key(3), jnp.asarray(round_.mask))
  assert_reordered_equal(case, streamed.result, stacked.result, round_.values, round_.weights, round_.mask,
                         SHAPES[shape].slots)
  if case.scale == "exact":
    _tree_equal(streamed.measurements, stacked.measurements)
  if case.name not in HOST_LOOP_CASES:
    return
  # The client-by-client reference of tests/aggregators/helpers.py (a host loop, in slot order) agrees too.
  looped = run_streaming(aggregator_of(case), initial_state(case, shape), round_.values, round_.weights,
                         jax.random.key(3), round_.mask)
  assert_reordered_equal(case, looped.result, stacked.result, round_.values, round_.weights, round_.mask,
                         SHAPES[shape].slots)


LINEAR = ["sum_aggregator", "mean", "unweighted_mean", "hadamard_rotation"]


@pytest.mark.parametrize("name", LINEAR)
@_settings(EXAMPLES["linearity"])
@given(data=st.data())
def test_linearity(name, data):
  """``A(a x + b y) = a A(x) + b A(y)`` (same weights and mask) to the rounding of the three sums."""
  case, shape = BY_NAME[name], "two_f32"
  x = data.draw(rounds(shape, garbage=False))
  y = data.draw(rounds(shape, garbage=False))
  a, b = data.draw(st.sampled_from([-2.0, -0.5, 0.5, 1.0, 3.0])), data.draw(st.sampled_from([-1.0, 0.25, 2.0]))
  mixed = {k: (a * x.values[k] + b * y.values[k]).astype(np.float32) for k in x.values}
  weights, mask = x.weights, x.mask
  if case.scale == "weighted" and np.sum(weights[mask]) == 0:
    weights = np.ones_like(weights)
  out = run(case, shape, mixed, weights, mask).result
  out_x = run(case, shape, x.values, weights, mask).result
  out_y = run(case, shape, y.values, weights, mask).result
  scale_x = _scales(case, x.values, weights, mask, out_x)
  scale_y = _scales(case, y.values, weights, mask, out_y)
  ulps = 2.0 * (math.log2(8) + 2) if case.scale == "rotation" else 2.0
  for k in out:
    expected = a * np.asarray(out_x[k], np.float64) + b * np.asarray(out_y[k], np.float64)
    # Three sums of n terms, plus one rounding of each a x + b y term: (n + 3) terms at |a| S_x + |b| S_y.
    atol = atol_of(SHAPES[shape].slots + 3, 2 * (abs(a) * scale_x[k] + abs(b) * scale_y[k]), np.float32, ulps)
    np.testing.assert_allclose(np.asarray(out[k], np.float64), expected, rtol=0, atol=atol, err_msg=k)


def _zeroed(round_: Round) -> dict:
  """The round's values with every faulty real client's value replaced by zeros (all of its leaves)."""
  bad = faulty_slots(round_)
  values = {name: v.copy() for name, v in round_.values.items()}
  for name in values:
    values[name][bad] = 0
  return values


@pytest.mark.parametrize("case, shape", shape_params([c for c in FLOAT_CASES if c.nan_rule]))
@_settings(EXAMPLES["faults"])
@given(data=st.data())
def test_non_finite_client_never_becomes_a_silent_finite_value(case, shape, data):
  """NaN/Inf injected into 1-3 real clients: the rule of each aggregator's docstring, exactly.

  propagate: each coordinate where a real client is non-finite is non-finite in the result (weight 0 included:
    ``0 * NaN`` is NaN). propagate_leaf: the leaf of a non-finite coordinate has a non-finite value (a rotation or
    a per-leaf quantization grid spreads it). zero: the result is bit for bit the result with the faulty clients'
    values replaced by zeros, and the count measurement counts them on top. reject: the result is bit for bit the
    result with the faulty clients masked out, and ``secure_non_finite_count`` counts them. nan_coordinate: a NaN
    coordinate of a real client is NaN in the result. krum: with enough finite clients no faulty one is selected
    (the result is finite).
  """
  round_ = data.draw(rounds(shape, case.min_real, faults=True))
  out = run(case, shape, round_.values, round_.weights, round_.mask)
  bad = faulty_slots(round_)
  assert bad.any()
  rule = case.nan_rule
  if rule in ("propagate", "propagate_leaf", "nan_coordinate"):
    taking_part = participants(case, round_)
    for slot, name, coordinate, value in round_.faults:
      if rule == "nan_coordinate" and not np.isnan(value):
        continue  # +-Inf are ordered like any value by the median and the trimmed mean
      if not taking_part[slot]:
        continue  # a weight-0 client of a stacked statistic has no vote
      leaf = np.asarray(out.result[name], np.float32).reshape(-1)
      if rule == "propagate_leaf":
        assert not np.all(np.isfinite(leaf)), (name, round_.faults)
      elif rule == "nan_coordinate":
        assert np.isnan(leaf[coordinate]), (name, coordinate, round_.faults)
      else:
        assert not np.isfinite(leaf[coordinate]), (name, coordinate, round_.faults)
  elif rule == "zero":
    reference = run(case, shape, _zeroed(round_), round_.weights, round_.mask)
    _tree_equal(out.result, reference.result)
    if case.count_key is not None:
      counted = int(_measurement(out.measurements, case.count_key))
      assert counted == int(_measurement(reference.measurements, case.count_key)) + int(bad.sum())
  elif rule == "reject":
    reference = run(case, shape, round_.values, round_.weights, round_.mask & ~bad)
    _tree_equal(out.result, reference.result)
    assert int(out.measurements["secure_non_finite_count"]) == int(bad.sum())
    assert int(reference.measurements["secure_non_finite_count"]) == 0
  elif rule == "krum":
    finite_real = int((participants(case, round_) & ~bad).sum())
    slots = SHAPES[shape].slots
    if finite_real >= 5 and finite_real >= slots - 1:  # n >= 2f + 3 finite clients, each with n - f - 2 neighbours
      for leaf in jax.tree.leaves(out.result):
        assert np.all(np.isfinite(np.asarray(leaf))), round_.faults
  else:
    raise AssertionError(rule)


@pytest.mark.parametrize("name", [c.name for c in CASES if c.stateful])
@_settings(EXAMPLES["state_finite"])
@given(data=st.data())
def test_state_stays_finite_over_rounds_with_faults(name, data):
  """Three chained rounds, each with NaN/Inf clients and garbage padding: every float leaf of the state stays
  finite (adaptive thresholds, quantile estimates, noise state, round counters)."""
  case, shape = BY_NAME[name], "two_f32"
  state = initial_state(case, shape)
  for round_index in range(3):
    round_ = data.draw(rounds(shape, case.min_real, faults=True))
    state = run(case, shape, round_.values, round_.weights, round_.mask, state=state, seed=round_index).state
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
      leaf = np.asarray(leaf)
      if np.issubdtype(leaf.dtype, np.inexact):
        assert np.all(np.isfinite(leaf)), (jax.tree_util.keystr(path), round_index)


@_settings(EXAMPLES["measurements"])
@given(data=st.data())
def test_zeroing_and_clipping_counts(data):
  """``zeroed_count`` = real clients with L-inf norm > c or non-finite (exact: the max is exact); ``clipped_count``
  = real clients with L2 norm > c or non-finite, exactly for norms away from c by more than the float32 rounding
  of the norm (``(d + 2) eps``), and between the two counts for the others."""
  shape = "two_f32"
  round_ = data.draw(rounds(shape, faults=data.draw(st.booleans())))
  bad = faulty_slots(round_)
  flat = np.concatenate([np.asarray(v, np.float64).reshape(v.shape[0], -1) for v in round_.values.values()], 1)
  with np.errstate(invalid="ignore"):
    linf, l2 = np.max(np.abs(flat), axis=1), np.linalg.norm(flat, axis=1)
  zeroed = run(BY_NAME["zeroing"], shape, round_.values, round_.weights, round_.mask).measurements
  assert int(zeroed["zeroed_count"]) == int(np.sum(round_.mask & (bad | (linf > ZEROING_NORM))))
  clipped = run(BY_NAME["clipping"], shape, round_.values, round_.weights, round_.mask).measurements
  slack = (flat.shape[1] + 2) * np.finfo(np.float32).eps * CLIPPING_NORM
  surely = np.sum(round_.mask & (bad | (l2 > CLIPPING_NORM + slack)))
  maybe = np.sum(round_.mask & (bad | (l2 > CLIPPING_NORM - slack)))
  assert surely <= int(clipped["clipped_count"]) <= maybe


@_settings(EXAMPLES["measurements"])
@given(data=st.data())
def test_robust_statistics_and_krum_measurements(data):
  """``trimmed_per_side = floor(0.2 n)``; Krum's ``num_real_clients = n`` and ``num_selected`` = 1 (Krum) or
  ``n - f`` (multi-Krum) when ``n >= 2f + 3``, else 0 (the round gives NaN); the Krum result is one real client's
  value, bit for bit."""
  shape = "two_f32"
  round_ = data.draw(rounds(shape))
  n = int(participants(BY_NAME["krum"], round_).sum())  # real clients with a positive weight
  trimmed = run(BY_NAME["trimmed_mean"], shape, round_.values, round_.weights, round_.mask).measurements
  assert int(trimmed["trimmed_per_side"]) == math.floor(0.2 * n)
  out = run(BY_NAME["krum"], shape, round_.values, round_.weights, round_.mask)
  assert int(out.measurements["num_real_clients"]) == n
  enough = n >= 5  # n >= 2f + 3 real clients, f = 1; otherwise the round does not qualify (NaN, none selected)
  assert int(out.measurements["num_selected"]) == (1 if enough else 0)
  if n >= 5:
    matches = [slot for slot in np.flatnonzero(participants(BY_NAME["krum"], round_))
               if all(np.array_equal(np.asarray(out.result[k]), round_.values[k][slot]) for k in out.result)]
    assert matches, "Krum's result is not any real client's value"
  multi = run(BY_NAME["multi_krum"], shape, round_.values, round_.weights, round_.mask).measurements
  assert int(multi["num_real_clients"]) == n
  assert int(multi["num_selected"]) == (n - 1 if enough else 0)


@_settings(EXAMPLES["measurements"])
@given(data=st.data())
def test_debug_measurements_match_numpy(data):
  """``average_client_norm = sum w n / sum w`` and ``server_update_max/min`` of the result, against float64 NumPy
  to the rounding of an (n + d)-term float32 computation."""
  shape = "two_f32"
  round_ = data.draw(rounds(shape))
  out = run(BY_NAME["add_debug_measurements"], shape, round_.values, round_.weights, round_.mask)
  real = round_.mask
  w = np.where(real, round_.weights.astype(np.float64), 0.0)
  flat = np.concatenate([np.asarray(v, np.float64).reshape(v.shape[0], -1) for v in round_.values.values()], 1)
  norms = np.where(real, np.linalg.norm(np.where(real[:, None], flat, 0.0), axis=1), 0.0)
  expected = (w * norms).sum() / w.sum() if w.sum() > 0 else 0.0
  terms = len(real) + flat.shape[1]
  assert float(out.measurements["average_client_norm"]) == pytest.approx(
      expected, abs=float_atol(terms, 2 * (w * norms).sum() / max(w.sum(), 1e-30) if w.sum() > 0 else 0.0))
  result = np.concatenate([np.asarray(v, np.float32).reshape(-1) for v in out.result.values()])
  if np.all(np.isfinite(result)):
    assert float(out.measurements["server_update_max"]) == result.max()
    assert float(out.measurements["server_update_min"]) == result.min()


# ---------------------------------------------------------------------------------------------------------------
# Secure sums: exact modulo the group size.

INT32 = np.iinfo(np.int32)
SECURE_BOUNDS = [(1, 0, None), (7, -7, 3), (2**16 - 1, 0, 12), (2**27, -(2**27), None), (2**20 + 5, 5, 17)]


def _secure_int_case(upper, lower, bits):
  return _cached(("secure_int", upper, lower, bits), lambda: (
      agg.secure_sum(upper, lower, modulus_bits=bits),
      jax.jit(agg.secure_sum(upper, lower, modulus_bits=bits).next)))


@pytest.mark.parametrize("upper, lower, bits", SECURE_BOUNDS, ids=[f"U{u}_L{l}_B{b}" for u, l, b in SECURE_BOUNDS])
@_settings(EXAMPLES["secure_int_exact"])
@given(data=st.data())
def test_secure_sum_int_is_exact_modulo_the_group(upper, lower, bits, data):
  """INT mode: ``result = (sum_real (clip(x, L, U) - L)) mod 2^B + n L`` exactly, with ``B`` the user's
  ``modulus_bits`` (wrap-around) or the default that holds the sum (then the plain clipped sum); values drawn at
  the bounds, just beyond them and at the int32 extremes; the clipped counts count the clients beyond a bound."""
  slots = 6
  at_bounds = st.sampled_from([lower, upper, lower - 1, upper + 1, INT32.min, INT32.max, 0])
  within = st.integers(lower, upper)
  values = data.draw(hnp.arrays(np.int64, (slots, 4), elements=st.one_of(at_bounds, within)))
  values = np.clip(values, INT32.min, INT32.max).astype(np.int32)
  mask = np.asarray(data.draw(st.lists(st.booleans(), min_size=slots, max_size=slots)), bool)
  aggregator, next_fn = _secure_int_case(upper, lower, bits)
  out = next_fn(aggregator.init(jnp.zeros((4,), jnp.int32)), jnp.asarray(values), jnp.ones(slots), jax.random.key(0),
                jnp.asarray(mask))
  real = values[mask].astype(object)
  n = int(mask.sum())
  shifted = [sum(int(min(max(int(x), lower), upper)) - lower for x in real[:, j]) for j in range(4)]
  modulus = 2**bits if bits is not None else None
  expected = [(s % modulus if modulus else s) + n * lower for s in shifted]
  np.testing.assert_array_equal(np.asarray(out.result).astype(object), np.asarray(expected, object))
  assert int(out.measurements["secure_upper_clipped_count"]) == int(np.sum(np.max(values[mask], 1, initial=INT32.min)
                                                                            > upper))
  assert int(out.measurements["secure_lower_clipped_count"]) == int(np.sum(np.min(values[mask], 1, initial=INT32.max)
                                                                            < lower))
  assert int(out.measurements["secure_non_finite_count"]) == 0


MODULAR = [(2, False), (1000, True), (2**16 + 1, False), (2**31, False), (2**31, True)]


@pytest.mark.parametrize("modulus, symmetric", MODULAR, ids=[f"M{m}_{'sym' if s else 'pos'}" for m, s in MODULAR])
@_settings(EXAMPLES["secure_modular_exact"])
@given(data=st.data())
def test_secure_modular_sum_is_exact(modulus, symmetric, data):
  """``(sum_real x_i) mod M`` in ``[0, M - 1]``, or mod ``2M - 1`` mapped to ``[-(M - 1), M - 1]``, exactly, for
  any int32 inputs (the int32 extremes included)."""
  slots = 6
  low = -(modulus - 1) if symmetric else 0
  if low < INT32.min or modulus - 1 > INT32.max:
    pytest.skip("range does not fit int32")
  elements = st.one_of(st.sampled_from([INT32.min, INT32.max, 0, modulus - 1, modulus, -modulus]).filter(
      lambda v: INT32.min <= v <= INT32.max), st.integers(INT32.min, INT32.max))
  values = data.draw(hnp.arrays(np.int32, (slots, 3), elements=elements))
  mask = np.asarray(data.draw(st.lists(st.booleans(), min_size=slots, max_size=slots)), bool)
  aggregator, next_fn = _cached(("modular", modulus, symmetric), lambda: (
      agg.secure_modular_sum(modulus, symmetric_range=symmetric),
      jax.jit(agg.secure_modular_sum(modulus, symmetric_range=symmetric).next)))
  out = next_fn(aggregator.init(jnp.zeros((3,), jnp.int32)), jnp.asarray(values), jnp.ones(slots), jax.random.key(0),
                jnp.asarray(mask))
  group = 2 * modulus - 1 if symmetric else modulus
  expected = []
  for j in range(3):
    residue = sum(int(x) for x in values[mask, j]) % group
    expected.append(residue - group if symmetric and residue >= modulus else residue)
  np.testing.assert_array_equal(np.asarray(out.result).astype(object), np.asarray(expected, object))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_no_64_bit_value_leaves_an_aggregator(case):
  """State, result, measurements and ONE client's contribution are arrays of at most 32 bits, for every shape class
  (static shapes only: nothing is compiled)."""
  aggregator = aggregator_of(case)
  for shape in case.shapes:
    shape_class = SHAPES[shape]
    template = shape_class.template()
    values = jax.tree.map(lambda leaf: jnp.zeros((shape_class.slots,) + leaf.shape, leaf.dtype), template)
    output = jax.eval_shape(aggregator.next, initial_state(case, shape), values, jnp.ones(shape_class.slots),
                            jax.random.key(0))
    for leaf in jax.tree.leaves((output, contribution_template(aggregator, template))):
      assert np.dtype(leaf.dtype).itemsize <= 4, (case.name, shape, leaf)
