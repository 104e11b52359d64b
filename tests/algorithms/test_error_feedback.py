"""Compressed uploads with error feedback (Stich et al. 2018; Karimireddy et al. 2019) against a NumPy re-derivation
of the residuals over 3 rounds, ragged clients and partial participation; the state exists only with feedback.
Also: a random-k mask shared by the round's clients (alone and through a secure sum), error feedback on the global
part of a partitioned model (with and without local parameters in the same client state), and SCAFFOLD with
compressed deltas (its control variate and the residual in one client-state record)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lite import aggregators
from fedjax_lite import algorithms
from fedjax_lite.algorithms import fed_avg
from fedjax_lite.algorithms.compressed_uploads import ErrorFeedbackState, compress_uploads
from fedjax_lite.algorithms.template import build_round, optimizer_finalizer
from fedjax_lite.core.client_state import ClientStateStore
from fedjax_lite.core.packing import pack_clients
from fedjax_lite.core.records import ClientOutput
from tests.conftest import make_population
from tests.tolerances import float_atol

POPULATION = make_population(num_clients=6, seed=3, min_size=2, max_size=13)
# Three rounds of 3 real clients and one padding slot; client 2 never takes part, clients 0 and 4 twice.
COHORTS = [np.array([0, 3, 4]), np.array([1, 4, 5]), np.array([0, 5, 3])]
PARAMS = {"w": jnp.zeros(8), "b": jnp.zeros(3)}


def toy_work(broadcast, client_data, client_state, rng):
  """A client work whose update is a known function of the client's real examples (ragged: 2 to 13 of them):
  ``w``: the sum of the features, ``b``: the sum of the squares of the first three; weight ``n_i``."""
  mask = client_data["mask"][..., None].astype(jnp.float32)
  x = client_data["x"]
  update = {"w": jnp.sum(x * mask, axis=(0, 1)), "b": jnp.sum((x[..., :3] ** 2) * mask, axis=(0, 1))}
  weight = client_data["num_examples"].astype(jnp.float32)
  return ClientOutput(update=update, weight=weight, metrics={"num_examples": client_data["num_examples"]})


def numpy_update(x, mask):
  m = mask[..., None].astype(np.float64)
  x = x.astype(np.float64)
  return {"w": (x * m).sum((0, 1)), "b": ((x[..., :3] ** 2) * m).sum((0, 1))}


def flat(tree):
  return np.concatenate([np.ravel(tree["b"]), np.ravel(tree["w"])])  # leaf order: b, w


def unflat(vector):
  return {"b": vector[:3], "w": vector[3:]}


def numpy_top_k(vector, kept):
  out = np.zeros_like(vector)
  index = np.argsort(-np.abs(vector), kind="stable")[:kept]
  out[index] = vector[index]
  return out


def numpy_sign(vector):
  return np.mean(np.abs(vector)) * np.sign(vector)


NUMPY_COMPRESS = {  # the compressor and its NumPy re-derivation on one client's message (global or per layer)
    "top_k_global": (aggregators.top_k_compressor(k=4, error_feedback=True), lambda m: numpy_top_k(m, 4), False),
    "top_k_per_layer": (aggregators.top_k_compressor(k=2, per_layer=True, error_feedback=True),
                        lambda m: numpy_top_k(m, 2), True),
    "sign_per_layer": (aggregators.sign_compressor(error_feedback=True), numpy_sign, True),
    "sign_global": (aggregators.sign_compressor(per_layer=False, error_feedback=True), numpy_sign, False),
}


def run_rounds(compressor, aggregator=None, work=toy_work, **round_options):
  if not round_options:  # the compress_uploads path, as before build_round took upload_compressor
    work, aggregator, client_state = compress_uploads(work, aggregator or aggregators.mean(), compressor)
    process = build_round(work, aggregator=aggregator, finalizer=optimizer_finalizer(optax.sgd(1.0)),
                          client_state=client_state)
  else:
    process = build_round(work, aggregator=aggregator or aggregators.mean(),
                          finalizer=optimizer_finalizer(optax.sgd(1.0)), upload_compressor=compressor,
                          **round_options)
  state = process.init(PARAMS)
  store = ClientStateStore(jax.device_get(process.client_state(PARAMS)), POPULATION.num_clients)
  step = jax.jit(process.next)
  history = []
  for round_num, cohort in enumerate(COHORTS):
    round_data = pack_clients(POPULATION, cohort, batch_size=4, cohort_size=4, round_num=round_num)
    state, metrics, new_states = step(state, round_data, jax.random.key(round_num), store.gather(cohort, 4))
    store.scatter(cohort, jax.device_get(new_states), round_data["num_examples"])
    history.append((jax.device_get(round_data), jax.device_get(state.params),
                    jax.tree.map(np.copy, store.arrays), metrics))
  return history


@pytest.mark.parametrize("name", sorted(NUMPY_COMPRESS))
def test_residuals_and_server_model_match_numpy_over_three_rounds(name):
  compressor, numpy_compress, per_layer = NUMPY_COMPRESS[name]
  history = run_rounds(compressor)
  residuals = np.zeros((POPULATION.num_clients, 11))
  params = np.zeros(11)
  for (round_data, got_params, got_store, _), cohort in zip(history, COHORTS):
    total, weight_sum = np.zeros(11), 0.0
    for slot, client in enumerate(cohort):
      message = residuals[client] + flat(numpy_update(round_data["x"][slot], round_data["mask"][slot]))
      if per_layer:
        sent = np.concatenate([numpy_compress(message[:3]), numpy_compress(message[3:])])
      else:
        sent = numpy_compress(message)
      residuals[client] = message - sent
      weight = float(round_data["num_examples"][slot])
      total += weight * sent
      weight_sum += weight
    params = params - total / weight_sum
    scale = np.max(np.abs(residuals)) + np.max(np.abs(params)) + 1.0
    # Sums of up to ~13 examples x 3 rounds in float32 against float64, then a 3-client weighted mean.
    atol = float_atol(13 * 3 + 4, scale)
    np.testing.assert_allclose(flat(got_params), params, atol=atol)
    np.testing.assert_allclose(np.concatenate([got_store["b"], got_store["w"]], axis=1), residuals, atol=atol)
  assert np.all(history[-1][2]["w"][2] == 0)  # never in a cohort: its residual is still the initial zeros


def test_random_k_residual_is_the_message_off_the_sent_indices():
  """Random-k (unscaled, as Stich et al.'s memory SGD): each upload keeps exactly k entries of the message
  ``e + Delta`` unchanged, and the new residual is the message elsewhere (and 0 on the sent entries)."""
  compressor = aggregators.random_k_compressor(k=3, unbiased=False, error_feedback=True)
  history = run_rounds(compressor)
  residuals = np.zeros((POPULATION.num_clients, 11))
  params = np.zeros(11)
  for (round_data, got_params, got_store, _), cohort in zip(history, COHORTS):
    new_residuals = np.concatenate([got_store["b"], got_store["w"]], axis=1)
    total, weight_sum = np.zeros(11), 0.0
    for slot, client in enumerate(cohort):
      message = residuals[client] + flat(numpy_update(round_data["x"][slot], round_data["mask"][slot]))
      kept = new_residuals[client] == 0
      assert kept.sum() == 3
      sent = np.where(kept, message, 0.0)
      np.testing.assert_allclose(new_residuals[client], message - sent, atol=float_atol(40, np.abs(message).max()))
      residuals[client] = new_residuals[client]
      weight = float(round_data["num_examples"][slot])
      total += weight * sent
      weight_sum += weight
    params = params - total / weight_sum
    np.testing.assert_allclose(flat(got_params), params, atol=float_atol(50, np.abs(params).max() + 1.0))


def test_state_exists_only_with_error_feedback_and_bits_are_the_message(tiny_model, tiny_params):
  population = make_population(num_clients=4)
  round_data = pack_clients(population, np.array([0, 1, 2]), batch_size=4)
  plain = fed_avg(tiny_model, client_learning_rate=0.1,
                  upload_compressor=aggregators.top_k_compressor(fraction=0.1))
  assert plain.client_state is None
  _, metrics, states = plain.next(plain.init(tiny_params), round_data, jax.random.key(0))
  assert states is None
  size = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tiny_params))
  kept = int(np.ceil(0.1 * size))
  # each of the 3 clients sends kept indices of ceil(log2 size) bits, kept float32 values and its float32 weight
  assert int(metrics["aggregated_bits"]) == 3 * (kept * (int(np.ceil(np.log2(size))) + 32) + 32)

  feedback = fed_avg(tiny_model, client_learning_rate=0.1,
                     upload_compressor=aggregators.top_k_compressor(fraction=0.1, error_feedback=True))
  store = ClientStateStore(jax.device_get(feedback.client_state(tiny_params)), population.num_clients)
  state, _, states = feedback.next(feedback.init(tiny_params), round_data, jax.random.key(0),
                                   store.gather(np.array([0, 1, 2]), 3))
  residual_entries = sum(int(np.sum(np.asarray(leaf[0]) != 0)) for leaf in jax.tree.leaves(states))
  assert residual_entries == size - kept  # what client 0 did not send (its delta has no exact zeros)
  with pytest.raises(ValueError, match="client_states"):
    feedback.next(state, round_data, jax.random.key(1))


@pytest.mark.parametrize("build, match", [
    (lambda: aggregators.compressed(aggregators.top_k_compressor(k=2, error_feedback=True)), "per client"),
    (lambda: aggregators.random_k_compressor(k=2, error_feedback=True), "unbiased=False"),
    (lambda: aggregators.sign_compressor(error_feedback=1), "error_feedback must be a bool"),
])
def test_bad_arguments(build, match):
  with pytest.raises((TypeError, ValueError), match=match):
    build()




# ----------------------------------------------------------------------------------------------- shared mask

def shared_support(seed, round_num, groups, kept):
  """Round ``round_num``'s public support (``aggregators.shared_mask_key``): the flat indices kept per group."""
  index = []
  for group, (start, stop) in enumerate(groups):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), round_num), group)
    index.append(start + np.asarray(jax.lax.top_k(jax.random.uniform(key, (stop - start,)), kept)[1]))
  return np.concatenate(index)


