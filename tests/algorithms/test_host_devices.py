"""Every algorithm on several host CPU devices (what ``fedjax_lite.configure_cpu`` sets up): the default runner
shards the clients over them, and round 2 runs round 1's program (the initial state is placed in the layout a
sharded round returns it in). Mime's state was not, and it compiled its round twice (found by
``benchmarks/algorithm_overhead.py``).

The device count applies only before JAX starts its backend, so the rounds run in a fresh subprocess.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import textwrap

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent("""
    import json
    import fedjax_lite
    fedjax_lite.configure_cpu(2)

    import jax, numpy as np, optax
    from fedjax_lite import algorithms
    from fedjax_lite.core import Runner, pack_clients
    from fedjax_lite.models import from_flax
    from tests.conftest import TinyMLP, make_population

    model = from_flax(TinyMLP(), np.zeros((1, 8), np.float32))
    params = model.init(jax.random.key(0))
    population = make_population(num_clients=5)
    round_data = pack_clients(population, [0, 1, 2, 3, 4], batch_size=4)
    builders = {
        "fed_avg": lambda: algorithms.fed_avg(model, client_learning_rate=0.1),
        "fed_prox": lambda: algorithms.fed_prox(model, 0.01, client_learning_rate=0.1),
        "fed_avgm": lambda: algorithms.fed_avgm(model, client_learning_rate=0.1),
        "fed_adam": lambda: algorithms.fed_adam(model, server_learning_rate=0.01, client_learning_rate=0.1),
        "fed_sgd": lambda: algorithms.fed_sgd(model),
        "mime_lite": lambda: algorithms.mime_lite(model, optax.sgd(0.1, momentum=0.9)),
        "mime": lambda: algorithms.mime(model, optax.sgd(0.1, momentum=0.9)),
        "scaffold": lambda: algorithms.scaffold(model, num_clients=5, client_learning_rate=0.1),
        "dp_fed_avg": lambda: algorithms.dp_fed_avg(model, noise_multiplier=0.5, num_clients=5,
                                                    expected_clients_per_round=5, delta=1e-3,
                                                    client_learning_rate=0.1, clip=1.0).process,
    }
    report = {"mesh_size": int(Runner().resolved_mesh().size)}
    for name, build in builders.items():
      process = build()
      step = jax.jit(process.next)
      state = process.init(params)
      client_states = None
      if process.client_state is not None:  # SCAFFOLD: every client's control variate starts at zero
        zeros = jax.tree.map(np.asarray, process.client_state(params))
        client_states = jax.tree.map(lambda x: np.stack([x] * 5), zeros)
      for round_num in range(3):
        state = step(state, round_data, jax.random.key(round_num), client_states).state
      jax.block_until_ready(state)
      finite = all(bool(np.all(np.isfinite(np.asarray(leaf)))) for leaf in jax.tree.leaves(state.params))
      report[name] = {"compilations": step._cache_size(), "finite": finite}
    print(json.dumps(report))
""")


def test_every_algorithm_compiles_its_round_once_on_two_host_devices():
  completed = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=600,
                             cwd=str(REPO_ROOT))
  assert completed.returncode == 0, completed.stderr[-3000:]
  report = json.loads(completed.stdout.strip().splitlines()[-1])
  assert report.pop("mesh_size") == 2
  for name, result in report.items():
    assert result == {"compilations": 1, "finite": True}, (name, result)
