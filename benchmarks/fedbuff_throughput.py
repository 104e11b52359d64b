"""FedBuff's throughput in client updates per second against synchronous FedAvg at the same cohort size, on CPU.

Issue 20's target: FedBuff (``algorithms.fed_buff`` driven by ``training.run_fed_buff``: the event order planned
on the host from FedScale-like log-normal client systems, one jitted server step per ``K`` arrivals, each trained
from its own version in the ring) processes at least 0.9x the client updates per second of synchronous FedAvg
with ``K`` = the cohort size (``algorithms.fed_avg``, sample, pack, one jitted round per cohort: what
``run_training`` does).

Workload: EMNIST-shaped data (28x28x1, 62 classes, seeded numpy), the original FedAvg CNN, a population of 100
clients of 40 to 80 examples, batch 20, one epoch, client SGD 0.02, server SGD 1.0; cohort = ``K`` = 10, FedBuff's
concurrency 20 and max staleness 8 (log-normal speeds: the arrivals are stale by 0-3 versions, none is dropped at
these sizes, so both do the same device work per client). ``--model mlp`` swaps the CNN for a 2-layer MLP (cheaper
client work, so per-step overheads weigh more).

Both run blocks of ``--block`` rounds (FedAvg) or server steps (FedBuff) continuing their own state, interleaved
ABBA in ONE process so machine noise hits them alike; each block ends when its results (the state, and every
step's metrics flattened on the host, as ``run_training`` records them) are on the host. Prints one
JSON line: the median client updates per second of each and the ratio FedBuff / FedAvg (the issue's measure), and
the same for local examples per second: FedBuff's arrivals lean towards the clients that finish sooner, often the
smaller ones, so its updates can be cheaper than a uniform cohort's, and the examples' ratio is the measure of the
machinery's own cost.

Usage: ``python benchmarks/fedbuff_throughput.py [--blocks 6] [--block 4] [--quick]``.
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
if ROOT not in sys.path:  # run as a script: the repository root, for ``benchmarks.cpu_setup``
  sys.path.insert(0, ROOT)
from benchmarks import cpu_setup  # noqa: E402
from benchmarks import report as report_helpers  # noqa: E402

TARGET = 0.9


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--blocks", type=int, default=6, help="timed blocks per algorithm (after one warm-up each)")
  parser.add_argument("--block", type=int, default=4, help="rounds / server steps per block")
  parser.add_argument("--model", choices=("cnn", "mlp"), default="cnn")
  parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
  parser.add_argument("--output", help="also append the JSON line to this file")
  cpu_setup.add_argument(parser)
  args = parser.parse_args(argv)
  setup = cpu_setup.apply(args)

  import flax.linen as nn

  from fedjax_lite import algorithms, models, systems
  from fedjax_lite.core import ClientSpec, FederatedData, sample_clients
  from fedjax_lite.core.device_rounds import round_key
  from fedjax_lite.training import flatten_metrics, run_fed_buff

  num_clients, cohort, concurrency, sizes = (12, 3, 6, (20, 40)) if args.quick else (100, 10, 20, (40, 80))
  batch_size, max_staleness = 20, 8
  rng = np.random.default_rng(0)
  client_sizes = rng.integers(sizes[0], sizes[1] + 1, num_clients)
  total = int(client_sizes.sum())
  data = FederatedData.from_arrays(
      {"x": rng.random((total, 28, 28, 1), dtype=np.float32), "y": rng.integers(0, 62, total).astype(np.int32)},
      np.repeat(np.arange(num_clients), client_sizes))
  spec = ClientSpec(batch_size=batch_size)
  num_steps = spec.max_num_steps(data)
  if args.model == "cnn" and not args.quick:
    model = models.original_fedavg_cnn(num_classes=62)
  else:
    class MLP(nn.Module):
      @nn.compact
      def __call__(self, x, train: bool = False):
        return nn.Dense(62)(nn.relu(nn.Dense(200)(x.reshape((x.shape[0], -1)))))

    model = models.from_flax(MLP(), np.zeros((1, 28, 28, 1), np.float32))
  params = model.init(jax.random.key(0))

  fed_avg = algorithms.fed_avg(model, client_learning_rate=0.02)
  fed_avg_step = jax.jit(fed_avg.next)
  fed_buff = algorithms.fed_buff(model, concurrency=concurrency, buffer_size=cohort, max_staleness=max_staleness,
                                 client_learning_rate=0.02)
  population = systems.lognormal_systems(num_clients, seed=0)
  base_key = jax.random.key(0)
  avg = {"state": fed_avg.init(params), "round": 0}
  buff = {"run": None}

  def fed_avg_block(rounds):
    """``rounds`` FedAvg rounds (sample, pack, dispatch; the host packs while the device works); the client
    updates applied (real clients)."""
    updates, pending = 0, []
    state = avg["state"]
    for _ in range(rounds):
      r = avg["round"]
      clients = sample_clients(num_clients, cohort, seed=0, round_num=r)
      packed = spec.pack(data, clients, seed=0, round_num=r, num_steps=num_steps, cohort_size=cohort)
      state, metrics, _ = fed_avg_step(state, packed, round_key(base_key, r))
      pending.append(metrics)
      updates += int(np.count_nonzero(packed["num_examples"]))
      avg["examples"] = avg.get("examples", 0) + int(packed["num_examples"].sum())
      avg["round"] = r + 1
    history = [flatten_metrics(jax.device_get(metrics)) for metrics in pending]  # as run_fed_buff returns them
    jax.block_until_ready(state)
    avg["state"], avg["history"] = state, history
    return updates

  def fed_buff_block(steps):
    """``steps`` FedBuff server steps continuing the run; the client updates applied."""
    previous = buff["run"]
    if previous is None:
      run = run_fed_buff(fed_buff, data, params, client_spec=spec, seed=0, num_server_steps=steps,
                         systems=population, num_steps=num_steps)
    else:
      run = run_fed_buff(fed_buff, data, params, client_spec=spec, seed=0,
                         num_server_steps=previous.schedule.steps_taken + steps, num_steps=num_steps,
                         state=previous.state, schedule=previous.schedule)
    jax.block_until_ready(run.state)
    buff["run"] = run
    buff.setdefault("history", []).extend(run.history)
    buff["examples"] = buff.get("examples", 0) + sum(int(r["client_work/train/num_examples"]) for r in run.history)
    return sum(int(record["fedbuff/num_applied"]) for record in run.history)

  blocks = {"fed_avg": fed_avg_block, "fed_buff": fed_buff_block}
  first = {}
  for name, block in blocks.items():  # warm-up: compiles
    start = time.perf_counter()
    block(1)
    first[name] = time.perf_counter() - start
  rates = {name: [] for name in blocks}
  example_rates = {name: [] for name in blocks}
  counters = {"fed_avg": avg, "fed_buff": buff}
  for index in range(args.blocks):
    order = list(blocks) if index % 2 == 0 else list(blocks)[::-1]  # ABBA
    for name in order:
      examples_before = counters[name].get("examples", 0)
      start = time.perf_counter()
      updates = blocks[name](args.block)
      seconds = time.perf_counter() - start
      rates[name].append(updates / seconds)
      example_rates[name].append((counters[name]["examples"] - examples_before) / seconds)

  median = {name: statistics.median(values) for name, values in rates.items()}
  median_examples = {name: statistics.median(values) for name, values in example_rates.items()}
  history = buff["history"]
  ratio = median["fed_buff"] / median["fed_avg"]
  report = {
      "benchmark": "fedbuff_throughput", **setup,
      "workload": f"{args.model if not args.quick else 'mlp'} (62 classes), cohort = K = {cohort}, FedBuff "
                  f"concurrency {concurrency}, max staleness {max_staleness}, {num_clients} clients of "
                  f"{sizes[0]}-{sizes[1]} examples, batch {batch_size}, 1 epoch, log-normal systems",
      "client_updates_per_second": {k: round(v, 3) for k, v in median.items()},
      "all_blocks": {k: [round(x, 3) for x in v] for k, v in rates.items()},
      "first_block_seconds": {k: round(v, 3) for k, v in first.items()},
      "ratio_fed_buff_to_fed_avg": round(ratio, 4),
      "examples_per_second": {k: round(v, 2) for k, v in median_examples.items()},
      "examples_ratio_fed_buff_to_fed_avg": round(median_examples["fed_buff"] / median_examples["fed_avg"], 4),
      "fed_buff_mean_staleness": round(float(np.mean([r["fedbuff/mean_staleness"] for r in history])), 3),
      "fed_buff_dropped_stale": int(sum(r["fedbuff/dropped_stale"] for r in history)),
      "fed_buff_simulated_hours": round(float(history[-1]["fedbuff/elapsed_hours"]), 4),
      "target": TARGET, "meets_target": ratio >= TARGET,
      "jax": jax.__version__, "backend": jax.default_backend(), "cpu": report_helpers.cpu_model(),
      "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
  }
  report_helpers.emit(report, args.output)
  return 0


if __name__ == "__main__":
  sys.exit(main())
