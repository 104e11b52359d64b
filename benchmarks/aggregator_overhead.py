"""What an aggregator adds to the standard FedAvg round: robust, compression, secure and DP against the plain mean.

The standard workload of ``round_speed.py`` (EMNIST-shaped 28x28x1 data with 62 classes, the original FedAvg CNN,
10 clients x 200 examples, batch 20, one epoch, client SGD 0.02, server SGD 1.0), run through
``fedjax_lite.algorithms.fed_avg`` with each aggregator, in ONE process, the variants interleaved round-robin so
that machine noise hits them alike. Prints one JSON line: the median seconds per round of each variant and its
ratio to its baseline -- the weighted ``mean`` for robust/compression/secure/median, the ``unweighted_mean`` for
DP (DP-FedAvg is unweighted).

Targets (issues): robust <= 1.10x the mean, compression <= 1.25x, DP <= 1.10x the unweighted mean.

Usage: ``python benchmarks/aggregator_overhead.py [--rounds 5] [--quick] [--variants mean,robust,...]``.
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: the repository root, for ``benchmarks.cpu_setup``
  sys.path.insert(0, ROOT)
from benchmarks import cpu_setup  # noqa: E402


def build_variants(names):
  from fedjax_lite import aggregators

  factories = {
      "mean": lambda: (aggregators.mean(), "num_examples"),
      "robust": lambda: (aggregators.robust_aggregator(), "num_examples"),
      "compression": lambda: (aggregators.compression_aggregator(), "num_examples"),
      "secure": lambda: (aggregators.secure_aggregator(), "num_examples"),
      "median": lambda: (aggregators.coordinate_median(), "num_examples"),
      "unweighted_mean": lambda: (aggregators.unweighted_mean(), "uniform"),
      "dp": lambda: (aggregators.gaussian_adaptive(1.0, 10.0, clipped_count_stddev=1.0), "uniform"),
  }
  unknown = sorted(set(names) - set(factories))
  if unknown:
    raise SystemExit(f"unknown variants {unknown}; choose from {sorted(factories)}")
  return {name: factories[name]() for name in names}


BASELINE = {"robust": "mean", "compression": "mean", "secure": "mean", "median": "mean", "dp": "unweighted_mean"}
TARGET = {"robust": 1.10, "compression": 1.25, "dp": 1.10}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=5, help="timed rounds per variant (after one warm-up)")
  parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
  parser.add_argument("--variants", default="mean,robust,compression,unweighted_mean,dp")
  cpu_setup.add_argument(parser)
  args = parser.parse_args(argv)
  setup = cpu_setup.apply(args)

  from fedjax_lite import models
  from fedjax_lite.algorithms import fed_avg
  from fedjax_lite.core import FederatedData, pack_clients

  num_clients, examples, batch_size = (2, 40, 20) if args.quick else (10, 200, 20)
  rng = np.random.default_rng(0)
  images = rng.random((num_clients * examples, 28, 28, 1), dtype=np.float32)
  labels = rng.integers(0, 62, num_clients * examples).astype(np.int32)
  data = FederatedData.from_arrays({"x": images, "y": labels}, np.repeat(np.arange(num_clients), examples))
  round_data = jax.device_put(pack_clients(data, np.arange(num_clients), batch_size=batch_size))
  model = models.original_fedavg_cnn(num_classes=62)
  params = model.init(jax.random.key(0))

  names = [name.strip() for name in args.variants.split(",") if name.strip()]
  programs, states, first = {}, {}, {}
  for name, (aggregator, weighting) in build_variants(names).items():
    process = fed_avg(model, client_learning_rate=0.02, weighting=weighting, aggregator=aggregator)
    programs[name] = jax.jit(process.next)
    states[name] = process.init(params)
    start = time.perf_counter()
    states[name], _, _ = programs[name](states[name], round_data, jax.random.key(0))
    jax.block_until_ready(states[name])
    first[name] = time.perf_counter() - start

  seconds = {name: [] for name in names}
  for repetition in range(args.rounds):
    for name in names:
      start = time.perf_counter()
      states[name], metrics, _ = programs[name](states[name], round_data, jax.random.key(repetition + 1))
      jax.block_until_ready((states[name], metrics))
      seconds[name].append(time.perf_counter() - start)

  median = {name: statistics.median(values) for name, values in seconds.items()}
  ratios = {name: median[name] / median[BASELINE[name]] for name in names
            if name in BASELINE and BASELINE[name] in median}
  print(json.dumps({
      "benchmark": "aggregator_overhead", **setup,
      "workload": f"original FedAvg CNN (62 classes), {num_clients} clients x {examples} examples, batch "
                  f"{batch_size}, 1 epoch",
      "seconds_per_round": {k: round(v, 4) for k, v in median.items()},
      "all_rounds": {k: [round(x, 4) for x in v] for k, v in seconds.items()},
      "first_round_seconds": {k: round(v, 3) for k, v in first.items()},
      "ratio_to_baseline": {k: round(v, 3) for k, v in ratios.items()},
      "baseline": {k: BASELINE[k] for k in ratios},
      "target": {k: TARGET[k] for k in ratios if k in TARGET},
      "meets_target": {k: ratios[k] <= TARGET[k] for k in ratios if k in TARGET},
      "jax": jax.__version__, "backend": jax.default_backend(), "python": platform.python_version(),
      "date": time.strftime("%Y-%m-%d"),
  }))
  return 0


if __name__ == "__main__":
  sys.exit(main())
