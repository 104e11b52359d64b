"""The client runner: strategies agree, padding slots are ignored, keys are per slot, sharding over devices."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lite.core import runner as runner_module
from fedjax_lite.core.runner import Runner, client_mesh, run_clients
from tests.tolerances import float_atol


def toy_round(num_clients=7, steps=3):
  rng = np.random.default_rng(0)
  num_examples = rng.integers(1, 10, num_clients).astype(np.int32)
  num_examples[-1] = 0  # a padding slot
  return {"x": rng.normal(size=(num_clients, steps, 2)).astype(np.float32), "num_examples": num_examples}


def client_fn(broadcast, client_data, rng):
  value = broadcast * jnp.sum(client_data["x"]) + jax.random.uniform(rng)
  summand = {"value": value, "count": jnp.ones((), jnp.int32)}
  return summand, {"value": value, "key_draw": jax.random.uniform(rng)}


@pytest.mark.parametrize("strategy, mesh_devices", [
    ("sequential", None), ("sequential", 1), ("vmap", None), ("vmap", 1), ("chunked", None)])
def test_strategies_give_the_same_sum_and_per_client_values(strategy, mesh_devices):
  round_data = toy_round()
  mesh = None if mesh_devices is None else client_mesh(mesh_devices)  # a mesh deals the clients by size
  total, collected = jax.jit(
      lambda b, d, r: run_clients(client_fn, b, d, r, runner=Runner(strategy=strategy, chunk_size=3, mesh=mesh))
  )(jnp.float32(2.0), round_data, jax.random.key(5))
  # Reference, client by client.
  expected_values = []
  for k in range(7):
    data = jax.tree.map(lambda x: x[k], round_data)
    _, out = client_fn(jnp.float32(2.0), data, jax.random.fold_in(jax.random.key(5), k))
    expected_values.append(float(out["value"]))
  real = round_data["num_examples"] > 0
  np.testing.assert_allclose(np.asarray(collected["value"]), expected_values, rtol=1e-6)
  assert collected["value"].shape == (7,)
  assert int(total["count"]) == int(real.sum())  # the padding slot is not counted
  np.testing.assert_allclose(float(total["value"]), np.sum(np.array(expected_values)[real]), rtol=1e-5)


def test_pytree_of_keys_folds_every_key():
  round_data = toy_round(num_clients=3)

  def fn(broadcast, client_data, keys):
    return {"a": jax.random.uniform(keys["a"]), "b": jax.random.uniform(keys["b"])}, None

  keys = {"a": jax.random.key(1), "b": jax.random.key(2)}
  total, _ = run_clients(fn, None, round_data, keys, runner=Runner(strategy="sequential"))
  expected_a = sum(float(jax.random.uniform(jax.random.fold_in(keys["a"], k))) for k in range(2))
  assert float(total["a"]) == pytest.approx(expected_a, rel=1e-6)
  assert float(total["a"]) != pytest.approx(float(total["b"]))


def test_auto_strategy_is_sequential_on_cpu():
  assert jax.default_backend() == "cpu"
  assert Runner().resolved_strategy() == "sequential"


def test_snake_grid_deals_largest_first_in_snake_order():
  np.testing.assert_array_equal(runner_module._snake_grid(6, 2), [[0, 1], [3, 2], [4, 5]])
  # Clients of sizes 8, 7, ..., 0 (sorted) over 3 devices: totals 13, 12, 11 (round-robin would give 15, 12, 9).
  grid = runner_module._snake_grid(9, 3)
  sizes = np.arange(9)[::-1]
  np.testing.assert_array_equal(sizes[grid].sum(axis=0), [13, 12, 11])


def test_clients_dealt_by_size_come_back_in_slot_order():
  # Each client's "work" is its slot's size; a mesh (even of one device) runs the clients in by-size order, and the
  # collected outputs come back in slot order all the same.
  num_examples = np.array([5, 40, 1, 0, 33, 7, 12, 2], np.int32)
  round_data = {"x": np.arange(8, dtype=np.float32)[:, None], "num_examples": num_examples}

  def fn(broadcast, client_data, rng):
    return client_data["x"][0], (client_data["x"][0], client_data["num_examples"], jax.random.uniform(rng))

  outputs = {}
  runners = {"one_device": Runner(strategy="sequential", shard_host_devices=False),
             "mesh1": Runner(strategy="sequential", mesh=client_mesh(1))}
  for name, runner in runners.items():
    total, collected = jax.jit(lambda d, r, runner=runner: run_clients(fn, None, d, r, runner=runner))(
        round_data, jax.random.key(0))
    np.testing.assert_array_equal(collected[0], np.arange(8))
    np.testing.assert_array_equal(collected[1], num_examples)
    assert float(total) == float(np.arange(8)[num_examples > 0].sum())
    outputs[name] = np.asarray(collected[2])
  np.testing.assert_array_equal(outputs["mesh1"], outputs["one_device"])  # keys are per slot, not per position


@pytest.mark.parametrize("kwargs, match", [
    (dict(strategy="parallel"), "strategy"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(unroll=0), "unroll"),
    (dict(mesh="cpu"), "mesh"),
])
def test_runner_bad_arguments(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    Runner(**kwargs)


def test_run_clients_needs_num_examples():
  with pytest.raises(ValueError, match="num_examples"):
    run_clients(client_fn, 1.0, {"x": jnp.zeros((2, 3))}, jax.random.key(0))


def test_client_mesh_bad_size():
  with pytest.raises(ValueError, match="num_devices"):
    client_mesh(len(jax.devices()) + 1)


SHARDED_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {root!r})
    from tests.conftest import TinyMLP, make_population
    from fedjax_lite.models.adapter import from_flax
    from fedjax_lite.core.packing import pack_clients
    from fedjax_lite.core.runner import Runner, client_mesh
    from fedjax_lite.algorithms.fed_avg import fed_avg

    assert len(jax.devices()) == 4, jax.devices()
    population = make_population(num_clients=8)
    model = from_flax(TinyMLP(), np.zeros((1, 8), np.float32))
    params = model.init(jax.random.key(0))
    round_data = pack_clients(population, [0, 1, 2, 3, 4, 5], batch_size=4)  # 6 clients: not a multiple of 4
    out = {{}}
    for name, runner in [("single", Runner(strategy="sequential")),
                         ("sharded_sequential", Runner(strategy="sequential", mesh=client_mesh(4))),
                         ("sharded_vmap", Runner(strategy="vmap", mesh=client_mesh(4)))]:
      process = fed_avg(model, client_learning_rate=0.1, runner=runner)
      step = jax.jit(process.next)
      state, metrics, _ = step(process.init(params), round_data, jax.random.key(1))
      step(state, round_data, jax.random.key(2))  # round 2 takes the state in the layout round 1 returned it
      assert step._cache_size() == 1, (name, step._cache_size())  # no recompilation in round 2
      out[name] = {{"params": [np.asarray(l).tolist() for l in jax.tree.leaves(state.params)],
                   "loss": float(metrics["client_work"]["train"]["loss"]),
                   "num_examples": int(metrics["client_work"]["train"]["num_examples"])}}
    # Ragged clients dealt to the devices by size: the per-client outputs come back in slot order, under an
    # auto and an explicit mesh alike.
    from jax.sharding import AxisType
    from tests.core.test_runner import client_fn, toy_round
    toy = toy_round(num_clients=7)
    run = lambda runner: jax.jit(lambda b, d, r: run_clients(client_fn, b, d, r, runner=runner))(
        np.float32(2.0), toy, jax.random.key(5))
    from fedjax_lite.core.runner import run_clients
    explicit = jax.make_mesh((4,), ("clients",), axis_types=(AxisType.Explicit,))
    for name, runner in [("toy_single", Runner(strategy="sequential")),
                         ("toy_sharded", Runner(strategy="sequential", mesh=client_mesh(4))),
                         ("toy_explicit", Runner(strategy="sequential", mesh=explicit))]:
      total, collected = run(runner)
      out[name] = {{"total": float(total["value"]), "count": int(total["count"]),
                   "values": np.asarray(collected["value"]).tolist(),
                   "key_draws": np.asarray(collected["key_draw"]).tolist()}}
    print(json.dumps(out))
""")


