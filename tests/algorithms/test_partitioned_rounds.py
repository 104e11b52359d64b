"""Partitioned rounds (``build_round(labels=..., local_state=...)``): only global parameters travel.

Exact checks on a half-local model (20 global, 20 local parameters): the bits sent and received per client, the
aggregators' templates and the aggregate hold the global parameters only, the server's local and frozen
parameters never change, local parameters live in the client-state store, and the broadcast encoder covers the
global part only.
"""

from __future__ import annotations

import chex
import hypothesis
import jax
import numpy as np
import optax
import pytest

from fedjax_lite import aggregators, algorithms, core
from tests.tolerances import assert_trees_close_to_rounding
from tests.algorithms.partition_setup import (
    CLIENT_LR,
    COHORTS,
    NUM_CLASSES,
    NUM_FEATURES,
    HIDDEN,
    SLOTS,
    head_is_local,
    make_setup,
    run_rounds,
)

BODY_SIZE = NUM_FEATURES * HIDDEN + HIDDEN  # 20 global parameters
HEAD_SIZE = HIDDEN * NUM_CLASSES + NUM_CLASSES  # 20 local parameters


@pytest.fixture(scope="module")
def setup():
  return make_setup()


def test_a_half_local_model_counts_exactly_the_global_bits(setup):
  _, model, params, rounds = setup
  assert BODY_SIZE == HEAD_SIZE == 20
  partitioned = algorithms.fed_avg(model, client_learning_rate=CLIENT_LR, labels=head_is_local, local_state=True)
  whole = algorithms.fed_avg(model, client_learning_rate=CLIENT_LR)
  _, _, metrics = run_rounds(partitioned, params, rounds[:1])
  whole_metrics = jax.jit(whole.next)(whole.init(params), rounds[0], jax.random.key(0)).metrics
  num_clients = len(COHORTS[0])
  # Per client: the 20 global float32 parameters and the float32 learning rate down; the 20 parameters and the
  # float32 weight of the weighted mean up.
  assert int(metrics[0]["broadcasted_bits"]) == num_clients * (32 * BODY_SIZE + 32)
  assert int(metrics[0]["aggregated_bits"]) == num_clients * (32 * BODY_SIZE + 32)
  assert int(whole_metrics["broadcasted_bits"]) == num_clients * (32 * (BODY_SIZE + HEAD_SIZE) + 32)
  assert int(whole_metrics["aggregated_bits"]) == num_clients * (32 * (BODY_SIZE + HEAD_SIZE) + 32)


def test_local_parameters_never_enter_the_aggregate_and_stay_in_the_store(setup):
  _, model, params, rounds = setup
  process = algorithms.fed_avg(model, client_learning_rate=CLIENT_LR, labels=head_is_local, local_state=True)
  state = process.init(params)
  # A server optimizer's state covers the body only.
  momentum = algorithms.fed_avg(model, client_learning_rate=CLIENT_LR, labels=head_is_local, local_state=True,
                                server_optimizer=optax.sgd(1.0, momentum=0.9))
  trace = momentum.init(params).finalizer_state[0].trace
  assert jax.tree.leaves(trace["head"]) == [] and len(jax.tree.leaves(trace["body"])) == 2
  initial_heads = process.client_state(params)
  assert jax.tree.leaves(initial_heads["body"]) == []
  chex.assert_trees_all_equal(initial_heads["head"], params["head"])
  store = core.ClientStateStore(initial_heads, 6)
  gathered = store.gather(COHORTS[0], SLOTS)
  cohort = jax.jit(lambda s, d, k, c: process.parts.work(s, process.parts.distribute(s, k), d, k, c))(
      state, rounds[0], jax.random.key(0), gathered)
  assert jax.tree.leaves(cohort.aggregate.result["head"]) == []
  assert len(jax.tree.leaves(cohort.aggregate.result["body"])) == 2
  assert jax.tree.leaves(cohort.broadcast.params["head"]) == []  # what the server sends: no local parameters
  # The new local parameters went to the client states; padding slot 3 handed back what it was given.
  assert jax.tree.leaves(cohort.client_states["body"]) == []
  assert not np.allclose(cohort.client_states["head"]["kernel"][0], gathered["head"]["kernel"][0])
  np.testing.assert_array_equal(cohort.client_states["head"]["kernel"][3], gathered["head"]["kernel"][3])
  final, store, _ = run_rounds(process, params, rounds)
  # The server's head is the initial one, bit for bit, after three rounds; its body moved.
  chex.assert_trees_all_equal(final.params["head"], params["head"])
  assert not np.allclose(final.params["body"]["kernel"], params["body"]["kernel"])
  # Client 4 took part only in round 3, client 1 in round 2; client 5 never again after round 1: all differ.
  heads = store.arrays["head"]["kernel"]
  assert not np.allclose(heads[1], heads[4])


