"""Property tests (hypothesis) for the client runner, ``fedjax_lite.core.runner.run_clients``.

Every strategy -- sequential (on one device, and on a mesh of one device, which runs the clients in by-size
order), vmap, chunked with chunk sizes 1, 2, 3 and 5 -- and, in one subprocess with 4 forced host devices, meshes
of 1, 2 and 4 devices, on ragged cohorts (each client a random number
of examples, padding slots with ``num_examples == 0`` holding NaN/Inf garbage) must give:

* the same per-client outputs: every slot's random key is ``fold_in(key, slot)`` whatever the strategy, so the
  random draws are bit for bit those of a direct call, and the per-client sums equal float64 NumPy to the rounding
  of their ``E + 1`` terms;
* the same sum over real clients: to the rounding of the sum in another order (``tests/tolerances.py``: ulps x
  terms x the sum of the terms' magnitudes), integer counts exactly, padding never counted and never NaN.

Runners are compiled once per (runner, number of slots); hypothesis draws the contents, derandomized.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp  # noqa: F401 (used by the exec'd client_fn)
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedjax_lite.core.runner import Runner, client_mesh, run_clients
from tests.tolerances import float_atol

EXAMPLES = 4  # generated cohorts per (runner, cohort size)
MAX_EXAMPLES_PER_CLIENT = 6
FEATURES = 3
RUNNERS = {
    "sequential": Runner("sequential"),
    "sequential_mesh1": Runner("sequential", mesh=client_mesh(1)),
    "vmap": Runner("vmap"),
    "chunk1": Runner("chunked", chunk_size=1),
    "chunk2": Runner("chunked", chunk_size=2),
    "chunk3": Runner("chunked", chunk_size=3),
    "chunk5": Runner("chunked", chunk_size=5),
}
SLOTS = (5, 8)  # 5: not a multiple of any chunk size but 1 and 5
GARBAGE = (np.nan, np.inf, -np.inf)

CLIENT_FN_SOURCE = '''
def client_fn(broadcast, data, key):
  """One client: a masked sum over its examples of ``x * scale + shift`` plus a uniform draw from its key."""
  valid = (jnp.arange(data["x"].shape[0]) < data["num_examples"])[:, None]
  noise = jax.random.uniform(key, (data["x"].shape[1],))
  s = jnp.sum(jnp.where(valid, data["x"] * broadcast["scale"] + broadcast["shift"], 0.0), axis=0) + noise
  summand = {"s": s, "count": data["num_examples"]}
  return summand, {"s": s, "noise": noise, "n": data["num_examples"]}
'''
exec(CLIENT_FN_SOURCE)  # defines client_fn here; the mesh subprocess runs the same source.

_COMPILED: dict = {}


def compiled(runner_name: str):
  if runner_name not in _COMPILED:
    runner = RUNNERS[runner_name]
    _COMPILED[runner_name] = jax.jit(
        lambda broadcast, data, rng: run_clients(client_fn, broadcast, data, rng, runner=runner))  # noqa: F821
  return _COMPILED[runner_name]


@st.composite
def cohorts(draw, slots: int):
  """Ragged client sizes in [0, E] (0 = padding slot, garbage in its features), features in [-4, 4]."""
  sizes = draw(hnp.arrays(np.int32, (slots,), elements=st.integers(0, MAX_EXAMPLES_PER_CLIENT)))
  x = draw(hnp.arrays(np.float32, (slots, MAX_EXAMPLES_PER_CLIENT, FEATURES), elements=st.floats(-4, 4, width=32)))
  for slot in np.flatnonzero(sizes == 0):
    x[slot] = draw(st.sampled_from(GARBAGE))
  scale = np.float32(draw(st.sampled_from([0.5, 1.0, -3.0])))
  shift = np.float32(draw(st.sampled_from([0.0, 0.25, -1.5])))
  seed = draw(st.integers(0, 2**16))
  return {"num_examples": sizes, "x": x}, {"scale": scale, "shift": shift}, seed


def reference(data, broadcast, seed):
  """Per-client float64 sums, their magnitudes, and the exact draws ``uniform(fold_in(key, slot))``."""
  key = jax.random.key(seed)
  sizes, x = data["num_examples"], np.asarray(data["x"], np.float64)
  slots = sizes.shape[0]
  noise = np.stack([np.asarray(jax.random.uniform(jax.random.fold_in(key, k), (FEATURES,))) for k in range(slots)])
  valid = (np.arange(x.shape[1])[None, :] < sizes[:, None])[:, :, None]
  terms = np.where(valid, x * float(broadcast["scale"]) + float(broadcast["shift"]), 0.0)
  s = terms.sum(axis=1) + noise
  magnitude = np.abs(terms).sum(axis=1) + np.abs(noise)  # [slots, features]
  return s, magnitude, noise


def check(out, data, broadcast, seed, label=""):
  """The runner's output against the reference (see the module docstring for the tolerances)."""
  total, collected = out
  sizes = np.asarray(data["num_examples"])
  real = sizes > 0
  s, magnitude, noise = reference(data, broadcast, seed)
  got_noise = np.asarray(collected["noise"])
  np.testing.assert_array_equal(got_noise[real], noise[real].astype(np.float32), err_msg=f"{label} draws")
  np.testing.assert_array_equal(np.asarray(collected["n"]), sizes, err_msg=f"{label} collected counts")
  per_client = np.asarray(collected["s"], np.float64)
  for k in np.flatnonzero(real):
    np.testing.assert_allclose(per_client[k], s[k], rtol=0,
                               atol=float_atol(MAX_EXAMPLES_PER_CLIENT + 1, magnitude[k].max()),
                               err_msg=f"{label} client {k}")
  assert int(total["count"]) == int(sizes.sum()), label
  expected_total = s[real].sum(axis=0)
  total_scale = magnitude[real].sum(axis=0).max(initial=0.0)
  terms = len(sizes) * (MAX_EXAMPLES_PER_CLIENT + 1)
  got_total = np.asarray(total["s"], np.float64)
  assert np.all(np.isfinite(got_total)), f"{label}: padding leaked into the sum"
  np.testing.assert_allclose(got_total, expected_total, rtol=0, atol=float_atol(terms, total_scale),
                             err_msg=f"{label} total")