@pytest.mark.parametrize("per_layer", [False, True])
def test_shared_random_k_with_error_feedback_matches_numpy_and_composes_with_the_secure_sum(per_layer):
  """A mask shared by the round's clients, with error feedback: client i sends its message ``e_i + Delta_i`` at
  round t's support and keeps the rest as its residual; the mean of the sent vectors moves the model. Through
  ``aggregator=secure_sum(U)`` the same round securely sums the k values (the model then moves by the SUM), equal
  to NumPy's up to the secure sum's quantization, and each client uploads exactly k 32-bit summands and 4 bits."""
  compressor = aggregators.shared_random_k_compressor(k=2, per_layer=per_layer, unbiased=False, seed=3,
                                                      error_feedback=True)
  groups = [(0, 3), (3, 11)] if per_layer else [(0, 11)]
  kept = 2 * len(groups)
  history = run_rounds(compressor, client_state=None)
  bound = 400.0  # |message| stays below this: sums of <= 13 squares/features of N(0, 1)-ish data, 3 rounds
  secure = run_rounds(compressor, aggregator=aggregators.secure_sum(bound), client_state=None)
  residuals, params, secure_params = np.zeros((POPULATION.num_clients, 11)), np.zeros(11), np.zeros(11)
  for round_num, ((round_data, got, store, metrics), (_, got_secure, _, secure_metrics), cohort) in enumerate(
      zip(history, secure, COHORTS)):
    support = shared_support(3, round_num, groups, 2)
    total, weight_sum, unweighted = np.zeros(11), 0.0, np.zeros(11)
    for slot, client in enumerate(cohort):
      message = residuals[client] + flat(numpy_update(round_data["x"][slot], round_data["mask"][slot]))
      assert np.abs(message).max() < bound
      sent = np.zeros(11)
      sent[support] = message[support]
      residuals[client] = message - sent
      weight = float(round_data["num_examples"][slot])
      total, weight_sum, unweighted = total + weight * sent, weight_sum + weight, unweighted + sent
    params = params - total / weight_sum
    secure_params = secure_params - unweighted  # a secure sum is unweighted
    atol = float_atol(13 * 3 + 4, np.abs(residuals).max() + np.abs(params).max() + 1.0)
    np.testing.assert_allclose(flat(got), params, atol=atol)
    np.testing.assert_allclose(np.concatenate([store["b"], store["w"]], axis=1), residuals, atol=atol)
    # 3 clients per round, each off by at most half a step (2U / (2^32 - 1)) per value, over 3 rounds
    secure_atol = 3 * 3 * 2 * bound / (2 * (2**32 - 1)) + float_atol(13 * 3 + 4, np.abs(secure_params).max() + 1)
    np.testing.assert_allclose(flat(got_secure), secure_params, atol=secure_atol)
    assert int(metrics["aggregated_bits"]) == 3 * (kept * 32 + 32)  # k values and the mean's weight
    assert int(secure_metrics["aggregated_bits"]) == 3 * (kept * 32 + 4)  # k summands and 4 indicator bits


