"""The wrapping helper: an inner part's keys, template and upload bits, and what a wrapper inherits from its inner
aggregator."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lite import aggregators
from fedjax_lite.aggregators import STACK, Aggregator, EstimationProcess, Inner, total_upload_bits, wrapper
from fedjax_lite.aggregators.base import AggregationContext
from fedjax_lite.core.process import MeasuredOutput

KEY = jax.random.key(7)
VALUE = {"w": jnp.ones((3,), jnp.float32)}
CONTEXT = AggregationContext(jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), VALUE), 5)


def recording_aggregator(seen: dict) -> Aggregator:
  """Returns the key its client gets; records what init and server get."""

  def init(template):
    seen["init"] = template
    return ()

  def server(state, combined, rng, context):
    seen["server_key"], seen["context"] = jax.random.key_data(rng), context
    return MeasuredOutput(state, combined, ())

  return Aggregator(init, lambda state: (), lambda params, value, weight, rng: jax.random.key_data(rng), server,
                    upload_bits=lambda template: 10 * len(jax.tree.leaves(template)))


def key_data(key):
  return np.asarray(jax.random.key_data(key))


@pytest.mark.parametrize("key", [None, 0, 3])
def test_a_part_draws_the_same_folded_key_on_the_client_and_the_server(key):
  seen = {}
  part = Inner(recording_aggregator(seen), key=key)
  expected = key_data(KEY if key is None else jax.random.fold_in(KEY, key))
  np.testing.assert_array_equal(part.client((), VALUE, 1.0, KEY), expected)
  part.server((), VALUE, KEY, CONTEXT)
  np.testing.assert_array_equal(seen["server_key"], expected)


def test_a_part_sees_its_own_template_in_init_server_and_upload_bits():
  count_template = jax.ShapeDtypeStruct((), jnp.int32)
  for template, expected in [(None, CONTEXT.value_template), (count_template, count_template),
                             (lambda t: {"twice": t, "again": t}, {"twice": CONTEXT.value_template,
                                                                   "again": CONTEXT.value_template})]:
    seen = {}
    part = Inner(recording_aggregator(seen), template=template)
    part.init(CONTEXT.value_template)
    part.server((), VALUE, KEY, CONTEXT)
    assert seen["init"] == expected and seen["context"].value_template == expected
    assert seen["context"].num_client_slots == 5
    assert part.upload_bits(CONTEXT.value_template) == 10 * len(jax.tree.leaves(expected))


def test_an_estimation_process_part():
  seen = {}
  process = EstimationProcess(
      init=lambda: jnp.zeros(()),
      report=lambda state: state,
      broadcast=lambda state: state + 1.0,
      client=lambda params, x, rng: jax.random.key_data(rng),
      server=lambda state, records, rng, context: seen.setdefault("context", context) and state,
      upload_bits=33,
  )
  part = Inner(process, key=2)
  assert float(part.init()) == 0.0 and float(part.broadcast(jnp.zeros(()))) == 1.0
  np.testing.assert_array_equal(part.client(0.0, 1.5, KEY), key_data(jax.random.fold_in(KEY, 2)))
  part.server(jnp.zeros(()), (), KEY, CONTEXT)
  assert seen["context"] is CONTEXT  # an estimator's server sees the wrapper's context
  assert part.upload_bits(CONTEXT.value_template) == 33


def test_total_upload_bits_adds_the_wrapper_own_bits():
  parts = (Inner(aggregators.sum_aggregator()), Inner(aggregators.sum_aggregator(), template=jax.ShapeDtypeStruct(
      (), jnp.int32)))
  assert total_upload_bits(parts)(VALUE) == 3 * 32 + 32
  assert total_upload_bits(parts, own_bits=5)(VALUE) == 3 * 32 + 32 + 5
  assert total_upload_bits(parts, own_bits=lambda t: 2 * t["w"].shape[0])(VALUE) == 3 * 32 + 32 + 6


def test_a_wrapper_inherits_combine_privacy_event_state_and_parameters():
  inner = Inner(aggregators.coordinate_median())
  wrapped = wrapper(inner, inner.client, inner.server)
  assert wrapped.combine == STACK and wrapped.init == inner.init and wrapped.broadcast == inner.broadcast
  assert wrapped.upload_bits(VALUE) == 3 * 32
  dp = aggregators.gaussian_fixed(1.0, 10.0, 1.0)
  assert wrapper(Inner(dp), dp.client, dp.server).dp_event() == dp.dp_event()


def test_bad_arguments_name_what_is_wrong():
  with pytest.raises(TypeError, match="part must be an Aggregator or an EstimationProcess, got int"):
    Inner(3)
  with pytest.raises(ValueError, match="key"):
    Inner(aggregators.sum_aggregator(), key=-1)
  with pytest.raises(TypeError, match="key"):
    Inner(aggregators.sum_aggregator(), key=1.5)
  estimator = Inner(aggregators.constant_estimate(1.0))
  with pytest.raises(TypeError, match="inner must be an Inner holding an Aggregator"):
    wrapper(estimator, lambda *args: (), lambda *args: ())
  with pytest.raises(TypeError, match="inner must be an Inner"):
    wrapper(aggregators.mean(), lambda *args: (), lambda *args: ())
  with pytest.raises(TypeError, match="server must be a function"):
    wrapper(Inner(aggregators.mean()), lambda *args: (), None)
  with pytest.raises(TypeError, match="parts must be Inner records"):
    total_upload_bits([aggregators.sum_aggregator()])
