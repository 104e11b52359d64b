"""FedAvg: reference semantics, padding, determinism, non-finite handling, options and argument checks."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lite.aggregators.base import STACK, Aggregator, client_total
from fedjax_lite.aggregators.mean import mean
from fedjax_lite.algorithms.fed_avg import fed_avg
from fedjax_lite.core.model import masked_loss_and_metric_sums
from fedjax_lite.core.packing import ClientSpec, pack_clients
from fedjax_lite.core.runner import Runner
from fedjax_lite.training.loop import run_training

from tests.conftest import make_population


def one_round(process, params, round_data, seed=1):
  state = process.init(params)
  return jax.jit(process.next)(state, round_data, jax.random.key(seed))


def test_one_client_one_step_equals_centralized_sgd(population, tiny_model, tiny_params):
  """1 client, 1 local step, server SGD(1.0): the new model is one SGD step on that client's batch.

  The identity is exact in real arithmetic; in float32 FedAvg computes ``p - (n*(p - p1))/n`` instead of ``p1``,
  which can differ in the last bit, hence the tolerance of a few ulps.
  """
  client = population.client(0)
  size = client["x"].shape[0]
  round_data = pack_clients(population, [0], batch_size=size, shuffle=False)
  assert round_data["mask"].shape[1] == 1  # exactly one local step
  lr = 0.3
  state, metrics, _ = one_round(fed_avg(tiny_model, client_learning_rate=lr), tiny_params, round_data)

  def loss(p):
    return masked_loss_and_metric_sums(tiny_model, p, client, np.ones(size, bool), None, True)[0]

  expected = jax.tree.map(lambda p, g: p - lr * g, tiny_params, jax.grad(loss)(tiny_params))
  chex.assert_trees_all_close(state.params, expected, atol=1e-6, rtol=1e-6)
  assert int(metrics["client_work"]["train"]["num_examples"]) == size
  assert int(metrics["client_work"]["train"]["num_batches"]) == 1
  assert int(metrics["finalizer"]["update_non_finite"]) == 0


def test_weighted_mean_of_client_models(population, tiny_model, tiny_params):
  """Server SGD(1.0) lands on the example-weighted average of the clients' locally trained models."""
  spec = ClientSpec(batch_size=4, num_epochs=2)
  indices = [0, 2, 3]
  round_data = spec.pack(population, indices, seed=0, round_num=0)
  process = fed_avg(tiny_model, client_learning_rate=0.1)
  state, _, _ = one_round(process, tiny_params, round_data)
  finals, weights = [], []
  for k in range(len(indices)):
    single = jax.tree.map(lambda x: x[k:k + 1], round_data)
    single_state, _, _ = one_round(process, tiny_params, single)
    finals.append(single_state.params)
    weights.append(float(round_data["num_examples"][k]))
  weights = np.array(weights) / np.sum(weights)
  expected = jax.tree.map(lambda *ps: sum(w * p for w, p in zip(weights, ps)), *finals)
  chex.assert_trees_all_close(state.params, expected, atol=1e-6)


def test_uniform_weighting_is_unweighted_average(population, tiny_model, tiny_params):
  round_data = pack_clients(population, [0, 1, 4], batch_size=5)
  process = fed_avg(tiny_model, client_learning_rate=0.1, weighting="uniform")
  state, metrics, _ = one_round(process, tiny_params, round_data)
  finals = [one_round(process, tiny_params, jax.tree.map(lambda x: x[k:k + 1], round_data))[0].params
            for k in range(3)]
  chex.assert_trees_all_close(state.params, jax.tree.map(lambda *ps: sum(ps) / 3, *finals), atol=1e-6)
  assert set(metrics["aggregator"]) == {"mean_value", "mean_count"}


def perturb_padding(round_data, seed=0):
  rng = np.random.default_rng(seed)
  perturbed = dict(round_data)
  mask = round_data["mask"]
  x = round_data["x"].copy()
  x[~mask] = rng.normal(size=x[~mask].shape) * 100
  y = round_data["y"].copy()
  y[~mask] = rng.integers(0, 4, size=y[~mask].shape)
  perturbed["x"], perturbed["y"] = x, y
  return perturbed