def test_shared_mask_without_feedback_and_refusals():
  """Without error feedback there is no client state and the aggregator alone gathers the k values; the
  round-level option is validated."""
  compressor = aggregators.shared_random_k_compressor(k=3, unbiased=False, seed=1)
  process = build_round(toy_work, aggregator=aggregators.mean(), finalizer=optimizer_finalizer(optax.sgd(1.0)),
                        upload_compressor=compressor)
  assert process.client_state is None
  round_data = pack_clients(POPULATION, COHORTS[0], batch_size=4, cohort_size=4)
  state, metrics, _ = process.next(process.init(PARAMS), round_data, jax.random.key(0))
  assert int(np.sum(flat(jax.device_get(state.params)) != 0)) == 3
  with pytest.raises(TypeError, match="upload_compressor must be"):
    build_round(toy_work, aggregator=aggregators.mean(), finalizer=optimizer_finalizer(optax.sgd(1.0)),
                upload_compressor="top_k")
  with pytest.raises(ValueError, match="give one Compressor"):
    build_round(toy_work, aggregator=aggregators.mean(), finalizer=optimizer_finalizer(optax.sgd(1.0)),
                upload_compressor={"delta": compressor})
  with pytest.raises(ValueError, match="do not have"):
    build_round(toy_work, aggregator={"delta": aggregators.mean()}, finalizer=optimizer_finalizer(optax.sgd(1.0)),
                upload_compressor={"other": compressor})
  with pytest.raises(ValueError, match="as a dict"):
    build_round(toy_work, aggregator={"delta": aggregators.mean()}, finalizer=optimizer_finalizer(optax.sgd(1.0)),
                upload_compressor=compressor)
  from fedjax_lite.algorithms.template import Prepass

  with pytest.raises(ValueError, match="prepass"):
    build_round(toy_work, aggregator={"delta": aggregators.mean()}, finalizer=optimizer_finalizer(optax.sgd(1.0)),
                upload_compressor={"delta": compressor},
                prepass=Prepass(toy_work, {"gradient": aggregators.mean()}))