@pytest.mark.parametrize("slots", SLOTS)
@pytest.mark.parametrize("runner_name", list(RUNNERS))
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_strategy_gives_the_same_round(runner_name, slots, data):
  """Per-client outputs, draws and the real-client sum of a ragged cohort, for every strategy."""
  cohort, broadcast, seed = data.draw(cohorts(slots))
  out = compiled(runner_name)(broadcast, cohort, jax.random.key(seed))
  check(out, cohort, broadcast, seed, label=runner_name)


MESH_SCRIPT = textwrap.dedent('''
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    sys.path.insert(0, {root!r})
    from fedjax_lite.core.runner import Runner, client_mesh, run_clients
    {client_fn}
    assert len(jax.devices()) == 4, jax.devices()
    cases = np.load({cases!r})
    results = {{}}
    compiled = {{}}  # one program per (devices, runner); the cases share the cohort size
    for case in range(int(cases["num_cases"])):
      data = {{"num_examples": cases[f"sizes{{case}}"], "x": cases[f"x{{case}}"]}}
      broadcast = {{"scale": cases[f"scale{{case}}"], "shift": cases[f"shift{{case}}"]}}
      for devices in (1, 2, 4):
        for name, runner in (("sequential", Runner("sequential", mesh=client_mesh(devices))),
                             ("vmap", Runner("vmap", mesh=client_mesh(devices))),
                             ("chunk2", Runner("chunked", chunk_size=2, mesh=client_mesh(devices)))):
          if (devices, name) not in compiled:
            compiled[devices, name] = jax.jit(
                lambda b, d, r, runner=runner: run_clients(client_fn, b, d, r, runner=runner))
          total, collected = compiled[devices, name](broadcast, data, jax.random.key(int(cases[f"seed{{case}}"])))
          results[f"{{case}}/{{devices}}/{{name}}"] = {{
              "total_s": np.asarray(total["s"]).tolist(), "total_count": int(total["count"]),
              "s": np.asarray(collected["s"]).tolist(), "noise": np.asarray(collected["noise"]).tolist(),
              "n": np.asarray(collected["n"]).tolist()}}
    print(json.dumps(results))
''')
MESH_CASES = 4
MESH_SLOTS = 7  # padded to 8 slots on 2 and 4 devices


def test_meshes_of_1_2_4_host_devices_give_the_same_round(tmp_path):
  """ONE subprocess with 4 forced host devices: 4 ragged cohorts of 7 slots (the client axis is padded to the
  device count) x meshes of 1, 2 and 4 devices x the sequential, vmap and chunked (size 2) runners."""
  rng = np.random.default_rng(20261130)
  cases, arrays = [], {"num_cases": MESH_CASES}
  for case in range(MESH_CASES):
    slots = MESH_SLOTS
    sizes = rng.integers(0, MAX_EXAMPLES_PER_CLIENT + 1, slots).astype(np.int32)
    sizes[rng.integers(slots)] = 0  # at least one padding slot
    x = rng.uniform(-4, 4, (slots, MAX_EXAMPLES_PER_CLIENT, FEATURES)).astype(np.float32)
    x[sizes == 0] = np.nan
    broadcast = {"scale": np.float32(rng.choice([0.5, -3.0])), "shift": np.float32(rng.choice([0.0, 0.25]))}
    seed = int(rng.integers(2**16))
    arrays.update({f"sizes{case}": sizes, f"x{case}": x, f"scale{case}": broadcast["scale"],
                   f"shift{case}": broadcast["shift"], f"seed{case}": seed})
    cases.append(({"num_examples": sizes, "x": x}, broadcast, seed))
  cases_path = str(tmp_path / "cases.npz")
  np.savez(cases_path, **arrays)
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  script = MESH_SCRIPT.format(root=root, cases=cases_path, client_fn=CLIENT_FN_SOURCE)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  completed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600,
                             cwd=root)
  assert completed.returncode == 0, completed.stderr[-3000:]
  results = json.loads(completed.stdout.strip().splitlines()[-1])
  assert len(results) == MESH_CASES * 3 * 3
  for label, result in results.items():
    data, broadcast, seed = cases[int(label.split("/")[0])]
    out = ({"s": np.asarray(result["total_s"], np.float32), "count": result["total_count"]},
           {"s": np.asarray(result["s"], np.float32), "noise": np.asarray(result["noise"], np.float32),
            "n": np.asarray(result["n"])})
    check(out, data, broadcast, seed, label=label)