@pytest.mark.parametrize("strategy", ["sequential", "vmap"])
def test_padding_values_change_nothing(population, tiny_model, tiny_params, strategy):
  round_data = pack_clients(population, [0, 1, 2], batch_size=4, num_epochs=2, num_steps=16, cohort_size=4)
  assert (~round_data["mask"]).sum() > 0
  process = fed_avg(tiny_model, client_learning_rate=0.1, runner=Runner(strategy=strategy))
  state_a, metrics_a, _ = one_round(process, tiny_params, round_data)
  state_b, metrics_b, _ = one_round(process, tiny_params, perturb_padding(round_data))
  chex.assert_trees_all_equal(state_a, state_b)
  chex.assert_trees_all_equal(metrics_a, metrics_b)


def test_padding_with_nan_changes_nothing(population, tiny_model, tiny_params):
  round_data = pack_clients(population, [0, 1], batch_size=4, num_steps=8)
  poisoned = dict(round_data)
  x = round_data["x"].copy()
  x[~round_data["mask"]] = np.nan
  poisoned["x"] = x
  process = fed_avg(tiny_model, client_learning_rate=0.1)
  state_a, metrics_a, _ = one_round(process, tiny_params, round_data)
  state_b, metrics_b, _ = one_round(process, tiny_params, poisoned)
  chex.assert_trees_all_equal(state_a, state_b)
  chex.assert_trees_all_equal(metrics_a, metrics_b)


def train(process, params, seed, rounds=5):
  data = make_population(num_clients=8)
  return run_training(process, data, params, client_spec=ClientSpec(batch_size=4), clients_per_round=3,
                      num_rounds=rounds, seed=seed, progress=False)


def test_same_seed_is_bitwise_reproducible_and_other_seed_differs(tiny_model, tiny_params):
  process = fed_avg(tiny_model, client_learning_rate=0.1)
  first = train(process, tiny_params, seed=3)
  second = train(process, tiny_params, seed=3)
  other = train(process, tiny_params, seed=4)
  chex.assert_trees_all_equal(first.state.params, second.state.params)
  assert first.history[-1]["client_work/train/loss"] == second.history[-1]["client_work/train/loss"]
  assert not np.array_equal(first.state.params["Dense_0"]["kernel"], other.state.params["Dense_0"]["kernel"])


def with_nan_client(round_data, client):
  poisoned = dict(round_data)
  x = round_data["x"].copy()
  x[client, 0, 0, 0] = np.nan
  poisoned["x"] = x
  return poisoned


def test_nan_client_is_zeroed_with_weight_zero(population, tiny_model, tiny_params):
  round_data = pack_clients(population, [0, 1, 2], batch_size=4)
  process = fed_avg(tiny_model, client_learning_rate=0.1)
  state, metrics, _ = one_round(process, tiny_params, with_nan_client(round_data, 1))
  # The same round without client 1 gives the same model: weight 0 removes it from the weighted mean.
  without = jax.tree.map(lambda x: x[np.array([0, 2])], round_data)
  expected, expected_metrics, _ = one_round(process, tiny_params, without)
  assert int(metrics["client_work"]["num_non_finite_clients"]) == 1
  assert int(metrics["finalizer"]["update_non_finite"]) == 0
  chex.assert_tree_all_finite(state.params)
  chex.assert_trees_all_close(state.params, expected.params, atol=1e-6)
  # Its metrics are reset (TFF): only the finite clients' examples are counted.
  assert int(metrics["client_work"]["train"]["num_examples"]) == int(without["num_examples"].sum())