# ----------------------------------------------------------------------------------------------- partitioned model

def partitioned_work(broadcast, client_data, client_state, rng):
  """``toy_work`` on a partitioned model: ``w`` is global (uploaded), ``b`` local (``local_state``: the client's
  ``b`` grows by its ``b`` update, and the round never sees it) or frozen (nothing happens to it)."""
  output = toy_work(broadcast, client_data, None, rng)
  new_state = None if client_state is None else {"w": None, "b": client_state["b"] + output.update["b"]}
  return output._replace(update={"w": output.update["w"], "b": None}, new_state=new_state)


@pytest.mark.parametrize("local", [False, True], ids=["global_and_frozen", "global_and_local"])
def test_error_feedback_on_the_global_part_of_a_partitioned_model_matches_numpy(local):
  """Only ``w`` (global) is uploaded, so compressed (top-3 of its 8 entries) and fed back; ``b`` is frozen, or
  local and then kept in the same client-state record as the residual (``ErrorFeedbackState(state=local part,
  residual=global part)``). Three rounds against NumPy: residuals, local parameters and the server's ``w``; the
  server's ``b`` never moves; the bits are the global part's message."""
  compressor = aggregators.top_k_compressor(k=3, error_feedback=True)
  labels = {"w": "global", "b": "local" if local else "frozen"}
  history = run_rounds(compressor, work=partitioned_work, labels=labels, local_state=local)
  residuals = np.zeros((POPULATION.num_clients, 8))
  local_b = np.zeros((POPULATION.num_clients, 3))
  w = np.zeros(8)
  for (round_data, got, store, metrics), cohort in zip(history, COHORTS):
    total, weight_sum = np.zeros(8), 0.0
    for slot, client in enumerate(cohort):
      update = numpy_update(round_data["x"][slot], round_data["mask"][slot])
      message = residuals[client] + update["w"]
      sent = numpy_top_k(message, 3)
      residuals[client] = message - sent
      local_b[client] += update["b"]
      weight = float(round_data["num_examples"][slot])
      total, weight_sum = total + weight * sent, weight_sum + weight
    w = w - total / weight_sum
    atol = float_atol(13 * 3 + 4, np.abs(residuals).max() + np.abs(w).max() + np.abs(local_b).max() + 1.0)
    np.testing.assert_allclose(got["w"], w, atol=atol)
    np.testing.assert_array_equal(got["b"], np.zeros(3))
    if local:
      assert isinstance(store, ErrorFeedbackState) and store.residual["b"] is None and store.state["w"] is None
      np.testing.assert_allclose(store.residual["w"], residuals, atol=atol)
      np.testing.assert_allclose(store.state["b"], local_b, atol=atol)
    else:
      assert store["b"] is None
      np.testing.assert_allclose(store["w"], residuals, atol=atol)
    # 3 indices into the 8 global entries (3 bits each) with their float32 values, and the mean's weight
    assert int(metrics["aggregated_bits"]) == 3 * (3 * (3 + 32) + 32)


