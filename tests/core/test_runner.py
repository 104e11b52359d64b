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

from fedjax_lite.core.runner import Runner, client_mesh, run_clients


def toy_round(num_clients=7, steps=3):
  rng = np.random.default_rng(0)
  num_examples = rng.integers(1, 10, num_clients).astype(np.int32)
  num_examples[-1] = 0  # a padding slot
  return {"x": rng.normal(size=(num_clients, steps, 2)).astype(np.float32), "num_examples": num_examples}


def client_fn(broadcast, client_data, rng):
  value = broadcast * jnp.sum(client_data["x"]) + jax.random.uniform(rng)
  summand = {"value": value, "count": jnp.ones((), jnp.int32)}
  return summand, {"value": value, "key_draw": jax.random.uniform(rng)}


@pytest.mark.parametrize("strategy", ["sequential", "vmap", "chunked"])
def test_strategies_give_the_same_sum_and_per_client_values(strategy):
  round_data = toy_round()
  total, collected = jax.jit(
      lambda b, d, r: run_clients(client_fn, b, d, r, runner=Runner(strategy=strategy, chunk_size=3))
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
    from fedjax_lite.core.model import from_flax
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
      state, metrics = jax.jit(process.next)(process.init(params), round_data, jax.random.key(1))
      out[name] = {{"params": [np.asarray(l).tolist() for l in jax.tree.leaves(state.params)],
                   "loss": float(metrics["client_work"]["train"]["loss"]),
                   "num_examples": int(metrics["client_work"]["train"]["num_examples"])}}
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
  for name in ("sharded_sequential", "sharded_vmap"):
    for a, b in zip(out[name]["params"], single["params"]):
      np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-6, rtol=0)
    assert out[name]["num_examples"] == single["num_examples"]
    assert out[name]["loss"] == pytest.approx(single["loss"], abs=1e-6)
