"""Example-level DP-SGD inside clients (Abadi et al. 2016) against a NumPy per-example DP-SGD, its noise (exact from
the same draws, and statistically), and its example-level accountant against dp_accounting."""

from __future__ import annotations

import dataclasses

import chex
import dp_accounting
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lite import aggregators, privacy
from fedjax_lite.algorithms import ExampleDp, fed_avg, train_locally
from fedjax_lite.algorithms.example_dp import EXAMPLE_NOISE_STREAM
from fedjax_lite.algorithms.ghost_norms import ghost_clipped_sum, ghost_layers
from fedjax_lite.core import Runner
from fedjax_lite.core.packing import pack_clients
from fedjax_lite.models import from_flax
from fedjax_lite.models.conv import Conv
from fedjax_lite.models.linear import logistic_regression
from fedjax_lite.privacy.mechanisms import gaussian_noise
from tests.conftest import make_population
from tests.tolerances import float_atol

MODEL = logistic_regression(4, (8,))
PARAMS = jax.tree.map(lambda x: 0.3 * jax.random.normal(jax.random.key(7), x.shape), MODEL.init(jax.random.key(0)))
LEARNING_RATE = 0.5
CLIP = 2.5


def client(max_steps=None):
  """Client 0 of the population (15 examples: batches of 4, 4, 4 and 3 real examples) in storage order."""
  data = pack_clients(make_population(), [0], batch_size=4, shuffle=False, max_steps=max_steps)
  return jax.tree.map(lambda x: jnp.asarray(x[0]), data)


def first_batch(data):
  return {key: data[key][0] for key in ("x", "y")}


def numpy_dp_sgd(params, data, clip, noise=None):
  """Per-example DP-SGD in NumPy for softmax regression: ``g_j = x_j (p_j - y_j)^T`` (kernel) and ``p_j - y_j``
  (bias), clipped to ``clip`` in global L2 norm, summed over real examples, plus ``noise[t]``, over ``B = 4``."""
  kernel = np.asarray(params["Dense_0"]["kernel"], np.float64)
  bias = np.asarray(params["Dense_0"]["bias"], np.float64)
  loss_sum, clipped_count, unclipped_count = 0.0, 0, 0
  x_all, y_all, mask_all = (np.asarray(data[k]) for k in ("x", "y", "mask"))
  for step in range(int(np.sum(mask_all.any(-1)))):
    grad_kernel, grad_bias = np.zeros_like(kernel), np.zeros_like(bias)
    for x, y, real in zip(x_all[step], y_all[step], mask_all[step]):
      if not real:
        continue
      logits = x @ kernel + bias
      p = np.exp(logits - logits.max())
      p /= p.sum()
      loss_sum += -np.log(p[y])
      residual = p - np.eye(4)[y]
      gk, gb = np.outer(x, residual), residual
      norm = np.sqrt(np.sum(gk**2) + np.sum(gb**2))
      scale = min(1.0, clip / norm)
      clipped_count += scale < 1.0
      unclipped_count += scale == 1.0
      grad_kernel += scale * gk
      grad_bias += scale * gb
    if noise is not None:
      grad_kernel += noise[step]["Dense_0"]["kernel"]
      grad_bias += noise[step]["Dense_0"]["bias"]
    kernel = kernel - LEARNING_RATE * grad_kernel / 4
    bias = bias - LEARNING_RATE * grad_bias / 4
  return {"Dense_0": {"bias": bias, "kernel": kernel}}, loss_sum, (clipped_count, unclipped_count)


@pytest.mark.parametrize("per_example", ["ghost", "scan", "vmap"])
def test_zero_noise_steps_are_numpys_clipped_per_example_sgd(per_example):
  data = client()
  trained, sums = train_locally(MODEL, optax.sgd(LEARNING_RATE), PARAMS, data, jax.random.key(0),
                                example_dp=ExampleDp(l2_clip=CLIP, noise_multiplier=0.0, per_example=per_example))
  expected, loss_sum, (clipped, unclipped) = numpy_dp_sgd(PARAMS, data, CLIP)
  assert clipped > 0 and unclipped > 0  # the clip binds for some examples and not for others
  # 4 steps, each a sum of <= 4 clipped per-example gradients of ~10 terms; parameters of order 1.
  atol = float_atol(4 * 4 * 10, 2.0)
  for name in ("kernel", "bias"):
    np.testing.assert_allclose(trained["Dense_0"][name], expected["Dense_0"][name], atol=atol)
  np.testing.assert_allclose(float(sums["loss"]), loss_sum, rtol=1e-5)
  assert int(sums["num_examples"]) == 15 and int(sums["num_batches"]) == 4