def test_fed_avg_with_labels_and_local_state_keeps_the_residual_beside_the_local_parameters(tiny_model, tiny_params):
  """fed_avg's own partitioned client work: the residual covers the global leaves only, the local leaves are the
  trained local parameters, in one record per client."""
  from fedjax_lite.core.param_partition import label_params

  population = make_population(num_clients=4)
  cohort = np.array([0, 1, 2])
  round_data = pack_clients(population, cohort, batch_size=4)
  labels = lambda names: "local" if "Dense_1" in names else "global"  # noqa: E731 (the head is local)
  process = fed_avg(tiny_model, client_learning_rate=0.1, labels=labels, local_state=True,
                    upload_compressor=aggregators.sign_compressor(error_feedback=True))
  store = ClientStateStore(jax.device_get(process.client_state(tiny_params)), population.num_clients)
  state, metrics, states = process.next(process.init(tiny_params), round_data, jax.random.key(0),
                                        store.gather(cohort, 3))
  label_tree = label_params(tiny_params, labels)
  residual_leaves = jax.tree.leaves(states.residual)
  local_leaves = jax.tree.leaves(states.state)
  assert len(residual_leaves) == jax.tree.leaves(label_tree).count("global") > 0
  assert len(local_leaves) == jax.tree.leaves(label_tree).count("local") > 0
  assert all(np.any(np.asarray(leaf[0]) != 0) for leaf in residual_leaves)  # sign compression leaves a residual
  global_sizes = [int(np.prod(p.shape)) for p, label in zip(jax.tree.leaves(tiny_params), jax.tree.leaves(label_tree))
                  if label == "global"]
  # per leaf: d sign bits and a 32-bit scale; and the mean's 32-bit weight
  assert int(metrics["aggregated_bits"]) == 3 * (sum(size + 32 for size in global_sizes) + 32)


# ----------------------------------------------------------------------------------------------- SCAFFOLD