def test_frozen_parameters_are_never_trained_uploaded_or_counted(setup):
  _, model, params, rounds = setup
  labels = lambda path: "frozen" if path[0] == "body" else "global"  # noqa: E731  a base with a trained head
  process = algorithms.fed_avg(model, client_learning_rate=CLIENT_LR, labels=labels)
  assert process.client_state is None
  state = process.init(params)
  output = jax.jit(process.next)(state, rounds[0], jax.random.key(0))
  chex.assert_trees_all_equal(output.state.params["body"], params["body"])
  assert not np.allclose(output.state.params["head"]["kernel"], params["head"]["kernel"])
  assert int(output.metrics["broadcasted_bits"]) == 3 * (32 * HEAD_SIZE + 32)
  assert int(output.metrics["aggregated_bits"]) == 3 * (32 * HEAD_SIZE + 32)  # and the weight


def test_frozen_body_equals_training_the_head_alone(setup):
  """A frozen body gets optax's zero update: the round equals FedAvg of a model whose body is a constant."""
  _, model, params, rounds = setup
  labels = lambda path: "frozen" if path[0] == "body" else "global"  # noqa: E731
  process = algorithms.fed_avg(model, client_learning_rate=CLIENT_LR, labels=labels)
  partitioned = jax.jit(process.next)(process.init(params), rounds[0], jax.random.key(0)).state.params
  body = params["body"]
  head_only = core.Model(init=lambda rng: {"head": params["head"]},
                         apply=lambda p, batch, rng, train: model.apply({"body": body, "head": p["head"]}, batch,
                                                                        rng, train),
                         loss=model.loss, metrics=model.metrics)
  plain = algorithms.fed_avg(head_only, client_learning_rate=CLIENT_LR)
  expected = jax.jit(plain.next)(plain.init({"head": params["head"]}), rounds[0], jax.random.key(0)).state.params
  chex.assert_trees_all_close(partitioned["head"], expected["head"], rtol=0, atol=1e-6)


def test_the_broadcast_encoder_covers_the_global_parameters_only(setup):
  _, model, params, rounds = setup
  encoder = aggregators.broadcast_encoder(8, threshold=0)
  process = algorithms.fed_avg(model, client_learning_rate=CLIENT_LR, labels=head_is_local, local_state=True,
                               broadcast_encoder=encoder)
  state = process.init(params)
  broadcast = jax.jit(process.parts.distribute)(state, jax.random.key(0))
  assert jax.tree.leaves(broadcast.params["head"]) == []
  assert not np.array_equal(broadcast.params["body"]["kernel"], params["body"]["kernel"])  # quantized
  _, _, metrics = run_rounds(process, params, rounds[:1])
  # Two quantized body leaves: 8 bits per element and a 64-bit (min, max) each; plus the learning rate.
  assert int(metrics[0]["broadcasted_bits"]) == 3 * (8 * BODY_SIZE + 2 * 64 + 32)


def test_noise_and_compression_cover_the_global_parameters_only(setup):
  _, model, params, rounds = setup
  noisy = aggregators.gaussian_fixed(noise_multiplier=1.0, clients_per_round=3, clip=1.0)
  process = algorithms.fed_avg(model, client_learning_rate=CLIENT_LR, labels=head_is_local, local_state=True,
                               aggregator=noisy)
  final, _, _ = run_rounds(process, params, rounds[:1])
  chex.assert_trees_all_equal(final.params["head"], params["head"])
  assert not np.allclose(final.params["body"]["kernel"], params["body"]["kernel"])


