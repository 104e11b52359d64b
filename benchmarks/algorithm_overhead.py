"""What each algorithm costs per round against FedAvg, on the standard workload, in ONE process.

The standard workload of ``round_speed.py`` (EMNIST-shaped 28x28x1 data with 62 classes, the original FedAvg CNN,
10 clients x 200 examples, batch 20, one epoch, client SGD 0.02), run through every algorithm's ``Process``; the
variants are interleaved round-robin so machine noise hits them alike. SCAFFOLD's rounds include the host-side
gather of the cohort's control variates from a :class:`fedjax_lite.core.ClientStateStore` and the scatter back
(as ``run_training`` does). Also reported: the store's bytes for 10,000 clients of the CNN's control variates (from
the bytes per client: 10,000 x 6.65 MB does not fit in this machine's memory; ``ClientStateStore(directory=...)``
memory-maps such a store), and the gather + scatter time as a share of SCAFFOLD's round (median and max over the
timed rounds). Ratios are medians over the repetitions; ``ratio_min_q1_q3_max`` gives the spread of the ratio
within one repetition (variants run back to back), which on a shared machine is wide.

Partitioned rounds (issue 21): FedPer with part of the CNN local (kept per client in a ``ClientStateStore``,
gathered and scattered around each round like SCAFFOLD's control variates) against the same round with every
parameter global (FedAvg): ``fedper_head`` keeps the output layer local (31,806 parameters, 1.9%), ``fedper_dense``
both dense layers (1,637,950, 97%). The CNN cannot be split in half at layer granularity (its first dense kernel
is 95% of it); the cost of a partition grows with the local bytes moved, so the two bracket a half-local model.

Targets (issue 8): FedProx <= 1.05x FedAvg, SCAFFOLD <= 1.25x (with gather/scatter), MimeLite <= 1.3x; (issue 21)
a partitioned round <= 1.05x the all-global one.

Usage: ``python benchmarks/algorithm_overhead.py [--rounds 5] [--quick] [--variants fedavg,fedprox,...]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import os
import sys
import time

import jax
import numpy as np
import optax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: the repository root, for ``benchmarks.cpu_setup``
  sys.path.insert(0, ROOT)
from benchmarks import cpu_setup  # noqa: E402

TARGET = {"fedprox": 1.05, "scaffold": 1.25, "mimelite": 1.3, "fedper_head": 1.05, "fedper_dense": 1.05}
VARIANTS = ("fedavg", "fedprox", "scaffold", "mimelite", "mime", "fedadam", "fedsgd", "fedper_head", "fedper_dense")
LOCAL_LAYERS = {"fedper_head": ("Dense_1",), "fedper_dense": ("Dense_0", "Dense_1")}


def local_layers(names):
  """FedPer's labels: the layers ``names`` local, the rest global."""
  return lambda path: "local" if path[0] in names else "global"