def test_scaffold_with_compressed_deltas_and_error_feedback_matches_numpy_over_three_rounds():
  """SCAFFOLD (the family's softmax-regression setup, ragged clients, a third round re-sampling clients 0 and 5)
  with per-layer scaled-sign compression of the model deltas and error feedback, against the float64 reference's
  local steps: ``c_i`` from the uncompressed delta, ``Delta c_i`` uploaded uncompressed, ``x`` moved by the mean
  of the compressed messages, and each client's state ONE record ``ErrorFeedbackState(c_i, {"delta": e_i})``."""
  from tests.algorithms import reference_impl as ref
  from tests.algorithms.family_setup import (BATCH_SIZE, CLIENT_LR, COHORT_SIZE, COHORTS as FAMILY_COHORTS,
                                             assert_close_to_reference, make_setup, to_reference)

  population, model, params, rounds = make_setup()
  cohorts = [*FAMILY_COHORTS, [5, 0, 3]]
  rounds = [*rounds, pack_clients(population, cohorts[2], batch_size=BATCH_SIZE, cohort_size=COHORT_SIZE,
                                  num_steps=rounds[0]["x"].shape[1], seed=5, round_num=2)]
  n = population.num_clients
  process = algorithms.scaffold(model, num_clients=n, client_learning_rate=CLIENT_LR,
                                upload_compressor=aggregators.sign_compressor(error_feedback=True))
  step = jax.jit(process.next)
  state = process.init(params)
  store = ClientStateStore(jax.device_get(process.client_state(params)), n)
  x = to_reference(params)
  c = ref.zeros_like(x)
  controls = {i: ref.zeros_like(x) for i in range(n)}
  residuals = {i: ref.zeros_like(x) for i in range(n)}
  for r, (cohort, round_data) in enumerate(zip(cohorts, rounds)):
    cohort = np.asarray(cohort)
    state, metrics, new_states = step(state, round_data, jax.random.key(r), store.gather(cohort, COHORT_SIZE))
    store.scatter(cohort, jax.device_get(new_states), round_data["num_examples"])
    sents, weights, changes = [], [], []
    for slot in ref.client_slots(round_data):
      client = cohort[slot]
      correction = ref.tree_map(np.subtract, c, controls[client])  # c - c_i
      final = ref.local_sgd(x, round_data, slot, CLIENT_LR, lambda y, t, correction=correction: correction)
      delta = ref.tree_map(np.subtract, x, final)
      steps = len(ref.real_steps(round_data, slot))
      new_control = ref.tree_map(lambda ci, cc, d: ci - cc + d / (steps * CLIENT_LR), controls[client], c, delta)
      changes.append(ref.tree_map(np.subtract, new_control, controls[client]))
      controls[client] = new_control
      message = ref.tree_map(np.add, residuals[client], delta)
      sent = ref.tree_map(numpy_sign, message)  # per layer: each leaf its own scale
      residuals[client] = ref.tree_map(np.subtract, message, sent)
      sents.append(sent)
      weights.append(1.0)  # SCAFFOLD's uniform mean
    x = ref.tree_map(np.subtract, x, ref.weighted_mean(sents, weights))
    c = ref.tree_map(lambda cc, *d: cc + sum(d) / n, c, *changes)
    assert_close_to_reference(state.params, x, what=f"round {r + 1} params")
    assert_close_to_reference(to_reference(state.finalizer_state.control_variate), c, what=f"round {r + 1} c")
    arrays = store.arrays
    assert isinstance(arrays, ErrorFeedbackState)
    for client in sorted(set(np.concatenate([np.asarray(k) for k in cohorts[:r + 1]]))):
      assert_close_to_reference(to_reference(jax.tree.map(lambda a: a[client], arrays.state)), controls[client],
                                what=f"round {r + 1} c_{client}")
      assert_close_to_reference(to_reference(jax.tree.map(lambda a: a[client], arrays.residual["delta"])),
                                residuals[client], what=f"round {r + 1} e_{client}")
    # per client: the signs of the 36 parameters and 2 scales, the mean's 32-bit count, the uncompressed control
    # change (36 float32)
    assert int(metrics["aggregated_bits"]) == 3 * ((32 + 32) + (4 + 32) + 32 + 36 * 32)
  assert np.all(np.asarray(store.arrays.residual["delta"]["Dense_0"]["kernel"][4]) == 0)  # client 4: never sampled


def test_scaffold_and_shared_mask_refusals(tiny_model):
  with pytest.raises(TypeError, match="upload_compressor must be"):
    algorithms.scaffold(tiny_model, num_clients=4, client_learning_rate=0.1, upload_compressor="sign")
  # a driver that runs the client work without the aggregators' broadcast cannot draw a shared mask
  from fedjax_lite.algorithms.compressed_uploads import compressing_work
  from fedjax_lite.algorithms.template import Broadcast

  work = compressing_work(toy_work, aggregators.shared_random_k_compressor(k=2, unbiased=False,
                                                                           error_feedback=True))
  round_data = pack_clients(POPULATION, COHORTS[0], batch_size=4, cohort_size=4)
  client_data = jax.tree.map(lambda a: a[0], round_data)
  with pytest.raises(ValueError, match="synchronous round"):
    work(Broadcast(params=PARAMS), client_data, jax.tree.map(jnp.zeros_like, PARAMS), jax.random.key(0))
