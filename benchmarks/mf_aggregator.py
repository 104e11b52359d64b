"""Matrix-factorization DP-FTRL against the Gaussian DP mechanism: seconds per aggregation step and per full round.

Default: the server part of a round on an EMNIST-CNN-sized value (1.2M float32 parameters, 10 clients), each
aggregator's jitted ``next`` timed in interleaved repetitions (median ratio). The aggregation step only. BLT: 2
buffers (a fixed BLT of jax_privacy's optimizer); banded: each of ``--bands`` band widths.

``--full-round``: a whole FedAvg round (the workload of ``aggregator_overhead.py``: EMNIST-shaped 28x28x1 data, 62
classes, the original FedAvg CNN, 10 clients x 200 examples, batch 20, one epoch, client SGD 0.02, server SGD 1.0),
``fedjax_lite.algorithms.fed_avg``'s jitted round with the Gaussian DP mean (``gaussian_fixed``), BLT (2 buffers)
and BandMF with each of ``--bands`` band widths, interleaved round-robin in one process; the ratio of medians to the
Gaussian round (target: BLT <= 1.1x) and BandMF's cost per band width. Prints one JSON line. Needs the [dp_mf] extra.

  python benchmarks/mf_aggregator.py [--repeats 15] [--bands 2,4,8,16]
  python benchmarks/mf_aggregator.py --full-round [--repeats 7] [--bands 2,4,8,16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: the repository root, for ``benchmarks.cpu_setup``
  sys.path.insert(0, ROOT)
from benchmarks import cpu_setup  # noqa: E402

BLT = ([0.9842298634927619, 0.7270931425682697], [0.1706081571013166, 0.3102560932438474])
BLT_TARGET = 1.10


def banded_coefficients(bands: int) -> list[float]:
  """A ``bands``-banded Toeplitz strategy (non-negative, non-increasing; the values do not change the cost)."""
  return list(np.linspace(1.0, 0.2, bands))


def aggregation_step(args) -> None:
  from fedjax_lite import aggregators

  values = {"w": jax.random.normal(jax.random.key(0), (10, args.size))}
  builds = {
      "gaussian": aggregators.gaussian_fixed(1.0, 10.0, 1.0),
      "identity": aggregators.dp_matrix_factorization(1.0, 10.0, "identity", num_rounds=100, clip=1.0),
      "blt": aggregators.dp_matrix_factorization(1.0, 10.0, "blt", num_rounds=100, clip=1.0, blt_parameters=BLT),
  }
  for bands in args.bands:
    builds[f"banded_{bands}"] = aggregators.dp_matrix_factorization(
        1.0, 10.0, "banded", num_rounds=100, clip=1.0, min_separation=bands, coefficients=banded_coefficients(bands))
  steps, states = {}, {}
  for name, aggregator in builds.items():
    steps[name] = jax.jit(aggregator.next)
    states[name] = aggregator.init({"w": jnp.zeros(args.size)})
    jax.block_until_ready(steps[name](states[name], values, jnp.ones(10), jax.random.key(1)).result)
  times = {name: [] for name in builds}
  for repeat in range(args.repeats):
    for name in builds:
      start = time.perf_counter()
      out = steps[name](states[name], values, jnp.ones(10), jax.random.key(repeat))
      jax.block_until_ready(out.result)
      times[name].append(time.perf_counter() - start)
      states[name] = out.state
  base = np.median(times["gaussian"])
  for name in builds:
    print(f"{name:9s} {np.median(times[name]) * 1e3:8.1f} ms   {np.median(times[name]) / base:5.2f}x the Gaussian")


def full_round(args) -> None:
  from fedjax_lite import aggregators, models
  from fedjax_lite.algorithms import fed_avg

  from benchmarks.aggregator_overhead import standard_workload

  model, params, round_data, description = standard_workload(args.quick)
  if args.quick:  # the smoke test: a model that compiles fast, on the same data
    model = models.dense_softmax(num_classes=62)
    params = model.init(jax.random.key(0))
    description = "softmax regression (62 classes), " + description.split(", ", 1)[1]
  num_clients = int(round_data["num_examples"].shape[0])

  m = float(num_clients)
  variants = {"gaussian": aggregators.gaussian_fixed(1.0, m, 1.0),
              "blt": aggregators.dp_matrix_factorization(1.0, m, "blt", num_rounds=100, clip=1.0, blt_parameters=BLT)}
  for bands in args.bands:
    variants[f"banded_{bands}"] = aggregators.dp_matrix_factorization(
        1.0, m, "banded", num_rounds=100, clip=1.0, min_separation=bands, coefficients=banded_coefficients(bands))
  programs, states, first = {}, {}, {}
  for name, aggregator in variants.items():
    process = fed_avg(model, client_learning_rate=0.02, weighting="uniform", aggregator=aggregator)
    programs[name] = jax.jit(process.next)
    states[name] = process.init(params)
    start = time.perf_counter()
    states[name], _, _ = programs[name](states[name], round_data, jax.random.key(0))
    jax.block_until_ready(states[name])
    first[name] = time.perf_counter() - start
  seconds = {name: [] for name in variants}
  for repetition in range(args.repeats):
    for name in variants:
      start = time.perf_counter()
      states[name], metrics, _ = programs[name](states[name], round_data, jax.random.key(repetition + 1))
      jax.block_until_ready((states[name], metrics))
      seconds[name].append(time.perf_counter() - start)
  median = {name: statistics.median(values) for name, values in seconds.items()}
  ratios = {name: median[name] / median["gaussian"] for name in variants}
  num_parameters = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
  print(json.dumps({
      "benchmark": "mf_aggregator_full_round", **args.setup,
      "workload": f"{description}; {num_parameters} parameters",
      "seconds_per_round": {k: round(v, 4) for k, v in median.items()},
      "all_rounds": {k: [round(x, 4) for x in v] for k, v in seconds.items()},
      "first_round_seconds": {k: round(v, 3) for k, v in first.items()},
      "ratio_to_gaussian": {k: round(v, 3) for k, v in ratios.items()},
      "banded_extra_per_band": (round((ratios[f"banded_{max(args.bands)}"] - ratios[f"banded_{min(args.bands)}"])
                                      / (max(args.bands) - min(args.bands)), 4) if len(args.bands) > 1 else None),
      "blt_target": BLT_TARGET, "blt_meets_target": ratios["blt"] <= BLT_TARGET,
      "jax": jax.__version__, "backend": jax.default_backend(), "python": platform.python_version(),
      "date": time.strftime("%Y-%m-%d"),
  }))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=None, help="timed repetitions (default 15; 7 full rounds)")
  parser.add_argument("--size", type=int, default=1_200_000, help="aggregation step: the value's float32 entries")
  parser.add_argument("--full-round", action="store_true", help="time whole FedAvg rounds instead (module doc)")
  parser.add_argument("--bands", default="2,4,8,16", help="BandMF band widths, a comma list")
  parser.add_argument("--quick", action="store_true",
                      help="--full-round at tiny sizes with softmax regression, for a smoke test")
  cpu_setup.add_argument(parser)
  args = parser.parse_args(argv)
  try:
    args.bands = sorted({int(text) for text in args.bands.split(",") if text.strip()})
  except ValueError:
    parser.error(f"--bands must be a comma list of integers, got {args.bands!r}")
  if not args.bands or min(args.bands) < 1:
    parser.error("--bands must list band widths >= 1")
  if args.full_round:
    args.setup = cpu_setup.apply(args)
    args.repeats = 7 if args.repeats is None else args.repeats
    full_round(args)
  else:
    args.repeats = 15 if args.repeats is None else args.repeats
    aggregation_step(args)


if __name__ == "__main__":
  main()
