"""Example-level DP-SGD inside a client against plain local training: seconds per local epoch, interleaved.

One client's local epoch (``fedjax_lite.algorithms.train_locally``, jitted): 200 EMNIST-shaped examples (28x28x1,
62 classes), batch 20, 10 SGD steps at 0.02, without DP and with ``ExampleDp(l2_clip=1.0, noise_multiplier=1.0)``
computed three ways (``per_example='ghost'``, the default for these models: one batched pass with per-layer norms;
``'scan'`` and ``'vmap'``: per-example passes). The four programs run alternately (``--repeats`` rounds of the
four after one warm-up each); the report is each ratio of medians to plain (target: <= 2x), in wall
time and in the process's CPU time (steadier on a shared machine). Models:
``--model cnn`` (the original FedAvg CNN, 1.69M parameters), ``logistic`` (48,670 parameters) or ``both``;
``--quick`` shrinks the epoch to 40 examples (a smoke test). Prints one JSON line.

  python benchmarks/example_dp.py [--model both] [--repeats 15]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: the repository root, for ``benchmarks.*``
  sys.path.insert(0, ROOT)
from benchmarks import cpu_setup  # noqa: E402
from benchmarks.report import cpu_model, emit  # noqa: E402

TARGET = 2.0


def one_client(num_examples: int, batch_size: int):
  from fedjax_lite.core import FederatedData, pack_clients

  rng = np.random.default_rng(0)
  images = rng.random((num_examples, 28, 28, 1), dtype=np.float32)
  labels = rng.integers(0, 62, num_examples).astype(np.int32)
  data = FederatedData.from_arrays({"x": images, "y": labels}, np.zeros(num_examples, np.int64))
  return jax.device_put(jax.tree.map(lambda x: x[0], pack_clients(data, [0], batch_size=batch_size)))


def time_model(name: str, args) -> dict:
  import optax

  from fedjax_lite import models
  from fedjax_lite.algorithms import ExampleDp, train_locally

  model = (models.original_fedavg_cnn(num_classes=62) if name == "cnn"
           else models.logistic_regression(num_classes=62))
  params = model.init(jax.random.key(0))
  client = one_client(40 if args.quick else 200, 20)
  variants = {"plain": None, **{f"example_dp_{way}": ExampleDp(l2_clip=1.0, noise_multiplier=1.0, per_example=way)
                                for way in ("ghost", "scan", "vmap")}}
  programs = {key: jax.jit(lambda p, c, r, dp=dp: train_locally(model, optax.sgd(0.02), p, c, r, example_dp=dp))
              for key, dp in variants.items()}
  first = {}
  for key, program in programs.items():
    start = time.perf_counter()
    jax.block_until_ready(program(params, client, jax.random.key(0)))
    first[key] = time.perf_counter() - start
  seconds = {key: [] for key in programs}
  cpu_seconds = {key: [] for key in programs}  # the process's CPU time: less sensitive to other jobs' load
  for repeat in range(args.repeats):
    for key, program in programs.items():
      start, cpu_start = time.perf_counter(), time.process_time()
      jax.block_until_ready(program(params, client, jax.random.key(repeat + 1)))
      seconds[key].append(time.perf_counter() - start)
      cpu_seconds[key].append(time.process_time() - cpu_start)
  median = {key: statistics.median(values) for key, values in seconds.items()}
  cpu_median = {key: statistics.median(values) for key, values in cpu_seconds.items()}
  ratios = {k: round(median[k] / median["plain"], 3) for k in median if k != "plain"}
  cpu_ratios = {k: round(cpu_median[k] / cpu_median["plain"], 3) for k in cpu_median if k != "plain"}
  return {"parameters": sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params)),
          "seconds_per_epoch": {k: round(v, 4) for k, v in median.items()},
          "all_epochs": {k: [round(x, 4) for x in v] for k, v in seconds.items()},
          "first_call_seconds": {k: round(v, 3) for k, v in first.items()},
          "cpu_seconds_per_epoch": {k: round(v, 4) for k, v in cpu_median.items()},
          "ratio_to_plain": ratios, "cpu_time_ratio_to_plain": cpu_ratios,
          "best_meets_target": min(ratios.values()) <= TARGET}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", choices=("cnn", "logistic", "both"), default="both")
  parser.add_argument("--repeats", type=int, default=15, help="timed rounds of the four programs")
  parser.add_argument("--quick", action="store_true", help="40 examples per epoch, for a smoke test")
  parser.add_argument("--output", default=None, help="also append the JSON line to this file")
  cpu_setup.add_argument(parser)
  args = parser.parse_args(argv)
  if args.repeats < 1:
    parser.error("--repeats must be >= 1")
  setup = cpu_setup.apply(args)
  names = ("logistic", "cnn") if args.model == "both" else (args.model,)
  emit({"benchmark": "example_dp", **setup, "cpu": cpu_model(),
        "workload": f"one client, {40 if args.quick else 200} examples 28x28x1, batch 20, 1 epoch, SGD 0.02",
        "models": {name: time_model(name, args) for name in names}, "target": TARGET,
        "jax": jax.__version__, "backend": jax.default_backend(), "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d")}, args.output)


if __name__ == "__main__":
  main()