def test_partition_errors_say_what_to_do(setup):
  _, model, params, rounds = setup
  with pytest.raises(ValueError, match="local_state=True needs labels"):
    algorithms.fed_avg(model, client_learning_rate=CLIENT_LR, local_state=True)
  with pytest.raises(ValueError, match="unknown parameter label"):
    algorithms.fed_avg(model, client_learning_rate=CLIENT_LR, labels={"body": "x", "head": "local"}).init(params)
  no_local = algorithms.fed_avg(model, client_learning_rate=CLIENT_LR, labels="global", local_state=True)
  with pytest.raises(ValueError, match="mark no parameter 'local'"):
    no_local.init(params)
  not_kept = algorithms.fed_avg(model, client_learning_rate=CLIENT_LR, labels=head_is_local)
  with pytest.raises(ValueError, match="local_state=True"):
    jax.jit(not_kept.next)(not_kept.init(params), rounds[0], jax.random.key(0))
  with pytest.raises(ValueError, match="client_state="):
    algorithms.build_round(lambda *a: None, aggregator=aggregators.mean(),
                           finalizer=algorithms.optimizer_finalizer(optax.sgd(1.0)), labels=head_is_local,
                           local_state=True, client_state=lambda p: p)


def test_the_parts_run_apart_equal_next_in_a_partitioned_round(setup):
  """``RoundParts`` (distribute, stacked client outputs, aggregation of the stack, finalize) keep the partition."""
  _, model, params, rounds = setup
  process = algorithms.fed_per(model, head_is_local, client_learning_rate=CLIENT_LR)
  state, parts, rng = process.init(params), process.parts, jax.random.key(1)
  gathered = core.ClientStateStore(process.client_state(params), 6).gather(COHORTS[0], SLOTS)

  @jax.jit
  def by_parts(state, round_data, client_states):
    broadcast = parts.distribute(state, rng)
    outputs = parts.client_outputs(broadcast, round_data, rng, client_states)
    aggregate = parts.aggregate(state, outputs, rng, round_data["num_examples"] > 0)
    return parts.finalize(state, aggregate)[0], outputs

  new_state, outputs = by_parts(state, rounds[0], gathered)
  expected = jax.jit(process.next)(state, rounds[0], rng, gathered)
  assert jax.tree.leaves(outputs.update["head"]) == []
  # The same client computation; the aggregate's sum over the 3 clients may run in another order.
  assert_trees_close_to_rounding(outputs.new_state, expected.client_states, num_terms=SLOTS)
  assert_trees_close_to_rounding(new_state.params, expected.state.params, num_terms=SLOTS)


@hypothesis.settings(deadline=None, max_examples=30)
@hypothesis.given(hypothesis.strategies.lists(hypothesis.strategies.sampled_from(core.PARAM_LABELS), min_size=4,
                                              max_size=4))
def test_partition_upload_and_overlay_put_every_leaf_in_exactly_one_place(leaf_labels):
  """Whatever the labels: the upload holds the global leaves' deltas, the new state the local leaves, the frozen
  ones neither; laying the local part over the broadcast (local positions None) gives back the full model."""
  rng = np.random.default_rng(0)
  keys = ("a", "b", "c", "d")
  start = {key: rng.normal(size=(2,)).astype(np.float32) for key in keys}
  final = {key: rng.normal(size=(2,)).astype(np.float32) for key in keys}
  labels = dict(zip(keys, leaf_labels))
  delta, local = algorithms.partition_upload(labels, start, final)
  for key, label in labels.items():
    if label == "global":
      np.testing.assert_array_equal(delta[key], start[key] - final[key])
    else:
      assert delta[key] is None
    if label == "local":
      np.testing.assert_array_equal(local[key], final[key])
    else:
      assert local[key] is None
  sent = core.select_params(final, labels, ("global", "frozen"))
  chex.assert_trees_all_equal(core.overlay_params(sent, local), final)
