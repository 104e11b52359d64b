"""FedAvg on non-IID handwritten digits: rounds to reach a target test accuracy, IID vs label-skewed splits.

Reproduces, at the scale of scikit-learn's 8x8 digits, the experiment of McMahan et al. 2017 ("Communication-
Efficient Learning of Deep Networks from Decentralized Data", arXiv:1602.05629, Table 2): the number of
communication rounds FedAvg needs to reach a target test accuracy, on an IID split and on pathological non-IID
splits, for 1 and 5 local epochs. Three splits of the 1,438 training digits into 50 clients
(``fedjax_lite.datasets.load_digits``):

* ``iid``: uniformly random, 28-29 examples per client;
* ``dirichlet``: label proportions per class drawn from Dirichlet(0.5) (Hsu et al. 2019), sizes 5-62 and more;
* ``shards``: McMahan's split, label-sorted shards, 2 per client (most clients see 2 digits).

Model and training (defaults): McMahan's "2NN" shrunk to the 64-pixel input, an MLP 64-128-10; FedAvg with 10 of
the 50 clients per round, client SGD (learning rate 0.05, batch 10, E local epochs), server SGD 1.0, test accuracy
on the held-out 20% after every round. Each seed ``s`` sets the test split, the partition, the initialization and
the cohorts (``load_digits(seed=s)``, ``run_training(seed=s)``).

Usage (from the repository root)::

  python experiments/noniid_digits.py --output-dir runs/noniid_digits    # 5 seeds x 3 splits x E in {1, 5}
  python experiments/noniid_digits.py --fast --output-dir /tmp/noniid    # a tiny smoke run (1 seed, 5 rounds)

Writes to ``--output-dir``: ``results.csv`` (one row per split, E and seed: rounds to the target, final and best
accuracy, seconds), ``curves.csv`` (test accuracy of every round of every run), ``summary.json`` (configuration,
per-setting summary, wall time) and ``noniid_digits.png`` (accuracy curves); prints a table.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
import time

PARTITIONS = ("iid", "dirichlet", "shards")


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--output-dir", default="runs/noniid_digits", help="where the CSV, JSON and PNG go")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
  parser.add_argument("--partitions", nargs="+", choices=PARTITIONS, default=list(PARTITIONS))
  parser.add_argument("--local-epochs", type=int, nargs="+", default=[1, 5])
  parser.add_argument("--rounds", type=int, default=200, help="rounds per run (curves are kept whole)")
  parser.add_argument("--target", type=float, default=0.9, help="test accuracy whose first round is reported")
  parser.add_argument("--num-clients", type=int, default=50)
  parser.add_argument("--clients-per-round", type=int, default=10)
  parser.add_argument("--batch-size", type=int, default=10)
  parser.add_argument("--client-lr", type=float, default=0.05)
  parser.add_argument("--hidden", type=int, default=128, help="width of the MLP's hidden layer")
  parser.add_argument("--dirichlet-alpha", type=float, default=0.5)
  parser.add_argument("--fast", action="store_true", help="1 seed, 5 rounds: a smoke test of the whole pipeline")
  args = parser.parse_args(argv)
  if args.fast:
    args.seeds, args.rounds = [0], 5
  if not 0 < args.target <= 1:
    parser.error(f"--target must be in (0, 1], got {args.target}")
  if args.rounds < 1 or any(e < 1 for e in args.local_epochs):
    parser.error("--rounds and --local-epochs must be positive")
  return args


def rounds_to_target(accuracies: list[float], target: float) -> int | None:
  """The first round (1-based) whose test accuracy is at least ``target``; None if never reached."""
  for round_index, accuracy in enumerate(accuracies):
    if accuracy >= target:
      return round_index + 1
  return None


def run(args: argparse.Namespace) -> dict:
  import jax

  from fedjax_lite import algorithms, core, datasets, training, models

  os.makedirs(args.output_dir, exist_ok=True)
  start = time.perf_counter()
  model = models.mlp(num_classes=10, input_shape=(8, 8, 1), hidden=(args.hidden,))
  # One process for every run: runs whose packed rounds have the same shape share one compiled round.
  process = algorithms.fed_avg(model, client_learning_rate=args.client_lr)
  evaluate = algorithms.centralized_evaluation(model)
  rows, curves = [], []
  for partition in args.partitions:
    for local_epochs in args.local_epochs:
      spec = core.ClientSpec(batch_size=args.batch_size, num_epochs=local_epochs)
      for seed in args.seeds:
        digits = datasets.load_digits(num_clients=args.num_clients, partition=partition,
                                      alpha=args.dirichlet_alpha, seed=seed)
        result = training.run_training(
            process, digits.train, model.init(jax.random.key(seed)), client_spec=spec,
            clients_per_round=args.clients_per_round, num_rounds=args.rounds, seed=seed,
            evaluate=lambda params, test=digits.test: evaluate(params, test), evaluate_every=1, progress=False)
        accuracies = [record["evaluation/accuracy"] for record in result.history]
        reached = rounds_to_target(accuracies, args.target)
        rows.append({"partition": partition, "local_epochs": local_epochs, "seed": seed,
                     "rounds_to_target": reached, "final_test_accuracy": round(accuracies[-1], 4),
                     "best_test_accuracy": round(max(accuracies), 4), "seconds": round(result.seconds, 2)})
        curves.extend({"partition": partition, "local_epochs": local_epochs, "seed": seed, "round": k + 1,
                       "test_accuracy": round(accuracy, 4)} for k, accuracy in enumerate(accuracies))
        print(f"[noniid_digits] {partition:9s} E={local_epochs} seed={seed}: "
              f"{'>' + str(args.rounds) if reached is None else reached} rounds to {args.target:.0%}, final "
              f"{accuracies[-1]:.3f} ({result.seconds:.1f} s)", file=sys.stderr, flush=True)
  wall_seconds = time.perf_counter() - start

  summary = {"config": {key: value for key, value in vars(args).items() if key != "output_dir"},
             "settings": summarize(rows, args), "wall_seconds": round(wall_seconds, 1)}
  write_csv(os.path.join(args.output_dir, "results.csv"), rows)
  write_csv(os.path.join(args.output_dir, "curves.csv"), curves)
  with open(os.path.join(args.output_dir, "summary.json"), "w") as sink:
    json.dump(summary, sink, indent=2)
  plot(curves, args, os.path.join(args.output_dir, "noniid_digits.png"))
  print(table(summary["settings"], args))
  print(f"\nwall time {wall_seconds:.0f} s; results in {args.output_dir}")
  return summary


def summarize(rows: list[dict], args: argparse.Namespace) -> list[dict]:
  """Per (partition, E): rounds to the target over seeds, the speed-up of E=5 over E=1, the final accuracy."""
  settings = []
  for partition in args.partitions:
    for local_epochs in args.local_epochs:
      runs = [row for row in rows if row["partition"] == partition and row["local_epochs"] == local_epochs]
      reached = [row["rounds_to_target"] for row in runs]
      finals = [row["final_test_accuracy"] for row in runs]
      settings.append({
          "partition": partition, "local_epochs": local_epochs,
          "rounds_to_target_per_seed": reached,
          # A run that never reached the target counts as "more than --rounds" (the median then is a lower bound).
          "median_rounds_to_target": statistics.median(r if r is not None else math.inf for r in reached),
          "final_accuracy_mean": round(statistics.fmean(finals), 4),
          "final_accuracy_std": round(statistics.pstdev(finals), 4),
          "seconds": round(sum(row["seconds"] for row in runs), 1),
      })
  for setting in settings:
    baseline = next((s for s in settings if s["partition"] == setting["partition"] and s["local_epochs"] == 1), None)
    if baseline is not None and math.isfinite(setting["median_rounds_to_target"]) and math.isfinite(
        baseline["median_rounds_to_target"]):
      setting["speedup_vs_e1"] = round(baseline["median_rounds_to_target"] / setting["median_rounds_to_target"], 2)
    else:
      setting["speedup_vs_e1"] = None
  for setting in settings:  # JSON has no infinity
    if math.isinf(setting["median_rounds_to_target"]):
      setting["median_rounds_to_target"] = None
  return settings


def table(settings: list[dict], args: argparse.Namespace) -> str:
  header = (f"| split | E | rounds to {args.target:.0%} (per seed) | median | speed-up vs E=1 | "
            f"final accuracy after {args.rounds} rounds |")
  lines = [header, "|---|---|---|---|---|---|"]
  for s in settings:
    per_seed = ", ".join(f">{args.rounds}" if r is None else str(r) for r in s["rounds_to_target_per_seed"])
    median = f">{args.rounds}" if s["median_rounds_to_target"] is None else f"{s['median_rounds_to_target']:g}"
    speedup = "" if s["speedup_vs_e1"] is None or s["local_epochs"] == 1 else f"{s['speedup_vs_e1']:.1f}x"
    lines.append(f"| {s['partition']} | {s['local_epochs']} | {per_seed} | {median} | {speedup} | "
                 f"{s['final_accuracy_mean']:.3f} ± {s['final_accuracy_std']:.3f} |")
  return "\n".join(lines)


def write_csv(path: str, rows: list[dict]) -> None:
  with open(path, "w", newline="") as sink:
    writer = csv.DictWriter(sink, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


def plot(curves: list[dict], args: argparse.Namespace, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  figure, axes = plt.subplots(1, len(args.local_epochs), figsize=(5.5 * len(args.local_epochs), 3.8),
                              squeeze=False, sharey=True)
  for axis, local_epochs in zip(axes[0], args.local_epochs):
    for partition in args.partitions:
      runs = [[c["test_accuracy"] for c in curves
               if c["partition"] == partition and c["local_epochs"] == local_epochs and c["seed"] == seed]
              for seed in args.seeds]
      accuracy = np.array(runs)
      rounds = np.arange(1, accuracy.shape[1] + 1)
      axis.plot(rounds, accuracy.mean(axis=0), label=partition)
      axis.fill_between(rounds, accuracy.min(axis=0), accuracy.max(axis=0), alpha=0.2)
    axis.axhline(args.target, color="grey", lw=0.8, ls="--")
    axis.set_title(f"E = {local_epochs} local epoch{'s' if local_epochs > 1 else ''}")
    axis.set_xlabel("round")
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right")
  axes[0][0].set_ylabel(f"test accuracy (mean, min-max over {len(args.seeds)} seeds)")
  figure.suptitle(f"FedAvg on digits, MLP 64-{args.hidden}-10, {args.clients_per_round} of {args.num_clients} "
                  f"clients per round, B={args.batch_size}, client lr {args.client_lr}")
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)


if __name__ == "__main__":
  run(parse_args())
