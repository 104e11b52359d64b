"""What an aggregator adds to the standard FedAvg round: robust, compression, secure and DP against the plain mean.

The standard workload of ``round_speed.py`` (EMNIST-shaped 28x28x1 data with 62 classes, the original FedAvg CNN,
10 clients x 200 examples, batch 20, one epoch, client SGD 0.02, server SGD 1.0), run through
``fedjax_lite.algorithms.fed_avg`` with each aggregator, in ONE process, the variants interleaved round-robin so
that machine noise hits them alike. Prints one JSON line: the median seconds per round of each variant and its
ratio to its baseline -- the weighted ``mean`` for robust/compression/secure/median, the ``unweighted_mean`` for
DP (DP-FedAvg is unweighted).

Targets (issues): robust <= 1.10x the mean, compression <= 1.25x, DP <= 1.10x the unweighted mean.

``--secure-before CHECKOUT`` compares instead the ``secure_aggregator`` round of this tree with the same round of
another checkout of the library (e.g. ``git worktree add /tmp/before <commit>``): child processes, one per
(code, repetition), alternate between the two codes; each child traces and lowers the round, compiles it and
times ``--rounds`` steps, for the secure round and for the plain ``mean`` round (its in-process baseline). Prints
one JSON line with the medians over repetitions and the after/before ratios.

Usage: ``python benchmarks/aggregator_overhead.py [--rounds 5] [--quick] [--variants mean,robust,...]``,
``python benchmarks/aggregator_overhead.py --secure-before /tmp/before [--repetitions 3] [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_ENV = "AGGREGATOR_OVERHEAD_SOURCE"  # a --secure-before child: import fedjax_lite from this checkout
for path in (ROOT, os.environ.get(SOURCE_ENV)):  # run as a script: the repository root, for ``benchmarks.cpu_setup``
  if path and path not in sys.path:
    sys.path.insert(0, path)
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


def standard_workload(quick: bool):
  """``(model, params, round_data, workload description)`` of the standard workload (tiny with ``quick``)."""
  from fedjax_lite import models
  from fedjax_lite.core import FederatedData, pack_clients

  num_clients, examples, batch_size = (2, 40, 20) if quick else (10, 200, 20)
  rng = np.random.default_rng(0)
  images = rng.random((num_clients * examples, 28, 28, 1), dtype=np.float32)
  labels = rng.integers(0, 62, num_clients * examples).astype(np.int32)
  data = FederatedData.from_arrays({"x": images, "y": labels}, np.repeat(np.arange(num_clients), examples))
  round_data = jax.device_put(pack_clients(data, np.arange(num_clients), batch_size=batch_size))
  model = models.original_fedavg_cnn(num_classes=62)
  description = (f"original FedAvg CNN (62 classes), {num_clients} clients x {examples} examples, batch "
                 f"{batch_size}, 1 epoch")
  return model, model.init(jax.random.key(0)), round_data, description


def time_secure_round(args) -> dict:
  """A --secure-before child: trace+lower, compile and step times of the secure and the mean rounds, with the
  fedjax_lite this process imports."""
  import fedjax_lite
  from fedjax_lite import aggregators
  from fedjax_lite.algorithms import fed_avg

  model, params, round_data, _ = standard_workload(args.quick)
  report = {"fedjax_lite": os.path.dirname(os.path.dirname(os.path.abspath(fedjax_lite.__file__)))}
  for name, aggregator in (("secure", aggregators.secure_aggregator()), ("mean", aggregators.mean())):
    process = fed_avg(model, client_learning_rate=0.02, aggregator=aggregator)
    state = process.init(params)
    start = time.perf_counter()
    lowered = jax.jit(process.next).lower(state, round_data, jax.random.key(0))
    traced = time.perf_counter()
    compiled = lowered.compile()
    report[f"{name}_lower_s"], report[f"{name}_compile_s"] = traced - start, time.perf_counter() - traced
    steps = []
    for repetition in range(args.rounds + 1):  # the first (warm-up) step is not timed
      start = time.perf_counter()
      state = jax.block_until_ready(compiled(state, round_data, jax.random.key(repetition))[0])
      steps.append(time.perf_counter() - start)
    report[f"{name}_step_s"] = statistics.median(steps[1:])
  return report


def compare_secure(args, setup: dict) -> dict:
  """Alternates child processes between ``args.secure_before`` and this tree; medians per code and ratios."""
  codes = {"before": os.path.abspath(args.secure_before), "after": ROOT}
  child_args = ["--secure-child", "--rounds", str(args.rounds)] + (["--quick"] if args.quick else []) + (
      ["--jax-defaults"] if args.jax_defaults else [])
  runs = {label: [] for label in codes}
  for repetition in range(args.repetitions):
    for label in (("before", "after") if repetition % 2 == 0 else ("after", "before")):
      env = {**os.environ, SOURCE_ENV: codes[label]}
      completed = subprocess.run([sys.executable, os.path.abspath(__file__), *child_args], env=env,
                                 capture_output=True, text=True, check=True)
      report = json.loads(completed.stdout.strip().splitlines()[-1])
      if os.path.realpath(report.pop("fedjax_lite")) != os.path.realpath(codes[label]):
        raise SystemExit(f"the {label} child imported fedjax_lite from the wrong checkout")
      runs[label].append(report)
  keys = sorted(key for key in runs["after"][0] if key.endswith("_s"))
  median = {label: {key: round(statistics.median(run[key] for run in runs[label]), 3) for key in keys}
            for label in codes}
  ratio = {key: round(median["after"][key] / median["before"][key], 3) for key in keys}
  for label in codes:  # the secure round's step time relative to the mean round's, in the same process
    median[label]["secure_step_over_mean_step"] = round(statistics.median(
        run["secure_step_s"] / run["mean_step_s"] for run in runs[label]), 3)
  return {"benchmark": "aggregator_overhead/secure_before_after", **setup, "before": codes["before"],
          "repetitions": args.repetitions, "median": median, "after_over_before": ratio,
          "all_runs": runs}


def run_variants(args, setup: dict) -> dict:
  """The aggregators of ``--variants`` through the same round, interleaved; medians and ratios to baselines."""
  from fedjax_lite.algorithms import fed_avg

  model, params, round_data, description = standard_workload(args.quick)

  names = [name.strip() for name in args.variants.split(",") if name.strip()]
  programs, states, first = {}, {}, {}
  for name, (aggregator, weighting) in build_variants(names).items():
    process = fed_avg(model, client_learning_rate=0.02, weighting=weighting, aggregator=aggregator)
    programs[name] = jax.jit(process.next)
    states[name] = process.init(params)
    start = time.perf_counter()
    states[name] = jax.block_until_ready(programs[name](states[name], round_data, jax.random.key(0))[0])
    first[name] = time.perf_counter() - start

  seconds = {name: [] for name in names}
  for repetition in range(args.rounds):
    for name in names:
      start = time.perf_counter()
      output = jax.block_until_ready(programs[name](states[name], round_data, jax.random.key(repetition + 1)))
      states[name] = output[0]
      seconds[name].append(time.perf_counter() - start)

  median = {name: statistics.median(values) for name, values in seconds.items()}
  ratios = {name: median[name] / median[BASELINE[name]] for name in names
            if name in BASELINE and BASELINE[name] in median}
  return {
      "benchmark": "aggregator_overhead", **setup,
      "workload": description,
      "seconds_per_round": {k: round(v, 4) for k, v in median.items()},
      "all_rounds": {k: [round(x, 4) for x in v] for k, v in seconds.items()},
      "first_round_seconds": {k: round(v, 3) for k, v in first.items()},
      "ratio_to_baseline": {k: round(v, 3) for k, v in ratios.items()},
      "baseline": {k: BASELINE[k] for k in ratios},
      "target": {k: TARGET[k] for k in ratios if k in TARGET},
      "meets_target": {k: ratios[k] <= TARGET[k] for k in ratios if k in TARGET},
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=5, help="timed rounds per variant (after one warm-up)")
  parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
  parser.add_argument("--variants", default="mean,robust,compression,unweighted_mean,dp")
  parser.add_argument("--secure-before", metavar="CHECKOUT",
                      help="compare the secure_aggregator round with the one of this checkout of the library")
  parser.add_argument("--repetitions", type=int, default=3, help="child processes per code (--secure-before)")
  parser.add_argument("--secure-child", action="store_true", help=argparse.SUPPRESS)
  cpu_setup.add_argument(parser)
  args = parser.parse_args(argv)
  if args.secure_before:  # the children configure the CPU themselves
    setup = {"configure_cpu": not args.jax_defaults}
    result = compare_secure(args, setup)
  else:
    setup = cpu_setup.apply(args)
    result = time_secure_round(args) if args.secure_child else run_variants(args, setup)
  print(json.dumps({**result, "jax": jax.__version__, "backend": jax.default_backend(),
                    "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
