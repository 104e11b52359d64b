"""FedAvg, FedProx, SCAFFOLD, MimeLite and FedAdam on LEAF's Synthetic(alpha, beta): the FedProx paper's benchmark.

Li et al. 2020 ("Federated Optimization in Heterogeneous Networks", arXiv:1812.06127, §5) train a multinomial
logistic regression (60 features, 10 classes) on Synthetic(0, 0), (0.5, 0.5) and (1, 1): 30 clients whose
teachers and inputs drift apart as alpha and beta grow, 10 clients per round, 20 local epochs of SGD (batch 10,
learning rate 0.01). Each client's examples are split 80/20 into train and test, as in the paper; test accuracy is
over all clients' test examples, training loss over all clients' train examples, after every round.

Algorithms (fedjax_lite.algorithms, all on the same round template): FedAvg; FedProx with mu = 0.01 and 1;
SCAFFOLD (option II, control variates for all 30 clients in a ClientStateStore); MimeLite with SGD momentum 0.9;
FedAdam (server lr 0.01, tau 1e-3). Same seed, data, cohorts and initialization for all.

Usage (from the repository root)::

  python experiments/algorithms_synthetic.py --output-dir runs/algorithms_synthetic     # full run
  python experiments/algorithms_synthetic.py --fast --output-dir /tmp/algos              # smoke run (2 rounds)

Writes ``results.csv`` (one row per dataset and algorithm: final test accuracy, final training loss, rounds to the
target accuracy), ``curves.csv``, ``summary.json`` and ``algorithms_synthetic.png``; prints a table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

SETTINGS = ((0.0, 0.0), (0.5, 0.5), (1.0, 1.0))
ALGORITHMS = ("fedavg", "fedprox_0.01", "fedprox_1", "scaffold", "mimelite", "fedadam")


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--output-dir", default="runs/algorithms_synthetic")
  parser.add_argument("--rounds", type=int, default=100)
  parser.add_argument("--local-epochs", type=int, default=20)
  parser.add_argument("--client-lr", type=float, default=0.01)
  parser.add_argument("--batch-size", type=int, default=10)
  parser.add_argument("--clients-per-round", type=int, default=10)
  parser.add_argument("--num-clients", type=int, default=30)
  parser.add_argument("--max-client-size", type=int, default=None,
                      help="cap on a client's examples (the paper has none; the power law has a long tail)")
  parser.add_argument("--target", type=float, default=0.7, help="test accuracy whose first round is reported")
  parser.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=list(ALGORITHMS))
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--fast", action="store_true", help="2 rounds, 1 local epoch, one setting: a smoke test")
  args = parser.parse_args(argv)
  if args.fast:
    args.rounds, args.local_epochs = 2, 1
  return args


def split_clients(population, seed):
  """Each client's examples split 80/20 (shuffled from ``seed``): ``(train FederatedData, test arrays)``."""
  import numpy as np

  from fedjax_lite.core import FederatedData

  rng = np.random.default_rng(seed)
  train, test = {}, {"x": [], "y": []}
  for client_id in population.client_ids:
    examples = population[client_id]
    order = rng.permutation(len(examples["y"]))
    cut = max(1, int(round(0.8 * len(order))))
    train[client_id] = {key: np.asarray(value)[order[:cut]] for key, value in examples.items()}
    for key in test:
      test[key].append(np.asarray(examples[key])[order[cut:]])
  return FederatedData.from_clients(train), {key: np.concatenate(value) for key, value in test.items()}


def build(name, model, num_clients, client_lr):
  import optax

  from fedjax_lite import algorithms

  if name == "fedavg":
    return algorithms.fed_avg(model, client_learning_rate=client_lr)
  if name.startswith("fedprox_"):
    return algorithms.fed_prox(model, float(name.split("_")[1]), client_learning_rate=client_lr)
  if name == "scaffold":
    return algorithms.scaffold(model, num_clients=num_clients, client_learning_rate=client_lr)
  if name == "mimelite":
    return algorithms.mime_lite(model, optax.sgd(client_lr, momentum=0.9))
  return algorithms.fed_adam(model, server_learning_rate=0.01, client_learning_rate=client_lr)