@pytest.mark.parametrize("per_example", ["ghost", "scan", "vmap"])
def test_noise_is_the_gaussian_draw_of_each_step(per_example):
  """Exact: with the same draws (``N(0, (z C)^2)`` from step t's noise key) NumPy's noisy steps give the params."""
  data, rng, z = client(), jax.random.key(3), 1.3
  trained, _ = train_locally(MODEL, optax.sgd(LEARNING_RATE), PARAMS, data, rng,
                             example_dp=ExampleDp(l2_clip=CLIP, noise_multiplier=z, per_example=per_example))
  noise_key = jax.random.fold_in(rng, EXAMPLE_NOISE_STREAM)
  noise = [jax.tree.map(np.asarray, gaussian_noise(jax.random.fold_in(noise_key, t), PARAMS, z * CLIP))
           for t in range(4)]
  expected, _, _ = numpy_dp_sgd(PARAMS, data, CLIP, noise)
  atol = float_atol(4 * 4 * 10, 2.0 + 4 * z * CLIP * 4)
  for name in ("kernel", "bias"):
    np.testing.assert_allclose(trained["Dense_0"][name], expected["Dense_0"][name], atol=atol)


def test_noise_is_standard_normal_times_z_clip_over_the_batch():
  """Statistical: one step, 400 clients' keys x 36 parameters = 14,400 draws of ``(noisy - clean) * B / (lr z C)``:
  mean within 4 / sqrt(N) = 0.033 of 0 and standard deviation within 4 sqrt(1 / (2N)) = 2.4% of 1 (4 sigma)."""
  data, z = client(max_steps=1), 2.0
  clean, _ = train_locally(MODEL, optax.sgd(LEARNING_RATE), PARAMS, data, jax.random.key(0),
                           example_dp=ExampleDp(l2_clip=CLIP, noise_multiplier=0.0))

  def noisy(key):
    return train_locally(MODEL, optax.sgd(LEARNING_RATE), PARAMS, data, key,
                         example_dp=ExampleDp(l2_clip=CLIP, noise_multiplier=z))[0]

  runs = jax.jit(jax.vmap(noisy))(jax.random.split(jax.random.key(11), 400))
  draws = np.concatenate([((np.asarray(c) - np.asarray(r)) * 4 / (LEARNING_RATE * z * CLIP)).reshape(400, -1)
                          for r, c in zip(jax.tree.leaves(runs), jax.tree.leaves(clean))], axis=1).ravel()
  assert draws.size == 14_400
  assert abs(draws.mean()) <= 4 / np.sqrt(draws.size)
  assert abs(draws.std() - 1.0) <= 4 * np.sqrt(1 / (2 * draws.size))


def test_example_dp_composes_with_user_level_dp_in_fed_avg():
  population = make_population(num_clients=4)
  round_data = pack_clients(population, np.array([0, 1, 2]), batch_size=4)
  process = fed_avg(MODEL, client_learning_rate=0.1, example_dp=ExampleDp(l2_clip=1.0, noise_multiplier=1.0),
                    aggregator=aggregators.gaussian_fixed(0.5, 0.1, 3.0))
  state, metrics, _ = jax.jit(process.next)(process.init(PARAMS), round_data, jax.random.key(0))
  assert int(metrics["client_work"]["num_non_finite_clients"]) == 0
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(state.params))


@pytest.mark.parametrize("sampling", ["shuffled", "poisson", "without_replacement"])
def test_example_level_epsilon_is_dp_accountings(sampling):
  """Re-derived from dp_accounting's events: shuffled (n = 60, B = 20, one epoch) is one Gaussian of multiplier z/2
  per round (replace-one); the sampled ones compose ceil(n / B) = 3 sampled Gaussians per round."""
  z, rounds, delta = 1.5, 10, 1e-5
  if sampling == "shuffled":
    event, relation = dp_accounting.GaussianDpEvent(z / 2), dp_accounting.NeighboringRelation.REPLACE_ONE
    count = rounds
  elif sampling == "poisson":
    event = dp_accounting.PoissonSampledDpEvent(20 / 60, dp_accounting.GaussianDpEvent(z))
    relation, count = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE, 3 * rounds
  else:
    event = dp_accounting.SampledWithoutReplacementDpEvent(60, 20, dp_accounting.GaussianDpEvent(z / 2))
    relation, count = dp_accounting.NeighboringRelation.REPLACE_ONE, 3 * rounds
  accountant = dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)
  accountant.compose(dp_accounting.SelfComposedDpEvent(event, count))
  expected = accountant.get_epsilon(delta)
  got = privacy.example_level_epsilon(z, rounds=rounds, delta=delta, num_examples=60, batch_size=20,
                                      sampling=sampling)
  assert got == pytest.approx(expected, rel=1e-9)