def test_sharded_clients_match_single_device():
  """The client axis sharded over 4 (host) devices gives the single-device round to 1e-6."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  completed = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT.format(root=root)], env=env,
                             capture_output=True, text=True, timeout=600, cwd=root)
  assert completed.returncode == 0, completed.stderr[-3000:]
  import json
  out = json.loads(completed.stdout.strip().splitlines()[-1])
  single = out["single"]
  # 6 clients' weighted deltas summed over 4 devices in another order (float32), then divided and applied:
  # a few ulps times the terms at the parameters' scale; the loss is a sum over the round's examples.
  for name in ("sharded_sequential", "sharded_vmap"):
    for a, b in zip(out[name]["params"], single["params"]):
      b = np.array(b, np.float32)
      np.testing.assert_allclose(np.array(a), b, rtol=0, atol=float_atol(6 + 2, np.max(np.abs(b))))
    assert out[name]["num_examples"] == single["num_examples"]
    assert out[name]["loss"] == pytest.approx(
        single["loss"], abs=float_atol(single["num_examples"], abs(single["loss"])))
  # The toy round's ragged clients, dealt to the 4 devices by size: each slot's value and key come back in slot
  # order (computed the same way: equal), and the sum of the 6 real values differs only in order.
  for name in ("toy_sharded", "toy_explicit"):
    assert out[name]["values"] == out["toy_single"]["values"]
    assert out[name]["key_draws"] == out["toy_single"]["key_draws"]
    assert out[name]["count"] == out["toy_single"]["count"] == 6
    assert out[name]["total"] == pytest.approx(out["toy_single"]["total"],
                                               abs=float_atol(6, max(map(abs, out["toy_single"]["values"]))))


def test_balanced_order_deals_clients_to_devices_by_size():
  """Clients dealt largest first in snake order: every device's block gets nearly the same examples."""
  sizes = jnp.array([350, 30, 68, 306, 184, 198, 282, 105, 0, 127, 350, 0], jnp.int32)  # 12 slots, 2 padding
  order = np.asarray(runner_module._balanced_order(sizes, 4))
  assert sorted(order.tolist()) == list(range(12))  # a permutation
  blocks = np.asarray(sizes)[order].reshape(4, 3)
  # By size: 350 350 306 282 | 198 184 127 105 | 68 30 0 0, dealt in rows of 4: left to right, right to left, ...
  np.testing.assert_array_equal(blocks, [[350, 105, 68], [350, 127, 30], [306, 184, 0], [282, 198, 0]])
  # The busiest device has 523 examples; split in slot order it would have 306 + 184 + 198 = 688.
  assert blocks.sum(axis=1).max() == 523 < np.asarray(sizes).reshape(4, 3).sum(axis=1).max() == 688


@pytest.mark.parametrize("runner", [Runner("sequential"), Runner("sequential", mesh=client_mesh(1)), Runner("vmap"),
                                    Runner("chunked", chunk_size=2)],
                         ids=["sequential", "sequential_mesh1", "vmap", "chunked"])
def test_round_data_closed_over_as_numpy_under_jit(runner):
  """Regression: the by-size gather indexed closed-over NumPy round data with a tracer (TracerArrayConversionError)."""
  round_data = jax.tree.map(np.asarray, toy_round())

  @jax.jit
  def run(scale):
    return run_clients(client_fn, scale, round_data, jax.random.key(5), runner=runner)

  total, collected = run(jnp.float32(2.0))
  expected_total, expected = jax.jit(lambda scale, data: run_clients(client_fn, scale, data, jax.random.key(5),
                                                                    runner=runner))(jnp.float32(2.0), round_data)
  # Closed-over data are constants XLA may fold (another order of the 6-term sum per client): ulps x terms.
  np.testing.assert_allclose(collected["value"], expected["value"], rtol=0,
                             atol=float_atol(6 + 2, np.max(np.abs(expected["value"]))))
  assert int(total["count"]) == int(expected_total["count"])