def main(argv=None) -> int:
  args = parse_args(argv)
  import jax
  import numpy as np

  from fedjax_lite import algorithms, models
  from fedjax_lite.core import ClientSpec
  from fedjax_lite.datasets import synthetic_leaf
  from fedjax_lite.training import run_training

  os.makedirs(args.output_dir, exist_ok=True)
  settings = SETTINGS[-1:] if args.fast else SETTINGS
  rows, curves = [], []
  started = time.perf_counter()
  model = models.dense_softmax(num_classes=10, input_shape=(60,))
  evaluate_on = algorithms.centralized_evaluation(model)
  for alpha, beta in settings:
    population = synthetic_leaf(num_clients=args.num_clients, alpha=alpha, beta=beta, seed=args.seed,
                                max_size=args.max_client_size)
    train, test = split_clients(population, args.seed)
    params = model.init(jax.random.key(args.seed))
    spec = ClientSpec(batch_size=args.batch_size, num_epochs=args.local_epochs)
    for name in args.algorithms:
      process = build(name, model, train.num_clients, args.client_lr)
      run_start = time.perf_counter()
      result = run_training(
          process, train, params, client_spec=spec, clients_per_round=args.clients_per_round,
          num_rounds=args.rounds, seed=args.seed, progress=False, evaluate_every=1,
          evaluate=lambda p: {"test_accuracy": evaluate_on(p, test)["accuracy"],
                              "train_loss": evaluate_on(p, train.examples)["loss"]})
      accuracy = [record["evaluation/test_accuracy"] for record in result.history]
      loss = [record["evaluation/train_loss"] for record in result.history]
      reached = next((r + 1 for r, a in enumerate(accuracy) if a >= args.target), None)
      rows.append({"alpha": alpha, "beta": beta, "algorithm": name, "final_test_accuracy": round(accuracy[-1], 4),
                   "best_test_accuracy": round(max(accuracy), 4), "final_train_loss": round(loss[-1], 4),
                   "rounds_to_target": reached, "seconds": round(time.perf_counter() - run_start, 1)})
      curves += [{"alpha": alpha, "beta": beta, "algorithm": name, "round": r + 1, "test_accuracy": a,
                  "train_loss": l} for r, (a, l) in enumerate(zip(accuracy, loss))]
      print(f"Synthetic({alpha:g},{beta:g}) {name:>13}: test acc {accuracy[-1]:.3f}, train loss {loss[-1]:.3f}, "
            f"rounds to {args.target:g}: {reached}", flush=True)

  for filename, table in (("results.csv", rows), ("curves.csv", curves)):
    with open(os.path.join(args.output_dir, filename), "w", newline="") as handle:
      writer = csv.DictWriter(handle, fieldnames=list(table[0]))
      writer.writeheader()
      writer.writerows(table)
  summary = {"config": vars(args), "results": rows, "seconds": round(time.perf_counter() - started, 1)}
  with open(os.path.join(args.output_dir, "summary.json"), "w") as handle:
    json.dump(summary, handle, indent=2)

  import matplotlib.figure

  figure = matplotlib.figure.Figure(figsize=(5 * len(settings), 7))
  axes = figure.subplots(2, len(settings), squeeze=False)
  for column, (alpha, beta) in enumerate(settings):
    for name in args.algorithms:
      points = [c for c in curves if c["alpha"] == alpha and c["beta"] == beta and c["algorithm"] == name]
      rounds = [c["round"] for c in points]
      axes[0][column].plot(rounds, [c["train_loss"] for c in points], label=name)
      axes[1][column].plot(rounds, [c["test_accuracy"] for c in points], label=name)
    axes[0][column].set_title(f"Synthetic({alpha:g}, {beta:g})")
    axes[0][column].set_ylabel("training loss")
    axes[0][column].set_yscale("log")
    axes[1][column].set_ylabel("test accuracy")
    axes[1][column].set_xlabel("round")
  axes[1][0].legend()
  figure.tight_layout()
  figure.savefig(os.path.join(args.output_dir, "algorithms_synthetic.png"), dpi=100)
  print(f"wrote {args.output_dir} in {summary['seconds']} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