def test_a_client_with_a_non_finite_loss_is_rejected_like_a_non_finite_update(population, tiny_model, tiny_params):
  """A label outside the model's classes gives a NaN loss but a finite gradient: before, the client trained with
  its NaN loss summed into the round's metrics and ``num_non_finite_clients`` 0 (issue #19 section 2). Now it is
  rejected and counted exactly as a client whose update is non-finite: the round equals the round without it."""
  round_data = pack_clients(population, [0, 1, 2], batch_size=4)
  poisoned = dict(round_data, y=round_data["y"].copy())
  poisoned["y"][1, 0, 0] = 42  # the tiny model has 4 classes
  process = fed_avg(tiny_model, client_learning_rate=0.1)
  state, metrics, _ = one_round(process, tiny_params, poisoned)
  # The same round with client 1's slot turned into padding (same shapes: one compilation).
  without = dict(round_data, mask=round_data["mask"].copy(), num_examples=round_data["num_examples"].copy())
  without["mask"][1], without["num_examples"][1] = False, 0
  expected, _, _ = one_round(process, tiny_params, without)
  assert int(metrics["client_work"]["num_non_finite_clients"]) == 1
  assert np.isfinite(float(metrics["client_work"]["train"]["loss"]))
  chex.assert_trees_all_close(state.params, expected.params, atol=1e-6)
  assert int(metrics["client_work"]["train"]["num_examples"]) == int(without["num_examples"].sum())


def test_all_clients_non_finite_leave_state_unchanged(population, tiny_model, tiny_params):
  round_data = pack_clients(population, [0, 1], batch_size=4)
  poisoned = with_nan_client(with_nan_client(round_data, 0), 1)
  process = fed_avg(tiny_model, client_learning_rate=0.1, server_optimizer=optax.adam(0.01))
  start = process.init(tiny_params)
  state, metrics, _ = jax.jit(process.next)(start, poisoned, jax.random.key(0))
  assert int(metrics["finalizer"]["update_non_finite"]) == 1
  assert int(metrics["client_work"]["num_non_finite_clients"]) == 2
  chex.assert_trees_all_equal(state.params, start.params)
  chex.assert_trees_all_equal(state.finalizer_state, start.finalizer_state)
  assert int(state.round_num) == 1


def test_strategies_agree(population, tiny_model, tiny_params):
  round_data = pack_clients(population, [0, 1, 2, 3, 4], batch_size=4, cohort_size=6)
  results = {}
  for strategy in ["sequential", "vmap", "chunked"]:
    process = fed_avg(tiny_model, client_learning_rate=0.1, runner=Runner(strategy=strategy, chunk_size=4))
    results[strategy] = one_round(process, tiny_params, round_data)
  for strategy in ["vmap", "chunked"]:
    chex.assert_trees_all_close(results[strategy][0].params, results["sequential"][0].params, atol=1e-6)
    chex.assert_trees_all_close(results[strategy][1], results["sequential"][1], atol=1e-5)


def test_streaming_equals_stacked_aggregation(population, tiny_model, tiny_params):
  """The same aggregator through the stack combine (the server sums the stacked contributions itself)."""
  streaming = mean()
  stacked = streaming._replace(combine=STACK,
                               server=lambda s, c, r, ctx: streaming.server(s, client_total(c, STACK), r, ctx))
  round_data = pack_clients(population, [0, 1, 2], batch_size=4)
  a = one_round(fed_avg(tiny_model, client_learning_rate=0.1, aggregator=streaming), tiny_params, round_data)
  b = one_round(fed_avg(tiny_model, client_learning_rate=0.1, aggregator=stacked), tiny_params, round_data)
  chex.assert_trees_all_close(a[0].params, b[0].params, atol=1e-7)


def test_client_learning_rate_schedule_by_round(population, tiny_model, tiny_params):
  schedule = optax.join_schedules([optax.constant_schedule(0.0), optax.constant_schedule(0.2)], [1])
  process = fed_avg(tiny_model, client_learning_rate=schedule)  # 0.0 in round 0, 0.2 from round 1
  round_data = pack_clients(population, [0, 1], batch_size=4)
  state = process.init(tiny_params)
  step = jax.jit(process.next)
  state, metrics0, _ = step(state, round_data, jax.random.key(0))
  chex.assert_trees_all_close(state.params, tiny_params)  # learning rate 0: nothing moves
  assert float(metrics0["client_work"]["learning_rate"]) == 0.0
  state, metrics1, _ = step(state, round_data, jax.random.key(1))
  assert float(metrics1["client_work"]["learning_rate"]) == pytest.approx(0.2)
  assert not np.allclose(state.params["Dense_0"]["kernel"], tiny_params["Dense_0"]["kernel"])


