"""Matrix-factorization DP-FTRL aggregator against the Gaussian DP aggregator: seconds per aggregation step.

The server part of a round on an EMNIST-CNN-sized value (1.2M float32 parameters, 10 clients), each aggregator's
jitted ``next`` timed in interleaved repetitions (median ratio). The aggregation step only: a full round adds the
clients' local training, which both share, so the round's ratio is closer to 1. BLT: 2 buffers (a fixed BLT of
jax_privacy's optimizer); banded: 4 bands. Needs the [dp_mf] extra.

  python benchmarks/mf_aggregator.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lite import aggregators

BLT = ([0.9842298634927619, 0.7270931425682697], [0.1706081571013166, 0.3102560932438474])


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--size", type=int, default=1_200_000)
  args = parser.parse_args()
  values = {"w": jax.random.normal(jax.random.key(0), (10, args.size))}
  builds = {
      "gaussian": aggregators.gaussian_fixed(1.0, 10.0, 1.0),
      "identity": aggregators.dp_matrix_factorization(1.0, 10.0, "identity", num_rounds=100, clip=1.0),
      "blt": aggregators.dp_matrix_factorization(1.0, 10.0, "blt", num_rounds=100, clip=1.0, blt_parameters=BLT),
      "banded": aggregators.dp_matrix_factorization(1.0, 10.0, "banded", num_rounds=100, clip=1.0, min_separation=4,
                                                    coefficients=[0.75, 0.5, 0.3, 0.2]),
  }
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


if __name__ == "__main__":
  main()
