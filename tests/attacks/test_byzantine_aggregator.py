"""The attacking aggregator wrapper: exact on stacked values, and with fed_avg end to end."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_lite
from fedjax_lite.aggregators import client_upload_bits, coordinate_median, gaussian_fixed, mean, sum_aggregator
from fedjax_lite.attacks import byzantine_aggregator, choose_malicious, label_flip, scaling, sign_flip
from fedjax_lite.attacks import with_data_poisoning
from fedjax_lite.core.packing import pack_clients

VALUES = {"x": np.arange(10, dtype=np.float32).reshape(5, 2) + 1.0}
MASK = np.array([True, True, True, True, False])


def test_corrupts_the_chosen_clients_then_calls_the_inner_aggregator():
  aggregator = byzantine_aggregator(sum_aggregator(), scaling(-2.0), fraction=0.5, seed=7)
  state = aggregator.init({"x": jnp.zeros(2)})
  run = jax.jit(aggregator.next)
  for round_num in range(3):
    output = run(state, VALUES, jnp.ones(5), jax.random.key(round_num), MASK)
    malicious = np.asarray(choose_malicious(7, round_num, MASK, 0.5))
    assert malicious.sum() == 2
    factor = np.where(malicious, -2.0, 1.0)[:, None]
    np.testing.assert_array_equal(output.result["x"], (VALUES["x"] * factor)[MASK].sum(0))  # exact small integers
    assert int(output.measurements["num_malicious_clients"]) == 2
    assert output.measurements["inner"] == ()
    assert int(output.state["round_num"]) == round_num + 1
    state = output.state


def test_no_attackers_leaves_the_inner_result_unchanged():
  inner = gaussian_fixed(0.5, 4.0, 1.0)
  aggregator = byzantine_aggregator(inner, sign_flip(), fraction=0.1)  # floor(0.1 * 4) = 0 attackers
  template = {"x": jnp.zeros(2)}
  clean = jax.jit(inner.next)(inner.init(template), VALUES, jnp.ones(5), jax.random.key(3), MASK)
  attacked = jax.jit(aggregator.next)(aggregator.init(template), VALUES, jnp.ones(5), jax.random.key(3), MASK)
  np.testing.assert_array_equal(attacked.result["x"], clean.result["x"])  # same key for the inner noise
  assert attacked.measurements["num_malicious_clients"] == 0
  assert aggregator.dp_event() == inner.dp_event()
  assert client_upload_bits(aggregator, template) == client_upload_bits(inner, template)
  assert aggregator.combine == "stack"


def test_argument_checks():
  with pytest.raises(TypeError, match="inner"):
    byzantine_aggregator(None, sign_flip(), fraction=0.1)
  with pytest.raises(TypeError, match="attack"):
    byzantine_aggregator(mean(), lambda *a: a, fraction=0.1)
  with pytest.raises(ValueError, match="fraction"):
    byzantine_aggregator(mean(), sign_flip(), fraction=1.0)
  with pytest.raises(TypeError, match="process"):
    with_data_poisoning(mean(), label_flip(4), fraction=0.1)
  no_round_num = with_data_poisoning(fedjax_lite.core.Process(init=lambda p: p, next=lambda s, d, r: (s, {})),
                                     label_flip(4), fraction=0.1)
  with pytest.raises(TypeError, match="round_num"):
    no_round_num.next({}, {"y": np.zeros((2, 1, 1), np.int32), "num_examples": np.ones(2)}, jax.random.key(0))


def test_with_fed_avg_and_label_flipping(population, tiny_model, tiny_params):
  """Both wrappers in one fed_avg round: the attackers are counted, the update is finite, a clean run differs."""
  num_steps = fedjax_lite.core.max_num_steps(population, batch_size=4)
  round_data = pack_clients(population, [0, 1, 2, 3, 5], batch_size=4, num_steps=num_steps, cohort_size=6,
                            shuffle=False)
  attacked = byzantine_aggregator(coordinate_median(), sign_flip(), fraction=0.2)
  process = with_data_poisoning(
      fedjax_lite.algorithms.fed_avg(tiny_model, client_learning_rate=0.1, aggregator=attacked),
      label_flip(4), fraction=0.2)
  state, metrics, _ = jax.jit(process.next)(process.init(tiny_params), round_data, jax.random.key(1))
  assert int(metrics["aggregator"]["num_malicious_clients"]) == 1  # floor(0.2 * 5)
  assert int(metrics["attack"]["num_malicious_clients"]) == 1
  assert int(state.round_num) == 1 and int(state.aggregator_state["round_num"]) == 1
  assert bool(fedjax_lite.core.tree_all_finite(state.params))
  assert any(float(jnp.max(jnp.abs(a - b))) > 0
             for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(tiny_params)))