def test_shuffled_epochs_off_batch_boundaries_are_charged_at_least_as_much():
  """E = 2 epochs of n = 61 in batches of 20: an example may share a batch with itself, so each round is charged
  as one Gaussian of z / (2E) -- never less than E separate Gaussians of z / 2."""
  kwargs = dict(rounds=5, delta=1e-5, batch_size=20, num_epochs=2)
  aligned = privacy.example_level_epsilon(2.0, num_examples=60, **kwargs)
  straddling = privacy.example_level_epsilon(2.0, num_examples=61, **kwargs)
  assert straddling > aligned


@pytest.mark.parametrize("build, match", [
    (lambda: ExampleDp(l2_clip=0.0, noise_multiplier=1.0), "l2_clip"),
    (lambda: ExampleDp(l2_clip=1.0, noise_multiplier=-1.0), "noise_multiplier"),
    (lambda: ExampleDp(l2_clip=1.0, noise_multiplier=1.0, per_example="loop"), "per_example"),
    (lambda: train_locally(SHARED_MODEL, optax.sgd(0.1), SHARED_MODEL.init(jax.random.key(0)), client(),
                           jax.random.key(0), example_dp=ExampleDp(1.0, 0.0, per_example="ghost")),
     "called 2 times per forward pass"),
    (lambda: fed_avg(MODEL, client_learning_rate=0.1, example_dp=(1.0, 1.0)), "ExampleDp"),
    (lambda: privacy.example_level_epsilon(1.0, rounds=1, delta=1e-5, num_examples=5, batch_size=10,
                                           sampling="without_replacement"), "batch_size <= num_examples"),
    (lambda: privacy.example_level_epsilon(1.0, rounds=1, delta=1e-5, num_examples=5, batch_size=2,
                                           sampling="uniform"), "sampling"),
])
def test_bad_arguments(build, match):
  with pytest.raises((TypeError, ValueError), match=match):
    build()


@pytest.mark.parametrize("sampling, num_epochs", [("shuffled", 1), ("shuffled", 2), ("poisson", 1)])
def test_a_privacy_ledger_reports_the_example_level_epsilon_of_a_client_in_every_round(sampling, num_epochs):
  """``run_training(privacy=PrivacyLedger(example_level_run_events(...)))`` records, after round t, the epsilon of
  a client that took part in all t rounds: the worst case of the run."""
  run = privacy.example_level_run_events(1.2, num_examples=40, batch_size=10, num_epochs=num_epochs,
                                         sampling=sampling)
  ledger = privacy.PrivacyLedger(run, delta=1e-5)
  for rounds in (1, 7):
    assert ledger.epsilon_after(rounds) == pytest.approx(privacy.example_level_epsilon(
        1.2, rounds=rounds, delta=1e-5, num_examples=40, batch_size=10, num_epochs=num_epochs, sampling=sampling),
        rel=1e-9)


class _ConvNet(nn.Module):
  """Every layer kind the batched per-layer pass handles: a SAME and a strided VALID convolution (the mapped
  per-example rule), a dense layer over a sequence of rows (the Gram rule when T^2 <= D O, else the formed one),
  LayerNorm (mapped) and a plain dense layer (the ghost rule)."""

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], 6, 6, 1)
    x = nn.relu(Conv(3, (3, 3), padding="SAME")(x))
    x = nn.relu(Conv(4, (2, 2), strides=2, padding="VALID")(x))   # [B, 3, 3, 4]
    rows = nn.tanh(nn.Dense(5)(x.reshape(x.shape[0], 9, 4)))      # T = 9, D x O = 20: the formed rule
    rows = nn.tanh(nn.Dense(40)(rows))                              # T = 9, D x O = 200: the Gram rule
    hidden = nn.LayerNorm()(rows.reshape(rows.shape[0], -1))
    return nn.Dense(3, use_bias=False)(hidden)


class _Shared(nn.Module):
  @nn.compact
  def __call__(self, x):
    layer = nn.Dense(8)
    return nn.Dense(4)(layer(jnp.tanh(layer(x))))


