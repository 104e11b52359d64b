"""Accuracy against uploaded bits: quantization, top-k with and without error feedback, and sign with error feedback.

FedAvg on scikit-learn's 8x8 digits (``fedjax_lite.datasets.load_digits``, 50 clients, Dirichlet(0.5) label split)
with an MLP 64-128-10 (9,610 parameters), 10 clients per round, client SGD 0.05, batch 10, one local epoch, server
SGD 1.0, and each client's upload (its model delta) sent as:

* ``dense``: float32 (the weighted mean, 32 bits per parameter);
* ``quant8`` / ``quant2``: stochastic uniform quantization to 8 or 2 bits per entry
  (``aggregators.quantize_above_threshold``, inside the weighted mean; unbiased, no memory);
* ``topk``: the 1% largest-magnitude entries (``top_k_compressor(fraction=0.01)``: 97 indices of 14 bits and
  97 float32 values, besides the mean's 32-bit weight), without error feedback;
* ``topk_ef``: the same with error feedback (``error_feedback=True``: Stich et al. 2018);
* ``sign_ef``: scaled sign per layer with error feedback (Karimireddy et al. 2019): 1 bit per entry plus a 32-bit
  scale per leaf;
* ``randk_shared_ef``: 1% random coordinates SHARED by the round's clients (``shared_random_k_compressor``, drawn
  from a public key of the round: 97 float32 values and no indices, besides the mean's weight), unscaled, with error
  feedback -- the sparsification that also composes with a secure sum.

Every variant runs through ``algorithms.fed_avg`` (``upload_compressor=`` for the compressors, ``aggregator=`` for
quantization) and ``training.run_training``, which keeps the error-feedback residuals in a ``ClientStateStore``.
The x axis is the cumulative ``aggregated_bits`` of the run (exact: ``metrics['aggregated_bits']``); each seed
sets the split, initialization and cohorts.

Usage (from the repository root)::

  python experiments/compression_ef.py --output-dir runs/compression_ef     # 3 seeds x 7 variants x 150 rounds
  python experiments/compression_ef.py --fast --output-dir /tmp/compression  # a smoke run (1 seed, 4 rounds)

Writes ``results.csv`` (one row per variant and seed: final accuracy, uploaded Mibit), ``curves.csv`` (accuracy
and cumulative bits after every round), ``summary.json`` and ``compression_ef.png``; prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

VARIANTS = ("dense", "quant8", "quant2", "topk", "topk_ef", "sign_ef", "randk_shared_ef")


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--output-dir", default="runs/compression_ef", help="where the CSV, JSON and PNG go")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
  parser.add_argument("--rounds", type=int, default=150)
  parser.add_argument("--top-k-fraction", type=float, default=0.01)
  parser.add_argument("--client-lr", type=float, default=0.05)
  parser.add_argument("--fast", action="store_true", help="1 seed, 4 rounds: a smoke test of the whole pipeline")
  args = parser.parse_args(argv)
  if args.fast:
    args.seeds, args.rounds = [0], 4
  if args.rounds < 1 or not 0 < args.top_k_fraction <= 1:
    parser.error("--rounds must be positive and --top-k-fraction in (0, 1]")
  return args


def variant_options(name: str, args: argparse.Namespace) -> dict:
  """The ``fed_avg`` options of one variant."""
  from fedjax_lite import aggregators

  if name == "dense":
    return {}
  if name.startswith("quant"):
    bits = int(name[len("quant"):])
    return {"aggregator": aggregators.mean(value_sum=aggregators.quantize_above_threshold(bits, threshold=0))}
  if name.startswith("topk"):
    return {"upload_compressor": aggregators.top_k_compressor(fraction=args.top_k_fraction,
                                                              error_feedback=name.endswith("_ef"))}
  if name == "randk_shared_ef":
    return {"upload_compressor": aggregators.shared_random_k_compressor(fraction=args.top_k_fraction, unbiased=False,
                                                                        error_feedback=True)}
  return {"upload_compressor": aggregators.sign_compressor(error_feedback=True)}


def run(args: argparse.Namespace) -> dict:
  import jax

  from fedjax_lite import algorithms, core, datasets, models, training

  os.makedirs(args.output_dir, exist_ok=True)
  start = time.perf_counter()
  model = models.mlp(num_classes=10, input_shape=(8, 8, 1), hidden=(128,))
  evaluate = algorithms.centralized_evaluation(model)
  spec = core.ClientSpec(batch_size=10, num_epochs=1)
  rows, curves = [], []
  for name in args.variants:
    process = algorithms.fed_avg(model, client_learning_rate=args.client_lr, **variant_options(name, args))
    for seed in args.seeds:
      digits = datasets.load_digits(num_clients=50, partition="dirichlet", alpha=0.5, seed=seed)
      result = training.run_training(
          process, digits.train, model.init(jax.random.key(seed)), client_spec=spec, clients_per_round=10,
          num_rounds=args.rounds, seed=seed, evaluate=lambda params, test=digits.test: evaluate(params, test),
          evaluate_every=1, progress=False)
      accuracies = [record["evaluation/accuracy"] for record in result.history]
      bits = [int(record["cumulative_aggregated_bits"]) for record in result.history]
      rows.append({"variant": name, "seed": seed, "final_test_accuracy": round(accuracies[-1], 4),
                   "uploaded_mebibits": round(bits[-1] / 2**20, 4), "seconds": round(result.seconds, 2)})
      curves.extend({"variant": name, "seed": seed, "round": k, "test_accuracy": round(accuracy, 4),
                     "cumulative_aggregated_bits": bit}
                    for k, (accuracy, bit) in enumerate(zip(accuracies, bits)))
      print(f"[compression_ef] {name:8s} seed={seed}: final {accuracies[-1]:.3f}, "
            f"{bits[-1] / 2**20:.2f} Mibit uploaded ({result.seconds:.1f} s)", file=sys.stderr, flush=True)
  wall_seconds = round(time.perf_counter() - start, 1)
  config = {key: value for key, value in vars(args).items() if key != "output_dir"}
  summary = {"config": config, "settings": summarize(rows, args), "wall_seconds": wall_seconds}
  for file_name, table_rows in (("results.csv", rows), ("curves.csv", curves)):
    write_csv(os.path.join(args.output_dir, file_name), table_rows)
  with open(os.path.join(args.output_dir, "summary.json"), "w") as sink:
    json.dump(summary, sink, indent=2)
  plot(curves, args, os.path.join(args.output_dir, "compression_ef.png"))
  print(table(summary["settings"]) + f"\n\nwall time {wall_seconds:.0f} s; results in {args.output_dir}")
  return summary


def summarize(rows: list[dict], args: argparse.Namespace) -> list[dict]:
  settings = []
  for name in args.variants:
    runs = [row for row in rows if row["variant"] == name]
    finals = [row["final_test_accuracy"] for row in runs]
    settings.append({"variant": name, "final_accuracy_per_seed": finals,
                     "final_accuracy_mean": round(statistics.fmean(finals), 4),
                     "final_accuracy_std": round(statistics.pstdev(finals), 4),
                     "uploaded_mebibits": runs[0]["uploaded_mebibits"]})
  dense = next((s for s in settings if s["variant"] == "dense"), None)
  for setting in settings:
    setting["bits_vs_dense"] = (round(setting["uploaded_mebibits"] / dense["uploaded_mebibits"], 4)
                                if dense else None)
  return settings


def table(settings: list[dict]) -> str:
  lines = ["| upload | final accuracy (mean ± std over seeds) | uploaded Mibit | bits / dense |", "|---|---|---|---|"]
  for s in settings:
    ratio = "" if s["bits_vs_dense"] is None else f"{s['bits_vs_dense']:.4f}"
    lines.append(f"| {s['variant']} | {s['final_accuracy_mean']:.3f} ± {s['final_accuracy_std']:.3f} | "
                 f"{s['uploaded_mebibits']:.2f} | {ratio} |")
  return "\n".join(lines)


def write_csv(path: str, rows: list[dict]) -> None:
  """``rows`` as CSV (its values are numbers and variant names: nothing to quote)."""
  columns = list(rows[0])
  text = "\n".join([",".join(columns)] + [",".join(str(row[column]) for column in columns) for row in rows])
  with open(path, "w") as sink:
    sink.write(text + "\n")


def plot(curves: list[dict], args: argparse.Namespace, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  figure, (by_bits, by_round) = plt.subplots(1, 2, figsize=(11, 4))
  for name in args.variants:
    runs = [[c for c in curves if c["variant"] == name and c["seed"] == seed] for seed in args.seeds]
    accuracy = np.array([[c["test_accuracy"] for c in run] for run in runs])
    mebibits = np.array([c["cumulative_aggregated_bits"] for c in runs[0]]) / 2**20
    rounds = np.arange(accuracy.shape[1])  # rounds numbered from 0, as every output of the library
    for axis, x in ((by_bits, mebibits), (by_round, rounds)):
      axis.plot(x, accuracy.mean(axis=0), label=name)
      axis.fill_between(x, accuracy.min(axis=0), accuracy.max(axis=0), alpha=0.15)
  by_bits.set_xscale("log")
  by_bits.set_xlabel("uploaded Mibit (cumulative, all clients)")
  by_round.set_xlabel("round")
  by_bits.set_ylabel(f"test accuracy (mean, min-max over {len(args.seeds)} seeds)")
  for axis in (by_bits, by_round):
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right", fontsize=8)
  figure.suptitle("FedAvg on digits (Dirichlet 0.5, 10 of 50 clients per round): compressed uploads")
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)


def main(argv=None) -> int:
  run(parse_args(argv))
  return 0


if __name__ == "__main__":
  sys.exit(main())