def test_server_midpoint(population, tiny_model, tiny_params):
  round_data = pack_clients(population, [0, 1, 2], batch_size=4)
  full, _, _ = one_round(fed_avg(tiny_model, client_learning_rate=0.1), tiny_params, round_data)
  half, _, _ = one_round(fed_avg(tiny_model, client_learning_rate=0.1, server_midpoint_fraction=0.5), tiny_params,
                      round_data)
  chex.assert_trees_all_close(half.params, jax.tree.map(lambda a, b: (a + b) / 2, tiny_params, full.params),
                              atol=1e-6)


def test_client_gradient_clipping_bounds_the_step(population, tiny_model, tiny_params):
  size = population.client_sizes[0]
  round_data = pack_clients(population, [0], batch_size=int(size))
  lr, clip = 1.0, 1e-3
  state, _, _ = one_round(fed_avg(tiny_model, client_learning_rate=lr, client_grad_clip_norm=clip), tiny_params,
                       round_data)
  moved = optax.tree.norm(jax.tree.map(jnp.subtract, state.params, tiny_params))
  assert float(moved) == pytest.approx(lr * clip, rel=1e-3)


def test_optax_transformation_as_client_optimizer(population, tiny_model, tiny_params):
  round_data = pack_clients(population, [0, 1], batch_size=4)
  a, _, _ = one_round(fed_avg(tiny_model, client_optimizer=optax.sgd(0.1)), tiny_params, round_data)
  b, _, _ = one_round(fed_avg(tiny_model, client_learning_rate=0.1), tiny_params, round_data)
  chex.assert_trees_all_equal(a.params, b.params)


def test_metrics_groups(population, tiny_model, tiny_params):
  round_data = pack_clients(population, [0, 1], batch_size=4, num_epochs=3)
  _, metrics, _ = one_round(fed_avg(tiny_model, client_learning_rate=0.1), tiny_params, round_data)
  assert set(metrics) == {"distributor", "client_work", "aggregator", "finalizer", "broadcasted_bits",
                          "aggregated_bits"}
  num_params = sum(leaf.size for leaf in jax.tree.leaves(tiny_params))
  assert int(metrics["broadcasted_bits"]) == 2 * (32 * num_params + 32)  # model + learning rate, 2 clients
  assert int(metrics["aggregated_bits"]) == 2 * (32 * num_params + 32)  # weighted delta + weight
  train = metrics["client_work"]["train"]
  assert set(train) == {"loss", "accuracy", "num_examples", "num_batches"}
  assert int(train["num_examples"]) == 3 * int(population.client_sizes[0] + population.client_sizes[1])
  assert int(train["num_batches"]) == int(round_data["mask"].any(-1).sum())
  assert 0.0 <= float(train["accuracy"]) <= 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(client_learning_rate=-0.1), "learning_rate"),
        (dict(client_learning_rate=float("nan")), "learning_rate"),
        (dict(), "learning rate is required"),
        (dict(client_optimizer=optax.sgd(0.1), client_learning_rate=0.1), "client_learning_rate"),
        (dict(client_optimizer="sgd", client_learning_rate=0.1), "client_optimizer"),
        (dict(client_learning_rate=0.1, server_optimizer="adam"), "server_optimizer"),
        (dict(client_learning_rate=0.1, weighting="examples"), "weighting"),
        (dict(client_learning_rate=0.1, aggregator="mean"), "aggregator"),
        (dict(client_learning_rate=0.1, client_grad_clip_norm=0.0), "client_grad_clip_norm"),
        (dict(client_learning_rate=0.1, server_midpoint_fraction=0.0), "server_midpoint_fraction"),
        (dict(client_learning_rate=0.1, server_midpoint_fraction=1.5), "server_midpoint_fraction"),
        (dict(client_learning_rate=0.1, runner="vmap"), "runner"),
    ],
)
def test_bad_arguments(tiny_model, kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    fed_avg(tiny_model, **kwargs)


def test_bad_model_and_params(tiny_model):
  with pytest.raises(TypeError, match="model"):
    fed_avg(object(), client_learning_rate=0.1)
  process = fed_avg(tiny_model, client_learning_rate=0.1)
  with pytest.raises(TypeError, match="params"):
    process.init({"w": jnp.zeros(3, jnp.int32)})
  with pytest.raises(ValueError, match="params"):
    process.init({})
