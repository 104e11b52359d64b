"""Federated Reconstruction and its evaluation against a float64 NumPy re-derivation (TFF's ``build_fed_recon`` and
``build_fed_recon_eval`` semantics), on ragged clients over three rounds.

The model is the family's softmax regression ``logits = x W + b``, written in NumPy in ``reference_impl``, with the
kernel ``W`` global and the bias ``b`` LOCAL (a per-client bias, the role of a user embedding). Per client and
round, with TFF's default split (even-indexed real batches reconstruct, odd-indexed ones train): ``b`` starts from
its initial value and takes reconstruction SGD steps with ``W`` fixed, then ``W`` takes client SGD steps with ``b``
fixed; the client uploads ``W - W_k`` with weight = its post-reconstruction examples and forgets ``b``. Client 5
has a single batch: nothing to train on after reconstruction (weight 0). Tolerance: ``family_setup.RTOL`` (float32
against float64 over at most 3 rounds of <= 4 sequential SGD steps per client).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lite import algorithms
from fedjax_lite.algorithms.fed_recon import DatasetSplit
from fedjax_lite.core.packing import pack_clients
from tests.algorithms import reference_impl as ref
from tests.algorithms.family_setup import (
    CLIENT_LR,
    RTOL,
    assert_close_to_reference,
    make_setup,
)

RECON_LR = 0.2
LABELS = lambda path: "local" if path[-1] == "bias" else "global"  # noqa: E731


@pytest.fixture(scope="module")
def setup():
  return make_setup()


def initial_bias(params):
  return np.asarray(params["Dense_0"]["bias"], np.float64)


def local_initializer(params):
  """A deterministic start for the local bias (the initial model's), to compare with NumPy exactly."""
  bias = jnp.asarray(params["Dense_0"]["bias"])
  return lambda key: {"Dense_0": {"kernel": None, "bias": bias}}


def reconstruct(w, b0, round_data, slot, steps):
  b = b0.copy()
  for t in steps:
    x, y, mask = ref.batch(round_data, slot, t)
    _, grad = ref.batch_loss_and_grad({"W": w, "b": b}, x, y, mask)
    b = b - RECON_LR * grad["b"]
  return b


def fed_recon_round(w, b0, round_data, *, jointly=False, split=True):
  """One round in NumPy; returns the new global ``W``."""
  deltas, weights = [], []
  for slot in ref.client_slots(round_data):
    steps = ref.real_steps(round_data, slot)
    recon_steps, post_steps = (steps[0::2], steps[1::2]) if split else (steps, steps)
    b = reconstruct(w, b0, round_data, slot, recon_steps)
    w_k = w.copy()
    for t in post_steps:
      x, y, mask = ref.batch(round_data, slot, t)
      _, grad = ref.batch_loss_and_grad({"W": w_k, "b": b}, x, y, mask)
      w_k = w_k - CLIENT_LR * grad["W"]
      if jointly:
        b = b - CLIENT_LR * grad["b"]
    deltas.append({"W": w - w_k})
    weights.append(float(sum(round_data["mask"][slot, t].sum() for t in post_steps)))
  return w - ref.weighted_mean(deltas, weights)["W"]


@pytest.mark.parametrize("jointly", [False, True], ids=["global_only", "jointly"])
def test_three_rounds_equal_numpy(setup, jointly):
  _, model, params, rounds = setup
  process = algorithms.fed_recon(model, LABELS, client_learning_rate=CLIENT_LR,
                                 reconstruction_optimizer=optax.sgd(RECON_LR), jointly_train_variables=jointly,
                                 local_initializer=local_initializer(params))
  step = jax.jit(process.next)
  state = process.init(params)
  w, b0 = np.asarray(params["Dense_0"]["kernel"], np.float64), initial_bias(params)
  for r in range(3):
    round_data = rounds[r % 2]
    state, metrics, client_states = step(state, round_data, jax.random.key(r))
    assert client_states is None  # stateless clients: nothing kept between rounds
    w = fed_recon_round(w, b0, round_data, jointly=jointly)
    assert_close_to_reference(state.params["Dense_0"], {"kernel": w}, what=f"round {r} W")
    # The server never changes (nor sends) the local part: it holds the initial value.
    chex.assert_trees_all_equal(state.params["Dense_0"]["bias"], params["Dense_0"]["bias"])
  # Only the global kernel travels: 8 x 4 float32 each way per real client (3 of them); the broadcast also carries
  # the round's client learning rate and the upload the client's weight (one float32 each); the bias never travels.
  kernel_bits = 8 * 4 * 32
  assert int(metrics["broadcasted_bits"]) == 3 * (kernel_bits + 32)
  assert int(metrics["aggregated_bits"]) == 3 * (kernel_bits + 32)


def test_training_metrics_count_post_reconstruction_batches_only(setup):
  _, model, params, rounds = setup
  process = algorithms.fed_recon(model, LABELS, local_initializer=local_initializer(params))
  round_data = rounds[0]
  _, metrics, _ = jax.jit(process.next)(process.init(params), round_data, jax.random.key(0))
  train = metrics["client_work"]["train"]
  recon = post = recon_examples = post_examples = 0
  for slot in ref.client_slots(round_data):
    steps = ref.real_steps(round_data, slot)
    recon, post = recon + len(steps[0::2]), post + len(steps[1::2])
    recon_examples += int(sum(round_data["mask"][slot, t].sum() for t in steps[0::2]))
    post_examples += int(sum(round_data["mask"][slot, t].sum() for t in steps[1::2]))
  assert int(train["num_batches"]) == post and int(train["num_reconstruction_batches"]) == recon
  assert int(train["num_examples"]) == post_examples
  assert int(train["num_reconstruction_examples"]) == recon_examples


def test_default_local_initializer_runs_the_models_initializer_per_client(setup):
  """Default: the local part of model.init(key) with the client's own key; a constant initializer reproduces the
  explicit one, and the default differs from it (fresh random values)."""
  _, model, params, rounds = setup
  default = algorithms.fed_recon(model, LABELS)
  explicit = algorithms.fed_recon(model, LABELS, local_initializer=local_initializer(params))
  out = [jax.jit(p.next)(p.init(params), rounds[0], jax.random.key(0)).state.params for p in (default, explicit)]
  assert not np.allclose(out[0]["Dense_0"]["kernel"], out[1]["Dense_0"]["kernel"])


def test_dataset_split_matches_tff_repeat_then_take(setup):
  """``DatasetSplit(e_r, s_r, e_p, s_p, split)``: the parity's real batches repeated e times, then the first s."""
  _, _, _, rounds = setup
  round_data = rounds[0]
  for split in (DatasetSplit(), DatasetSplit(recon_epochs=3, recon_steps_max=4, post_recon_epochs=2),
                DatasetSplit(split_dataset=False, post_recon_epochs=2, post_recon_steps_max=5)):
    for slot in range(round_data["num_examples"].shape[0]):
      client = jax.tree.map(lambda a: a[slot], round_data)
      recon, post = jax.jit(split.apply)(client)
      steps = ref.real_steps(round_data, slot)
      halves = (steps[0::2], steps[1::2]) if split.split_dataset else (steps, steps)
      for part, batches, epochs, cap in ((recon, halves[0], split.recon_epochs, split.recon_steps_max),
                                         (post, halves[1], split.post_recon_epochs, split.post_recon_steps_max)):
        expected = (batches * epochs)[:cap]
        real = np.asarray(part["mask"]).any(axis=1)
        assert real.sum() == len(expected) and real[:len(expected)].all()  # a prefix, as train_locally needs
        np.testing.assert_array_equal(np.asarray(part["x"])[:len(expected)], round_data["x"][slot, expected])
        np.testing.assert_array_equal(np.asarray(part["mask"])[:len(expected)], round_data["mask"][slot, expected])
        assert int(part["num_examples"]) == int(round_data["mask"][slot, expected].sum())


def test_evaluation_reconstructs_then_evaluates_on_the_other_half(setup):
  _, model, params, rounds = setup
  round_data = rounds[1]
  evaluate = algorithms.fed_recon_evaluation(model, LABELS, reconstruction_optimizer=optax.sgd(RECON_LR),
                                             local_initializer=local_initializer(params))
  results = evaluate(params, round_data)
  w, b0 = np.asarray(params["Dense_0"]["kernel"], np.float64), initial_bias(params)
  losses, accuracies, counts = [], [], []
  for slot in ref.client_slots(round_data):
    steps = ref.real_steps(round_data, slot)
    b = reconstruct(w, b0, round_data, slot, steps[0::2])
    loss = correct = count = 0.0
    for t in steps[1::2]:
      x, y, mask = ref.batch(round_data, slot, t)
      batch_loss, _ = ref.batch_loss_and_grad({"W": w, "b": b}, x, y, mask)
      loss += batch_loss * mask.sum()
      correct += np.sum((np.argmax(ref.logits({"W": w, "b": b}, x), axis=1) == y) & mask)
      count += mask.sum()
    losses.append(loss), accuracies.append(correct), counts.append(count)
  counts = np.array(counts)
  np.testing.assert_allclose(float(results["aggregate"]["loss"]), sum(losses) / counts.sum(), rtol=RTOL)
  np.testing.assert_allclose(float(results["aggregate"]["accuracy"]), sum(accuracies) / counts.sum(), rtol=1e-6)
  assert int(results["aggregate"]["num_examples"]) == counts.sum()
  per_client_loss = np.asarray(results["per_client"]["loss"])[:len(counts)]
  np.testing.assert_allclose(per_client_loss, np.array(losses) / counts, rtol=RTOL)
  np.testing.assert_allclose(float(results["distribution"]["loss"]["client_mean"]),
                             np.mean(np.array(losses) / counts), rtol=RTOL)
  # The local values in params are never used: every client reconstructs its own.
  other_bias = {"Dense_0": {"kernel": params["Dense_0"]["kernel"], "bias": params["Dense_0"]["bias"] + 5.0}}
  chex.assert_trees_all_close(evaluate(other_bias, round_data), results, rtol=0, atol=0)


def test_frozen_parameters_are_never_trained_nor_counted(tiny_model, tiny_params, population):
  """A three-part model: the first layer frozen, the output kernel global, the output bias local. The frozen layer
  and the initial local values stay bit-identical on the server; only the global kernel is counted."""
  labels = lambda path: ("frozen" if path[0] == "Dense_0" else "local" if path[-1] == "bias" else "global")  # noqa
  process = algorithms.fed_recon(tiny_model, labels)
  round_data = pack_clients(population, [0, 1, 2], batch_size=4)
  state = process.init(tiny_params)
  new_state, metrics, _ = jax.jit(process.next)(state, round_data, jax.random.key(0))
  chex.assert_trees_all_equal(new_state.params["Dense_0"], state.params["Dense_0"])
  chex.assert_trees_all_equal(new_state.params["Dense_1"]["bias"], state.params["Dense_1"]["bias"])
  assert not np.allclose(new_state.params["Dense_1"]["kernel"], state.params["Dense_1"]["kernel"])
  kernel_bits = int(np.size(tiny_params["Dense_1"]["kernel"])) * 32
  assert int(metrics["aggregated_bits"]) == 3 * (kernel_bits + 32)  # the kernel and the client's weight
  evaluation = algorithms.fed_recon_evaluation(tiny_model, labels)(new_state.params, round_data)
  assert np.isfinite(float(evaluation["aggregate"]["loss"]))


def test_labels_and_options_are_checked(setup):
  _, model, _, _ = setup
  with pytest.raises(ValueError, match="both 'global' and 'local'"):
    algorithms.fed_recon(model, "global")
  with pytest.raises(TypeError, match="dataset_split"):
    algorithms.fed_recon(model, LABELS, dataset_split={"recon_epochs": 2})
  with pytest.raises(ValueError, match="recon_epochs"):
    algorithms.fed_recon(model, LABELS, dataset_split=DatasetSplit(recon_epochs=0))
