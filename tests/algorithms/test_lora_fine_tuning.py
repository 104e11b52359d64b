"""``algorithms.lora_fine_tuning``: FedAvg on the adapters with a frozen, shared base.

Checked against an independent formulation: FedAvg on the WHOLE model with the frozen parameters masked by optax's
own partitioning (``core.partition_optimizer``: a zero update) trains the same adapters -- same loss, same gradients
with respect to the adapters, same weighted mean -- so both rounds give the same adapters up to rounding, while the
base stays bit-identical in both. The exact bits: the upload is the adapters' size (plus the weight the mean
aggregator sends), never the base.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lite import aggregators, algorithms, core, datasets, models
from fedjax_lite.aggregators.base import as_template, client_upload_bits
from tests.tolerances import assert_trees_close_to_rounding

LEARNING_RATE = 0.05


@pytest.fixture(scope="module")
def setup():
  corpus = datasets.grammar_corpus(num_clients=4, examples_per_client=10, sequence_length=6, shift=0.5, seed=1)
  model = models.transformer_lm(vocab_size=len(corpus.vocabulary), sequence_length=6, num_layers=1, num_heads=2,
                                width=16, lora_rank=2)
  params = model.init(jax.random.key(0))
  # Adapters B start at zero; move them so that the base's gradient path through B is exercised too.
  params = jax.tree_util.tree_map_with_path(
      lambda path, leaf: leaf + 0.05 if core.path_names(path)[-1] == "lora_b" else leaf, params)
  labels = models.lora_labels(params)
  spec = core.ClientSpec(batch_size=3, num_epochs=1)
  num_steps = spec.max_num_steps(corpus.train)
  rounds = [spec.pack(corpus.train, cohort, seed=0, round_num=r, num_steps=num_steps, cohort_size=4)
            for r, cohort in enumerate(([0, 1, 2], [3, 1]))]  # ragged clients; a padding slot in round 1
  return model, params, labels, rounds


def bits_view(tree):
  return [np.asarray(leaf).view(np.uint32) for leaf in jax.tree.leaves(tree)]


def run(process, params, rounds):
  state, step, all_metrics = process.init(params), jax.jit(process.next), []
  for r, round_data in enumerate(rounds):
    state, metrics, _ = step(state, round_data, jax.random.key(r))
    all_metrics.append(metrics)
  return state, all_metrics


def test_lora_round_equals_fed_avg_with_the_base_masked_and_keeps_the_base_bit_identical(setup):
  model, params, labels, rounds = setup
  lora = algorithms.lora_fine_tuning(model, labels, client_optimizer=optax.sgd,
                                     client_learning_rate=LEARNING_RATE)
  masked = algorithms.fed_avg(model, client_optimizer=core.partition_optimizer(labels, optax.sgd(LEARNING_RATE)))
  lora_state, lora_metrics = run(lora, params, rounds)
  masked_state, _ = run(masked, params, rounds)
  before, after = core.split_params(params, labels), core.split_params(lora_state.params, labels)
  for a, b in zip(bits_view(before["frozen"]), bits_view(after["frozen"])):
    np.testing.assert_array_equal(a, b)  # the base, bit for bit
  assert not all(np.array_equal(a, b) for a, b in zip(bits_view(before["global"]), bits_view(after["global"])))
  # Same adapters as the masked whole-model FedAvg: a few local steps of float32 sums over <= 3 * 6 tokens.
  assert_trees_close_to_rounding(after["global"], core.split_params(masked_state.params, labels)["global"],
                                 num_terms=64)
  assert int(lora_metrics[0]["client_work"]["train"]["num_examples"]) > 0
  assert int(lora_metrics[0]["finalizer"]["update_non_finite"]) == 0


def test_upload_bits_are_the_adapters_exact_size(setup):
  model, params, labels, rounds = setup
  lora = algorithms.lora_fine_tuning(model, labels, client_optimizer=optax.sgd,
                                     client_learning_rate=LEARNING_RATE)
  full = algorithms.fed_avg(model, client_optimizer=optax.sgd, client_learning_rate=LEARNING_RATE)
  _, lora_metrics = run(lora, params, rounds[:1])
  _, full_metrics = run(full, params, rounds[:1])
  adapters = core.split_params(params, labels)["global"]
  adapter_bits = 32 * sum(leaf.size for leaf in jax.tree.leaves(adapters))
  weight_bits = 32  # the weighted mean's float32 weight per client
  assert adapter_bits == core.tree_size_bits(adapters) == 32 * core.count_params(params, labels)["global"]
  assert client_upload_bits(aggregators.mean(), as_template(adapters)) == adapter_bits + weight_bits
  clients = 3  # round 0's real clients
  assert int(lora_metrics[0]["aggregated_bits"]) == clients * (adapter_bits + weight_bits)
  hparam_bits = 32  # the round's client learning rate
  assert int(lora_metrics[0]["broadcasted_bits"]) == clients * (adapter_bits + hparam_bits)
  whole_bits = core.tree_size_bits(params)
  assert int(full_metrics[0]["aggregated_bits"]) == clients * (whole_bits + weight_bits)


def test_compressed_upload_and_broadcast_cover_the_adapters_only(setup):
  model, params, labels, rounds = setup
  lora = algorithms.lora_fine_tuning(
      model, labels, client_optimizer=optax.sgd, client_learning_rate=LEARNING_RATE,
      weighting="uniform", aggregator=aggregators.quantize_above_threshold(8, threshold=0),
      broadcast_encoder=aggregators.broadcast_encoder(8, threshold=0))
  state, metrics = run(lora, params, rounds[:1])
  adapters = as_template(core.split_params(params, labels)["global"])
  upload = client_upload_bits(aggregators.quantize_above_threshold(8, threshold=0), adapters)
  assert upload < core.tree_size_bits(adapters) / 2  # quantized: 8 bits per element and each leaf's range
  assert int(metrics[0]["aggregated_bits"]) == 3 * upload
  encoder = aggregators.broadcast_encoder(8, threshold=0)
  assert int(metrics[0]["broadcasted_bits"]) == 3 * (encoder.bits(adapters) + 32)
  for a, b in zip(bits_view(core.split_params(params, labels)["frozen"]),
                  bits_view(core.split_params(state.params, labels)["frozen"])):
    np.testing.assert_array_equal(a, b)


def test_path_function_labels_and_server_adam_keep_the_base(setup):
  model, params, _, rounds = setup
  lora = algorithms.lora_fine_tuning(model, lambda path: "global" if models.is_lora_path(path) else "frozen",
                                     client_optimizer=optax.adam, client_learning_rate=1e-2,
                                     server_optimizer=optax.adam(1e-2))
  state, metrics = run(lora, params, rounds)
  labels = models.lora_labels(params)
  for a, b in zip(bits_view(core.split_params(params, labels)["frozen"]),
                  bits_view(core.split_params(state.params, labels)["frozen"])):
    np.testing.assert_array_equal(a, b)
  # The server optimizer's state covers the adapters only.
  state_elements = sum(leaf.size for leaf in jax.tree.leaves(state.finalizer_state) if jnp.ndim(leaf) > 0)
  assert state_elements == 2 * core.count_params(params, labels)["global"]


def test_arguments_are_validated(setup):
  model, params, labels, _ = setup
  with pytest.raises(TypeError, match="unexpected keyword"):
    algorithms.lora_fine_tuning(model, labels, client_learning_rat=0.1)
  with pytest.raises(ValueError, match="unknown parameter label"):
    algorithms.lora_fine_tuning(model, jax.tree.map(lambda _: "adapter", labels), client_learning_rate=0.1)
  with pytest.raises(ValueError, match="weighting"):
    algorithms.lora_fine_tuning(model, labels, client_learning_rate=0.1, weighting="tokens")
  local = jax.tree.map(lambda label: "local" if label == "global" else label, labels)
  with pytest.raises(ValueError, match="'global'.*and 'frozen'"):
    algorithms.lora_fine_tuning(model, local, client_learning_rate=0.1)


def test_two_rounds_equal_the_numpy_re_derivation_with_a_frozen_kernel():
  """Softmax regression ``x W + b`` with ``W`` frozen and ``b`` trained (the adapters' role), ragged clients, a
  padding slot, two rounds, example-weighted: equals the float64 NumPy round written from the formulas
  (``tests/algorithms/reference_impl.py``: local SGD on ``b`` only, ``delta_i = b - b_i``, weighted mean, server
  SGD 1.0) within the family's float32 tolerance, and ``W`` keeps its bits."""
  from tests.algorithms import reference_impl as ref
  from tests.algorithms.family_setup import CLIENT_LR, assert_close_to_reference, make_setup, to_reference

  _, model, params, rounds = make_setup()
  process = algorithms.lora_fine_tuning(model, lambda path: "global" if path[-1] == "bias" else "frozen",
                                        client_learning_rate=CLIENT_LR)
  state, step = process.init(params), jax.jit(process.next)
  expected = to_reference(params)
  for r, round_data in enumerate(rounds):
    state, _, _ = step(state, round_data, jax.random.key(r))
    numpy_data = jax.tree.map(np.asarray, round_data)
    deltas, weights = [], []
    for slot in ref.client_slots(numpy_data):
      local = dict(expected)
      for t in ref.real_steps(numpy_data, slot):
        _, grad = ref.batch_loss_and_grad(local, *ref.batch(numpy_data, slot, t))
        local = {"W": local["W"], "b": local["b"] - CLIENT_LR * grad["b"]}  # W frozen: its gradient unused
      deltas.append({"b": expected["b"] - local["b"]})
      weights.append(ref.client_weight(numpy_data, slot, "num_examples"))
    expected = {"W": expected["W"], "b": expected["b"] - ref.weighted_mean(deltas, weights)["b"]}
    assert_close_to_reference(state.params, expected, what=f"round {r} params")
  assert np.max(np.abs(expected["b"] - to_reference(params)["b"])) > 100 * 1e-5  # b moved: the check is not vacuous
  np.testing.assert_array_equal(np.asarray(state.params["Dense_0"]["kernel"]).view(np.uint32),
                                np.asarray(params["Dense_0"]["kernel"]).view(np.uint32))


def test_the_vmap_runner_with_one_shared_base_gives_the_same_round(setup):
  """Under ``Runner('vmap')`` every client of the round trains at once on the ONE broadcast base (no per-client copy:
  ``tests/benchmarks/test_lora_memory_smoke.py``); the round equals the default runner's to rounding."""
  model, params, labels, rounds = setup
  results = []
  for runner in (None, core.Runner(strategy="vmap")):
    process = algorithms.lora_fine_tuning(model, labels, client_optimizer=optax.sgd,
                                          client_learning_rate=LEARNING_RATE, runner=runner)
    state, _ = run(process, params, rounds[:1])
    results.append(core.split_params(state.params, labels))
  assert_trees_close_to_rounding(results[1]["global"], results[0]["global"], num_terms=64)
  for a, b in zip(bits_view(results[0]["frozen"]), bits_view(results[1]["frozen"])):
    np.testing.assert_array_equal(a, b)
