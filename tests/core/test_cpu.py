"""``configure_cpu``: one XLA:CPU device per core, and the default runner sharding the clients over them.

The device settings apply only before JAX starts its backend, so the positive checks run in a fresh subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

import fedjax_lite
from fedjax_lite.core import Runner, cpu
from fedjax_lite.training import cli

CHILD = textwrap.dedent("""
    import json, os
    import fedjax_lite
    configured = fedjax_lite.configure_cpu(2)

    import jax, numpy as np
    from fedjax_lite.algorithms import fed_avg
    from fedjax_lite.core import Runner, pack_clients
    from tests.conftest import TinyMLP, make_population
    from fedjax_lite.models import from_flax
    from tests.tolerances import float_atol

    model = from_flax(TinyMLP(), np.zeros((1, 8), np.float32))
    params = model.init(jax.random.key(0))
    round_data = pack_clients(make_population(num_clients=5), [0, 1, 2, 3, 4], batch_size=4)
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration"
        else None)
    results = {}
    for name, runner in (("sharded", Runner()), ("one_device", Runner(shard_host_devices=False))):
      process = fed_avg(model, client_learning_rate=0.1, runner=runner)
      step = jax.jit(process.next)
      state = process.init(params)
      state, _, _ = step(state, round_data, jax.random.key(1))
      first_round = jax.tree.map(np.asarray, state.params)
      before = len(compiles)
      state, _, _ = step(state, round_data, jax.random.key(2))
      results[name] = (first_round, len(compiles) - before)
    difference = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(results["sharded"][0]),
                                                                   jax.tree.leaves(results["one_device"][0])))
    scale = max(float(np.max(np.abs(a))) for a in jax.tree.leaves(results["one_device"][0]))
    print(json.dumps({
        "configured": configured, "devices": jax.local_device_count(), "xla_flags": os.environ["XLA_FLAGS"],
        "mesh_size": Runner().resolved_mesh().size,
        "round2_compiles": results["sharded"][1], "difference": difference,
        "tolerance": float_atol(num_terms=5 + 2, scale=scale),
    }))
""")


def test_configure_cpu_sets_devices_and_the_default_runner_shards_over_them():
  completed = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300,
                             cwd=str(cli_root()))
  assert completed.returncode == 0, completed.stderr[-3000:]
  report = json.loads(completed.stdout.strip().splitlines()[-1])
  assert report["configured"] == 2 and report["devices"] == 2
  assert "--xla_cpu_multi_thread_eigen=false" in report["xla_flags"]
  # The compile-time flag only where this jaxlib has it (an unknown flag would have aborted the child).
  assert (cpu.COMPILE_FLAG in report["xla_flags"]) == cpu.compile_flag_supported()
  assert report["mesh_size"] == 2
  assert report["round2_compiles"] == 0  # the state is placed on the mesh: round 2 reuses round 1's program
  # Round 1 on both: the 5 clients' weighted deltas summed in another order (two device partial sums), then the
  # division and the server step: float32 rounding of a 7-term computation at the parameters' scale.
  assert report["difference"] <= report["tolerance"], report


def cli_root():
  import pathlib

  return pathlib.Path(__file__).resolve().parents[2]


def test_compile_flag_only_on_jaxlibs_that_have_it():
  assert cpu.compile_flag_supported("0.10.2") and cpu.compile_flag_supported("0.10.0")
  assert not cpu.compile_flag_supported("0.12.1")  # XLA aborts on it there ("Unknown flag in XLA_FLAGS")
  assert not cpu.compile_flag_supported("0.11.0")  # unchecked: left alone
  assert not cpu.compile_flag_supported("dev")  # unparsable: left alone
  import jaxlib

  assert cpu.compile_flag_supported() == cpu.compile_flag_supported(jaxlib.__version__)


@pytest.mark.parametrize("fast_compile", [True, False])
def test_fast_compile_false_keeps_the_fusion_emitters(monkeypatch, fast_compile):
  """The flags configure_cpu writes (the backend and jax.config stubbed: this process's JAX is already running)."""
  monkeypatch.setattr(cpu, "backend_initialized", lambda: False)
  monkeypatch.setattr(cpu, "compile_flag_supported", lambda: True)
  monkeypatch.setattr(cpu.jax.config, "update", lambda *args: None)
  monkeypatch.setenv("XLA_FLAGS", "")
  assert fedjax_lite.configure_cpu(2, fast_compile=fast_compile) == 2
  flags = os.environ["XLA_FLAGS"].split()
  assert cpu.EIGEN_FLAG in flags and (cpu.COMPILE_FLAG in flags) == fast_compile


def test_too_late_is_a_clear_error():
  jnp.zeros(1).block_until_ready()  # JAX's backend is running in this process
  assert cpu.backend_initialized()
  with pytest.raises(RuntimeError, match="before JAX initializes its backend"):
    fedjax_lite.configure_cpu()


def test_arguments_are_checked_first():
  with pytest.raises(ValueError, match="num_devices"):
    fedjax_lite.configure_cpu(0)
  with pytest.raises(TypeError, match="fast_compile must be True or False"):
    fedjax_lite.configure_cpu(2, fast_compile="no")
  with pytest.raises(TypeError, match="shard_host_devices"):
    Runner(shard_host_devices="yes")


def test_the_default_runner_follows_the_devices():
  """One CPU device (the suite without configure_cpu): no mesh, one scan. Several (the suite run with
  ``XLA_FLAGS=--xla_force_host_platform_device_count=N``): the client axis over all of them."""
  mesh = Runner().resolved_mesh()
  if jax.local_device_count() == 1:
    assert mesh is None
  else:
    assert mesh.size == jax.local_device_count()
  assert Runner(shard_host_devices=False).resolved_mesh() is None
  assert cpu.usable_cores() >= 1


def test_cli_cpu_devices_errors(capsys):
  jnp.zeros(1).block_until_ready()
  other = jax.local_device_count() + 1  # a count JAX is not running with
  assert cli.main(["train", "--rounds", "1", "--cpu-devices", str(other)]) == 2
  assert f"--cpu-devices {other} must take effect before JAX starts" in capsys.readouterr().err
  assert cli.main(["train", "--cpu-devices", "2", "--coordinator-address", "localhost:1234", "--num-processes",
                   "2", "--process-id", "0"]) == 2
  assert "--cpu-devices applies to one-process runs" in capsys.readouterr().err
