"""FedAvg under Byzantine attacks on handwritten digits: test accuracy for each attack and each aggregator.

A fraction of every round's clients (default 2 of 10, chosen afresh each round from the attack's seed, see
``fedjax_lite.attacks.choose_malicious``) attack; the server aggregates the round's updates with

* ``mean``: the example-weighted mean (FedAvg's default);
* ``robust``: the recommended ``aggregators.robust_aggregator()`` (adaptive norm zeroing and clipping around the
  mean; TFF's default robust preset, designed against accidents more than adversaries);
* ``median``: the coordinate-wise median (Yin et al. 2018);
* ``trimmed-mean``: the coordinate-wise trimmed mean trimming ``--fraction`` per side (Yin et al. 2018);
* ``krum`` and ``multi-krum``: Blanchard et al. 2017, built for ``f = floor(fraction x clients per round)``.

Attacks (``fedjax_lite.attacks``): ``none``; ``sign-flip`` (``u' = -u``); ``scaling`` (``u' = 10 u``);
``gaussian`` (``u' ~ N(0, 10^2 I)``); ``label-flip`` (the attackers train honestly on labels ``9 - y``);
``alie`` ("a little is enough", Baruch et al. 2019: ``mu - z_max sigma`` of the honest updates); ``ipm``
(inner-product manipulation, Xie et al. 2020: ``-0.1 mu``). The update attacks corrupt the stacked updates just
before aggregation (``attacks.byzantine_aggregator``); label flipping poisons the attackers' data
(``attacks.with_data_poisoning``).

Setting (defaults): scikit-learn's 8x8 digits split IID into 50 clients (``datasets.load_digits``), MLP 64-64-10,
10 clients per round, client SGD 0.05, batch 10, 2 local epochs, server SGD 1.0, 40 rounds, 5 seeds (each seed
sets the split, initialization and cohorts; ``--attack-seed`` sets which slots of each round's cohort attack, so
the attacking clients differ between seeds too). The final test accuracy is reported.

Usage (from the repository root)::

  python experiments/byzantine.py --output-dir runs/byzantine          # every attack x aggregator, a few minutes
  python experiments/byzantine.py --fast --output-dir /tmp/byzantine   # a smoke run: 1 x 2 settings, 2 rounds

Writes to ``--output-dir``: ``results.csv`` (one row per aggregator, attack and seed), ``summary.json``
(configuration, mean accuracy per setting, wall time) and ``byzantine.png`` (a heat map of the mean final test
accuracy); prints a Markdown table (aggregators as rows, attacks as columns).
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

AGGREGATORS = ("mean", "robust", "median", "trimmed-mean", "krum", "multi-krum")
ATTACKS = ("none", "sign-flip", "scaling", "gaussian", "label-flip", "alie", "ipm")
FAST_AGGREGATORS = ("krum",)
FAST_ATTACKS = ("label-flip", "alie")


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--output-dir", default="runs/byzantine", help="where the CSV, JSON and PNG go")
  parser.add_argument("--aggregators", nargs="+", choices=AGGREGATORS, default=None)
  parser.add_argument("--attacks", nargs="+", choices=ATTACKS, default=None)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
  parser.add_argument("--attack-seed", type=int, default=0, help="which client slots attack in each round")
  parser.add_argument("--rounds", type=int, default=40)
  parser.add_argument("--fraction", type=float, default=0.2, help="malicious fraction of each round's clients")
  parser.add_argument("--num-clients", type=int, default=50)
  parser.add_argument("--clients-per-round", type=int, default=10)
  parser.add_argument("--batch-size", type=int, default=10)
  parser.add_argument("--local-epochs", type=int, default=2)
  parser.add_argument("--client-lr", type=float, default=0.05)
  parser.add_argument("--hidden", type=int, default=64, help="width of the MLP's hidden layer")
  parser.add_argument("--strategy", choices=("auto", "sequential", "vmap"), default="vmap",
                      help="client runner strategy; vmap compiles fastest for this small MLP")
  parser.add_argument("--fast", action="store_true",
                      help=f"1 seed, 2 rounds, aggregators {FAST_AGGREGATORS} x attacks {FAST_ATTACKS} unless given")
  args = parser.parse_args(argv)
  if args.fast:
    args.seeds, args.rounds = [0], 2
    args.aggregators = args.aggregators or list(FAST_AGGREGATORS)
    args.attacks = args.attacks or list(FAST_ATTACKS)
  args.aggregators = args.aggregators or list(AGGREGATORS)
  args.attacks = args.attacks or list(ATTACKS)
  if not 0 <= args.fraction < 0.5:
    parser.error(f"--fraction must be in [0, 0.5), got {args.fraction}")
  if args.attack_seed < 0:
    parser.error(f"--attack-seed must be >= 0, got {args.attack_seed}")
  if args.rounds < 1 or args.local_epochs < 1 or args.clients_per_round < 1:
    parser.error("--rounds, --local-epochs and --clients-per-round must be positive")
  if args.clients_per_round > args.num_clients:
    parser.error("--clients-per-round must be at most --num-clients")
  num_byzantine = math.floor(args.fraction * args.clients_per_round)
  if {"krum", "multi-krum"} & set(args.aggregators) and args.clients_per_round < 2 * num_byzantine + 3:
    parser.error(f"Krum needs --clients-per-round >= 2f + 3 = {2 * num_byzantine + 3} for f = {num_byzantine}")
  return args


def make_aggregator(name: str, args: argparse.Namespace):
  from fedjax_lite import aggregators

  num_byzantine = math.floor(args.fraction * args.clients_per_round)
  return {
      "mean": aggregators.mean,
      "robust": aggregators.robust_aggregator,
      "median": aggregators.coordinate_median,
      "trimmed-mean": lambda: aggregators.trimmed_mean(args.fraction),
      "krum": lambda: aggregators.krum(num_byzantine),
      "multi-krum": lambda: aggregators.multi_krum(num_byzantine),
  }[name]()


def make_update_attack(name: str):
  from fedjax_lite import attacks

  return {
      "sign-flip": attacks.sign_flip,
      "scaling": lambda: attacks.scaling(10.0),
      "gaussian": lambda: attacks.gaussian_noise(10.0),
      "alie": attacks.a_little_is_enough,
      "ipm": lambda: attacks.inner_product_manipulation(0.1),
  }[name]()


def make_process(aggregator_name: str, attack_name: str, model, args: argparse.Namespace, seed: int):
  from fedjax_lite import algorithms, attacks, core

  aggregator = make_aggregator(aggregator_name, args)
  if attack_name not in ("none", "label-flip"):
    aggregator = attacks.byzantine_aggregator(aggregator, make_update_attack(attack_name), fraction=args.fraction,
                                              seed=seed)
  process = algorithms.fed_avg(model, client_learning_rate=args.client_lr, aggregator=aggregator,
                               runner=core.Runner(strategy=args.strategy))
  if attack_name == "label-flip":
    process = attacks.with_data_poisoning(process, attacks.label_flip(10), fraction=args.fraction, seed=seed)
  return process


def run(args: argparse.Namespace) -> dict:
  import jax

  from fedjax_lite import algorithms, core, datasets, training, models

  os.makedirs(args.output_dir, exist_ok=True)
  start = time.perf_counter()
  model = models.mlp(num_classes=10, input_shape=(8, 8, 1), hidden=(args.hidden,))
  evaluate = algorithms.centralized_evaluation(model)
  spec = core.ClientSpec(batch_size=args.batch_size, num_epochs=args.local_epochs)
  data = {seed: datasets.load_digits(num_clients=args.num_clients, partition="iid", seed=seed) for seed in args.seeds}
  rows = []
  for aggregator_name in args.aggregators:
    for attack_name in args.attacks:
      # One process per setting, shared by the seeds: its round program compiles once.
      process = make_process(aggregator_name, attack_name, model, args, args.attack_seed)
      for seed in args.seeds:
        digits = data[seed]
        result = training.run_training(
            process, digits.train, model.init(jax.random.key(seed)), client_spec=spec,
            clients_per_round=args.clients_per_round, num_rounds=args.rounds, seed=seed,
            evaluate=lambda params, test=digits.test: evaluate(params, test), evaluate_every=args.rounds,
            progress=False)
        accuracy = result.history[-1]["evaluation/accuracy"]
        rows.append({"aggregator": aggregator_name, "attack": attack_name, "seed": seed,
                     "final_test_accuracy": round(float(accuracy), 4), "seconds": round(result.seconds, 2)})
        print(f"[byzantine] {aggregator_name:12s} {attack_name:10s} seed={seed}: test accuracy {accuracy:.3f} "
              f"({result.seconds:.1f} s)", file=sys.stderr, flush=True)
  wall_seconds = time.perf_counter() - start

  settings = summarize(rows, args)
  summary = {"config": {key: value for key, value in vars(args).items() if key != "output_dir"},
             "num_byzantine_per_round": math.floor(args.fraction * args.clients_per_round),
             "settings": settings, "wall_seconds": round(wall_seconds, 1)}
  write_csv(os.path.join(args.output_dir, "results.csv"), rows)
  with open(os.path.join(args.output_dir, "summary.json"), "w") as sink:
    json.dump(summary, sink, indent=2)
  plot(settings, args, os.path.join(args.output_dir, "byzantine.png"))
  print(table(settings, args))
  print(f"\nwall time {wall_seconds:.0f} s; results in {args.output_dir}")
  return summary


def summarize(rows: list[dict], args: argparse.Namespace) -> list[dict]:
  """Per (aggregator, attack): the final test accuracy per seed, its mean and its spread."""
  settings = []
  for aggregator_name in args.aggregators:
    for attack_name in args.attacks:
      accuracies = [row["final_test_accuracy"] for row in rows
                    if row["aggregator"] == aggregator_name and row["attack"] == attack_name]
      settings.append({"aggregator": aggregator_name, "attack": attack_name, "accuracy_per_seed": accuracies,
                       "accuracy_mean": round(statistics.fmean(accuracies), 4),
                       "accuracy_min": min(accuracies), "accuracy_max": max(accuracies)})
  return settings


def table(settings: list[dict], args: argparse.Namespace) -> str:
  """Markdown: one row per aggregator, one column per attack, mean final test accuracy (min-max over seeds)."""
  lines = ["| aggregator | " + " | ".join(args.attacks) + " |", "|---" * (len(args.attacks) + 1) + "|"]
  for aggregator_name in args.aggregators:
    cells = []
    for attack_name in args.attacks:
      s = next(s for s in settings if s["aggregator"] == aggregator_name and s["attack"] == attack_name)
      cell = f"{s['accuracy_mean']:.3f}"
      if len(args.seeds) > 1:
        cell += f" ({s['accuracy_min']:.2f}-{s['accuracy_max']:.2f})"
      cells.append(cell)
    lines.append(f"| {aggregator_name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_csv(path: str, rows: list[dict]) -> None:
  with open(path, "w", newline="") as sink:
    writer = csv.DictWriter(sink, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


def plot(settings: list[dict], args: argparse.Namespace, path: str) -> None:
  import numpy as np
  from matplotlib.figure import Figure  # no pyplot: the global backend stays as the caller set it

  grid = np.array([[next(s["accuracy_mean"] for s in settings if s["aggregator"] == a and s["attack"] == t)
                    for t in args.attacks] for a in args.aggregators])
  figure = Figure(figsize=(1.3 * len(args.attacks) + 2.2, 0.5 * len(args.aggregators) + 1.6))
  axis = figure.subplots()
  image = axis.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
  axis.set_xticks(range(len(args.attacks)), args.attacks)
  axis.set_yticks(range(len(args.aggregators)), args.aggregators)
  for i in range(grid.shape[0]):
    for j in range(grid.shape[1]):
      axis.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=9)
  figure.colorbar(image, ax=axis, label="final test accuracy")
  num_byzantine = math.floor(args.fraction * args.clients_per_round)
  axis.set_title(f"FedAvg on digits, {num_byzantine} of {args.clients_per_round} clients Byzantine per round, "
                 f"{args.rounds} rounds, mean of {len(args.seeds)} seed{'s' if len(args.seeds) > 1 else ''}",
                 fontsize=9)
  figure.tight_layout()
  figure.savefig(path, dpi=110)


if __name__ == "__main__":
  run(parse_args())
