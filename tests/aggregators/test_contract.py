"""The single aggregator contract: a client part, a server part, a static combine, and the static context.

What a user writing an aggregator relies on: the round template and ``next`` call the same parts; padding slots
have weight 0 in both combines (so a user's count never includes them); the server part receives the value
template and the number of client slots; the round is 32-bit outside the secure sums' x64 region (no
int64/float64 anywhere else in a traced program, none entering or leaving the region, the exact bit counts formed on
the host).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lite import aggregators
from fedjax_lite.aggregators import STACK, SUM, AggregationContext, Aggregator
from fedjax_lite.aggregators.secure import X64_REGION
from fedjax_lite.algorithms import BitCount, fed_avg
from fedjax_lite.core import pack_clients
from fedjax_lite.core.process import MeasuredOutput
from fedjax_lite.core.runner import Runner
from tests.conftest import make_population


def counting_aggregator(combine: str, seen: list) -> Aggregator:
  """Counts the clients that take part and records the context its server part receives."""

  def client(params, value, weight, rng):
    return {"value": value, "count": (weight > 0).astype(jnp.int32), "ones": jnp.ones((), jnp.int32)}

  def server(state, combined, rng, context):
    seen.append(context)
    totals = aggregators.client_total(combined, combine)
    result = jax.tree.map(lambda v: v / jnp.maximum(totals["count"], 1).astype(v.dtype), totals["value"])
    return MeasuredOutput(state, result, {"count": totals["count"], "ones": totals["ones"]})

  return Aggregator(lambda template: (), lambda state: (), client, server, combine=combine)


@pytest.mark.parametrize("combine", [SUM, STACK])
@pytest.mark.parametrize("weighting", ["num_examples", "uniform"])
def test_padding_never_counts_and_the_context_is_static(tiny_model, tiny_params, combine, weighting):
  population = make_population(num_clients=5)
  round_data = pack_clients(population, [0, 1, 2], batch_size=4, cohort_size=6)  # 3 real clients, 3 padding slots
  seen = []
  process = fed_avg(tiny_model, client_learning_rate=0.1, weighting=weighting,
                    aggregator=counting_aggregator(combine, seen))
  state, metrics, _ = jax.jit(process.next)(process.init(tiny_params), round_data, jax.random.key(0))
  assert int(metrics["aggregator"]["count"]) == 3
  # Padding contributions are dropped from a sum and zeroed in a stack: a constant 1 counts real clients only.
  assert int(metrics["aggregator"]["ones"]) == 3
  (context,) = seen
  assert context.num_client_slots == 6
  assert jax.tree.structure(context.value_template) == jax.tree.structure(tiny_params)
  for leaf, param in zip(jax.tree.leaves(context.value_template), jax.tree.leaves(tiny_params)):
    assert leaf.shape == param.shape and leaf.dtype == param.dtype


@pytest.mark.parametrize("combine", [SUM, STACK])
def test_next_and_the_round_use_the_same_parts(combine):
  seen = []
  aggregator = counting_aggregator(combine, seen)
  values = {"w": jnp.arange(8.0).reshape(4, 2)}
  mask = jnp.array([True, False, True, True])
  output = jax.jit(aggregator.next)((), values, jnp.ones(4), jax.random.key(1), mask)
  np.testing.assert_allclose(output.result["w"], np.asarray(values["w"])[np.asarray(mask)].mean(0), rtol=1e-6)
  assert int(output.measurements["ones"]) == 3
  assert seen[0].num_client_slots == 4 and seen[0].value_template["w"].shape == (2,)


def test_check_aggregator_names_what_is_wrong():
  with pytest.raises(TypeError, match="inner must be an Aggregator, got int"):
    aggregators.zeroing(1.0, 3)
  with pytest.raises(ValueError, match="value_sum must be a sum-combined aggregator"):
    aggregators.mean(value_sum=aggregators.coordinate_median())
  bad = aggregators.sum_aggregator()._replace(combine="concat")
  with pytest.raises(ValueError, match="combine must be one of"):
    bad.next((), jnp.ones((2, 1)), jnp.ones(2), jax.random.key(0))


def test_bit_counts_are_exact_beyond_int32():
  bits = BitCount(jnp.asarray(10, jnp.int32), 3 * 2**30)  # 32,212,254,720 bits: overflows int32 and float32
  assert int(bits) == 10 * 3 * 2**30
  assert np.asarray(bits).dtype == np.int64 and int(np.asarray(bits)) == 10 * 3 * 2**30
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), bits, BitCount(jnp.asarray(2, jnp.int32), 3 * 2**30))
  np.testing.assert_array_equal(np.asarray(stacked), [10 * 3 * 2**30, 2 * 3 * 2**30])


ROUND_AGGREGATORS = {
    "mean": aggregators.mean,
    "secure": aggregators.secure_aggregator,
    "compression": aggregators.compression_aggregator,
    "median": aggregators.coordinate_median,
}


WIDE_DTYPES = {"int64", "uint64", "float64", "complex128"}


def wide_values(jaxpr) -> tuple[set, int]:
  """``(64-bit dtypes found outside the x64 regions, number of regions)`` of a jaxpr, sub-jaxprs included; a
  region's own inputs and outputs count as outside."""
  found, regions = set(), 0
  for eqn in jaxpr.eqns:
    found.update(str(v.aval.dtype) for v in [*eqn.invars, *eqn.outvars] if hasattr(v.aval, "dtype"))
    if eqn.params.get("name") == X64_REGION:
      regions += 1
      continue
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      sub_found, sub_regions = wide_values(sub)
      found |= sub_found
      regions += sub_regions
  return found & WIDE_DTYPES, regions


@pytest.mark.parametrize("name", sorted(ROUND_AGGREGATORS))
def test_rounds_are_32_bit_outside_the_x64_region(tiny_model, tiny_params, name):
  """No int64/uint64/float64 in a round's program except inside the secure sums' x64 regions (nested jits named
  ``secure_sum_x64``), whose inputs and outputs are 32-bit; and the round's state and metrics are 32-bit."""
  population = make_population(num_clients=4)
  round_data = pack_clients(population, [0, 1, 2], batch_size=4)
  process = fed_avg(tiny_model, client_learning_rate=0.1, aggregator=ROUND_AGGREGATORS[name](),
                    runner=Runner(strategy="vmap"))
  state = process.init(tiny_params)
  closed = jax.make_jaxpr(process.next)(state, round_data, jax.random.key(0))
  found, regions = wide_values(closed.jaxpr)
  assert not found, f"{name}: the round's program has {sorted(found)} values outside the x64 region"
  # The secure preset's secure sums (value, weight, two counts, three estimators' records) each have a client
  # region and a server region; the other presets have none.
  assert (regions > 0) == (name == "secure"), regions
  for leaf in jax.tree.leaves(jax.eval_shape(process.next, state, round_data, jax.random.key(0))):
    assert np.dtype(leaf.dtype).itemsize <= 4 or jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key), leaf