SHARED_MODEL = from_flax(_Shared(), jnp.zeros((1, 8)))


def test_ghost_norms_are_the_per_example_gradients_norms():
  """Independent check of every rule: ``sum_j min(1, C / ||g_j||) g_j`` from the batched pass against per-example
  gradients of the whole model (``vmap`` of ``grad`` on batches of one), in float64 arithmetic terms' tolerance."""
  model = from_flax(_ConvNet(), jnp.zeros((1, 36)))
  params = model.init(jax.random.key(1))
  rng = np.random.default_rng(0)
  batch = {"x": jnp.asarray(rng.normal(size=(6, 36)), jnp.float32), "y": jnp.asarray(rng.integers(0, 3, 6))}
  mask = jnp.array([True, True, True, True, True, False])
  layers, reason = ghost_layers(model, params, batch, mask, None)
  assert reason == "" and len(layers) == 6

  def loss_of_one(p, x, y):
    one = {"x": x[None], "y": y[None]}
    return model.loss(one, model.apply(p, one, None, True))[0]

  per_example = jax.jit(jax.vmap(jax.grad(loss_of_one), in_axes=(None, 0, 0)))(params, batch["x"][:5], batch["y"][:5])
  grads = [jax.tree.map(lambda g, j=j: np.asarray(g[j], np.float64), per_example) for j in range(5)]
  norms = np.array([np.sqrt(sum(np.sum(g**2) for g in jax.tree.leaves(grad))) for grad in grads])
  clip = float(np.median(norms))  # binds for some examples, not for others
  expected = jax.tree.map(lambda *g: sum(min(1.0, clip / n) * x for n, x in zip(norms, g)), *grads)
  clipped_sum = jax.jit(lambda p, vectorized: ghost_clipped_sum(model, p, batch, mask, None, jnp.float32(clip),
                                                                layers, vectorized=vectorized), static_argnums=1)
  total, sums = clipped_sum(params, False)
  assert int(sums["num_examples"]) == 5
  for got, want in zip(jax.tree.leaves(total), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, atol=float_atol(5 * 200, float(np.max(np.abs(want))) + 1.0))
  chex.assert_trees_all_close(clipped_sum(params, True)[0], total, atol=float_atol(5 * 200, 1.0))


def test_auto_falls_back_to_per_example_passes_when_the_model_shares_weights():
  data = client()
  params = SHARED_MODEL.init(jax.random.key(0))
  layers, reason = ghost_layers(SHARED_MODEL, params, first_batch(data), data["mask"][0], None)
  assert layers is None and "Dense_0 is called 2 times" in reason
  auto, _ = train_locally(SHARED_MODEL, optax.sgd(0.1), params, data, jax.random.key(0),
                          example_dp=ExampleDp(1.0, 0.0, per_example="auto"))
  scan, _ = train_locally(SHARED_MODEL, optax.sgd(0.1), params, data, jax.random.key(0),
                          example_dp=ExampleDp(1.0, 0.0, per_example="scan"))
  chex.assert_trees_all_close(auto, scan, atol=float_atol(4 * 4 * 100, 2.0))


def test_ghost_refuses_a_model_that_transforms_its_parameters():
  base = logistic_regression(4, (8,))
  doubled = dataclasses.replace(base, apply=lambda p, b, r, t: base.apply(jax.tree.map(lambda v: 2 * v, p), b, r, t))
  data = client()
  layers, reason = ghost_layers(doubled, PARAMS, first_batch(data), data["mask"][0], None)
  assert layers is None and "does not receive its trained parameters unchanged" in reason


@pytest.mark.parametrize("strategy", ["sequential", "vmap"])
def test_a_round_with_the_batched_pass_equals_one_with_per_example_scans(strategy):
  """The batched per-layer pass inside a FedAvg round, clients in a scan or vmapped (the accelerator default): the
  same round as with per-example scans (a deterministic model, no noise), to float rounding."""
  population = make_population(num_clients=4)
  round_data = pack_clients(population, np.array([0, 1, 2]), batch_size=4)
  results = {}
  for way in ("ghost", "scan"):
    process = fed_avg(MODEL, client_learning_rate=0.5, runner=Runner(strategy),
                      example_dp=ExampleDp(l2_clip=CLIP, noise_multiplier=0.0, per_example=way))
    results[way] = jax.jit(process.next)(process.init(PARAMS), round_data, jax.random.key(0))[0].params
  chex.assert_trees_all_close(results["ghost"], results["scan"], atol=float_atol(3 * 4 * 4 * 10, 2.0))