def build(name, model, population):
  from fedjax_lite import algorithms

  lr = 0.02
  return {
      "fedavg": lambda: algorithms.fed_avg(model, client_learning_rate=lr),
      "fedprox": lambda: algorithms.fed_prox(model, 0.01, client_learning_rate=lr),
      "scaffold": lambda: algorithms.scaffold(model, num_clients=population, client_learning_rate=lr),
      "mimelite": lambda: algorithms.mime_lite(model, optax.sgd(lr, momentum=0.9)),
      "mime": lambda: algorithms.mime(model, optax.sgd(lr, momentum=0.9)),
      "fedadam": lambda: algorithms.fed_adam(model, server_learning_rate=0.003, client_learning_rate=lr),
      "fedsgd": lambda: algorithms.fed_sgd(model),
      "fedper_head": lambda: algorithms.fed_per(model, local_layers(LOCAL_LAYERS["fedper_head"]),
                                                client_learning_rate=lr),
      "fedper_dense": lambda: algorithms.fed_per(model, local_layers(LOCAL_LAYERS["fedper_dense"]),
                                                 client_learning_rate=lr),
  }[name]()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=5, help="timed rounds per variant (after one warm-up)")
  parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  cpu_setup.add_argument(parser)
  args = parser.parse_args(argv)
  setup = cpu_setup.apply(args)

  from fedjax_lite import models
  from fedjax_lite.core import ClientStateStore, FederatedData, pack_clients

  num_clients, examples, batch_size = (2, 40, 20) if args.quick else (10, 200, 20)
  # The store for 10,000 clients of the CNN's control variates is ~66 GB (reported from its size, below); the timed
  # run keeps a population of 200 (1.3 GB) in memory -- gather/scatter cost depends on the cohort, not the population.
  population = 10 if args.quick else 200
  rng = np.random.default_rng(0)
  images = rng.random((num_clients * examples, 28, 28, 1), dtype=np.float32)
  labels = rng.integers(0, 62, num_clients * examples).astype(np.int32)
  data = FederatedData.from_arrays({"x": images, "y": labels}, np.repeat(np.arange(num_clients), examples))
  round_data = jax.device_put(pack_clients(data, np.arange(num_clients), batch_size=batch_size))
  model = models.original_fedavg_cnn(num_classes=62)
  params = model.init(jax.random.key(0))

  names = [name.strip() for name in args.variants.split(",") if name.strip()]
  unknown = sorted(set(names) - set(VARIANTS))
  if unknown:
    raise SystemExit(f"unknown variants {unknown}; choose from {VARIANTS}")
  programs, states, stores, first = {}, {}, {}, {}
  cohort_rng = np.random.default_rng(1)
  gather_scatter = {}

  def one_round(name, key):
    if name not in stores:
      states[name], metrics, _ = programs[name](states[name], round_data, key)
      return metrics
    cohort = cohort_rng.choice(population, num_clients, replace=False)
    start = time.perf_counter()
    gathered = jax.device_put(stores[name].gather(cohort, num_clients))
    moved = time.perf_counter() - start
    states[name], metrics, new_states = programs[name](states[name], round_data, key, gathered)
    new_states = jax.device_get(new_states)
    start = time.perf_counter()
    stores[name].scatter(cohort, new_states, np.asarray(round_data["num_examples"]))
    gather_scatter.setdefault(name, []).append(moved + time.perf_counter() - start)
    return metrics

  for name in names:
    process = build(name, model, population)
    programs[name] = jax.jit(process.next)
    states[name] = process.init(params)
    if process.client_state is not None:
      stores[name] = ClientStateStore(jax.device_get(process.client_state(params)), population)
    start = time.perf_counter()
    jax.block_until_ready(one_round(name, jax.random.key(0)))
    first[name] = time.perf_counter() - start
  gather_scatter = {}

  seconds = {name: [] for name in names}
  for repetition in range(args.rounds):
    for name in names:
      start = time.perf_counter()
      jax.block_until_ready((one_round(name, jax.random.key(repetition + 1)), states[name]))
      seconds[name].append(time.perf_counter() - start)

  median = {name: statistics.median(values) for name, values in seconds.items()}
  ratios = {name: median[name] / median["fedavg"] for name in names if "fedavg" in median}
  # The spread: the ratio within each repetition (the variants of one repetition ran back to back), its range and
  # quartiles over the repetitions.
  per_repetition = {name: [t / f for t, f in zip(seconds[name], seconds["fedavg"])] for name in ratios}
  spread = {name: [round(min(values), 3), round(float(np.percentile(values, 25)), 3),
                   round(float(np.percentile(values, 75)), 3), round(max(values), 3)]
            for name, values in per_repetition.items()}
  result = {
      "benchmark": "algorithm_overhead",
      "workload": f"original FedAvg CNN (62 classes), {num_clients} clients x {examples} examples, batch "
                  f"{batch_size}, 1 epoch",
      "seconds_per_round": {k: round(v, 4) for k, v in median.items()},
      "first_round_seconds": {k: round(v, 3) for k, v in first.items()},
      "ratio_to_fedavg": {k: round(v, 3) for k, v in ratios.items()},
      "ratio_min_q1_q3_max": spread,
      "target": {k: TARGET[k] for k in ratios if k in TARGET},
      "meets_target": {k: ratios[k] <= TARGET[k] for k in ratios if k in TARGET},
      "jax": jax.__version__, "backend": jax.default_backend(), "python": platform.python_version(),
      "date": time.strftime("%Y-%m-%d"), **setup,
  }
  if "scaffold" in stores:
    per_client = stores["scaffold"].nbytes // population
    result["client_state_store"] = {
        "population": population, "bytes": stores["scaffold"].nbytes, "bytes_per_client": per_client,
        "bytes_for_10000_clients": 10_000 * per_client,
        "gather_scatter_seconds": round(statistics.median(gather_scatter["scaffold"]), 4),
        "gather_scatter_seconds_max": round(max(gather_scatter["scaffold"]), 4),
        "share_of_scaffold_round": round(statistics.median(gather_scatter["scaffold"]) / median["scaffold"], 4)}
  for name in [n for n in names if n in LOCAL_LAYERS]:  # the partitioned rounds' local part and its traffic
    local = sum(int(np.size(leaf)) for layer in LOCAL_LAYERS[name] for leaf in jax.tree.leaves(params[layer]))
    result.setdefault("partitioned", {})[name] = {
        "local_params": local, "local_fraction": round(local / sum(int(np.size(x)) for x in jax.tree.leaves(params)), 4),
        "store_bytes_per_client": stores[name].nbytes // population,
        "gather_scatter_seconds": round(statistics.median(gather_scatter[name]), 4),
        "share_of_round": round(statistics.median(gather_scatter[name]) / median[name], 4)}
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
