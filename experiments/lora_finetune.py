"""Federated fine-tuning of a pretrained transformer on shifted clients: full fine-tuning, LoRA, or a frozen base.

A small transformer language model (:func:`fedjax_lite.models.transformer_lm`, word level) is pretrained centrally on
one distribution -- sentences of the generated grammar (:func:`fedjax_lite.datasets.grammar_corpus`), domain
``--pretrain-domain`` -- by ``experiments/pretrain_transformer.py``; then it is fine-tuned federatedly on clients
drawn from a SHIFTED distribution: another domain (``--domain``, which ranks the words differently) with
client-specific word preferences (``--shift``). Compared, at the same rounds, cohort and local training:

* ``frozen``: the pretrained base, not trained (nothing uploaded);
* ``full``: FedAvg on every parameter (:func:`fedjax_lite.algorithms.fed_avg`): each client uploads the whole model;
* ``lora<r>``: LoRA adapters of rank r on the query and value projections, FedAvg on the adapters alone, the base
  frozen and shared (:func:`fedjax_lite.algorithms.lora_fine_tuning`): each client uploads the adapters.

Reported per method: next-token accuracy on the shifted clients' held-out sentences (pad and EOS never counted;
``models.sequence.token_metrics``) -- mean over ``--seeds`` with the min-max spread -- and the exact bits each
client uploads per round (``aggregated_bits`` of the round: the payload with the mean's weight), against full
fine-tuning. Each seed draws its own clients' sentences, cohorts and adapter initialization; the pretrained base is
the same for every seed (one pretraining, ``--pretrain-seed``).

Usage (from the repository root)::

  python experiments/lora_finetune.py --output-dir runs/lora_finetune          # a few minutes on 2 CPU cores
  python experiments/lora_finetune.py --fast --output-dir /tmp/lora_finetune   # smoke run (the test suite's)

Writes to ``--output-dir``: ``pretrained/weights.npz`` (and its ``.json``), ``results.csv`` (one row per method and
seed), ``curves.csv`` (test accuracy at every evaluated round of every run, rounds from 0), ``summary.json``
(configuration, per-method summary, wall time) and ``lora_finetune.png`` (accuracy against rounds, and final
accuracy against uploaded bits per round); prints the table.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import pathlib
import statistics
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
REPOSITORY = HERE.parent


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--output-dir", default="runs/lora_finetune", help="where the CSV, JSON and PNG go")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--ranks", type=int, nargs="+", default=[2, 8, 32], help="LoRA ranks compared")
  parser.add_argument("--pretrain-domain", type=int, default=0, help="the pretraining corpus' word distribution")
  parser.add_argument("--pretrain-steps", type=int, default=600)
  parser.add_argument("--pretrain-sentences", type=int, default=8000)
  parser.add_argument("--pretrain-seed", type=int, default=0)
  parser.add_argument("--domain", type=int, default=1, help="the fine-tuning clients' shared word distribution")
  parser.add_argument("--shift", type=float, default=0.5, help="client-specific word preferences, in [0, 1]")
  parser.add_argument("--num-clients", type=int, default=100)
  parser.add_argument("--examples-per-client", type=int, default=40)
  parser.add_argument("--clients-per-round", type=int, default=10)
  parser.add_argument("--rounds", type=int, default=30)
  parser.add_argument("--eval-every", type=int, default=5)
  parser.add_argument("--local-epochs", type=int, default=1)
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--full-lr", type=float, default=1e-3, help="client Adam learning rate of full fine-tuning")
  parser.add_argument("--lora-lr", type=float, default=5e-3, help="client Adam learning rate of LoRA")
  parser.add_argument("--sequence-length", type=int, default=12)
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--width", type=int, default=128)
  parser.add_argument("--fast", action="store_true", help="tiny model, few rounds: a smoke run")
  args = parser.parse_args(argv)
  for name in ("pretrain_steps", "pretrain_sentences", "num_clients", "examples_per_client", "clients_per_round",
               "rounds", "eval_every", "local_epochs", "batch_size", "sequence_length", "layers", "heads", "width"):
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
  if min(args.ranks) < 1 or not 0 <= args.shift <= 1 or args.full_lr <= 0 or args.lora_lr <= 0:
    parser.error("--ranks must be >= 1, --shift in [0, 1], the learning rates > 0.")
  if args.clients_per_round > args.num_clients:
    parser.error("--clients-per-round must be <= --num-clients.")
  if args.width % args.heads:
    parser.error(f"--width ({args.width}) must be divisible by --heads ({args.heads}).")
  if args.fast:
    args.seeds, args.ranks, args.rounds, args.eval_every = args.seeds[:1], args.ranks[:1], 2, 1
    args.pretrain_steps, args.pretrain_sentences, args.num_clients, args.examples_per_client = 20, 400, 6, 10
    args.clients_per_round, args.layers, args.heads, args.width, args.sequence_length = 3, 1, 2, 16, 8
  return args


def methods(args) -> list[str]:
  return ["frozen", "full", *[f"lora{rank}" for rank in args.ranks]]


def pretrain(args, output_dir: pathlib.Path) -> dict:
  """Pretrains the base with ``experiments/pretrain_transformer.py`` (its own script, imported); returns its
  summary (the weights' path and the model's arguments)."""
  spec = importlib.util.spec_from_file_location("pretrain_transformer", HERE / "pretrain_transformer.py")
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  return script.run(script.parse_args([
      "--output", str(output_dir / "pretrained" / "weights.npz"), "--overwrite", "--corpus", "grammar",
      "--domain", str(args.pretrain_domain), "--sentences", str(args.pretrain_sentences),
      "--steps", str(args.pretrain_steps), "--warmup-steps", str(max(1, args.pretrain_steps // 20)),
      "--steps-per-dispatch", str(min(50, args.pretrain_steps)), "--sequence-length", str(args.sequence_length),
      "--layers", str(args.layers), "--heads", str(args.heads), "--width", str(args.width),
      "--seed", str(args.pretrain_seed)]))


def upload_bits_per_client(records: list[dict], clients: list[int]) -> int:
  """The exact bits one client uploads in a round (the same for every round and client)."""
  per_client = {record["aggregated_bits"] // count for record, count in zip(records, clients) if count}
  if len(per_client) != 1:
    raise AssertionError(f"the upload per client differs between rounds: {sorted(per_client)}")
  return per_client.pop()


def run(args) -> dict:
  import jax
  import optax

  from fedjax_lite import algorithms, core, datasets, models
  from fedjax_lite.training import run_training

  output_dir = pathlib.Path(args.output_dir).expanduser().absolute()
  output_dir.mkdir(parents=True, exist_ok=True)
  start = time.time()
  pretrained = pretrain(args, output_dir)
  arguments, weights = pretrained["model"], pretrained["weights"]
  spec = core.ClientSpec(batch_size=args.batch_size, num_epochs=args.local_epochs)
  rows, curves, counts = [], [], {}
  setups = {}  # method -> (model, process, evaluate), built once: one compilation per method for every seed
  for method in methods(args):
    rank = int(method[len("lora"):]) if method.startswith("lora") else 0
    model = models.transformer_lm(**arguments, lora_rank=rank)
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    if rank:
      labels = models.lora_labels(shapes)
      process = algorithms.lora_fine_tuning(model, labels, client_optimizer=optax.adam,
                                            client_learning_rate=args.lora_lr)
      counts[method] = core.count_params(shapes, labels)
    else:
      process = algorithms.fed_avg(model, client_optimizer=optax.adam, client_learning_rate=args.full_lr)
      counts[method] = core.count_params(shapes, "global" if method == "full" else "frozen")
    evaluate = algorithms.centralized_evaluation(model, batch_size=256)
    setups[method] = (model, process, evaluate, rank)
  for seed in args.seeds:
    corpus = datasets.grammar_corpus(num_clients=args.num_clients, examples_per_client=args.examples_per_client,
                                     sequence_length=args.sequence_length, shift=args.shift, domain=args.domain,
                                     test_fraction=0.25, seed=1000 + seed)
    test = corpus.test.all_examples()
    for method, (model, process, evaluate, rank) in setups.items():

      def accuracy(params, evaluate=evaluate) -> dict:
        return {"accuracy": float(models.token_metrics(evaluate(params, test))["accuracy"])}

      params = models.load_params(weights, model.init(jax.random.key(seed)),
                                  missing_ok=models.is_lora_path if rank else None)
      if method == "frozen":
        final, bits = accuracy(params)["accuracy"], 0
        curves.extend({"method": method, "seed": seed, "round": r, "accuracy": final}  # run_training's cadence
                      for r in range(args.rounds) if (r + 1) % args.eval_every == 0 or r == args.rounds - 1)
      else:
        result = run_training(process, corpus.train, params, client_spec=spec,
                              clients_per_round=args.clients_per_round, num_rounds=args.rounds, seed=seed,
                              evaluate=accuracy, evaluate_every=args.eval_every, progress=False)
        evaluated = [record for record in result.history if "evaluation/accuracy" in record]
        curves.extend({"method": method, "seed": seed, "round": record["round"],
                       "accuracy": record["evaluation/accuracy"]} for record in evaluated)
        final = evaluated[-1]["evaluation/accuracy"]
        bits = upload_bits_per_client(result.history,
                                      [args.clients_per_round] * len(result.history))
      rows.append({"method": method, "seed": seed, "final_accuracy": final, "upload_bits_per_client": bits,
                   "trained_parameters": counts[method]["global"]})
      print(f"seed {seed} {method}: accuracy {final:.4f}, upload {bits:,} bits per client per round", flush=True)
  settings = summarize(rows, args)
  default_model = models.transformer_lm(lora_rank=8)  # the library's default (character level) size
  default_shapes = jax.eval_shape(default_model.init, jax.random.key(0))
  default_counts = core.count_params(default_shapes, models.lora_labels(default_shapes))
  summary = {"configuration": {key: value for key, value in vars(args).items()},
             "pretrained": {**{key: pretrained[key] for key in ("model", "num_parameters", "test_after")},
                            "weights": str(pathlib.Path(weights).relative_to(output_dir))},
             "settings": settings,
             "default_model_rank8_fraction": default_counts["global"] / sum(default_counts.values()),
             "seconds": round(time.time() - start, 1)}
  write_csv(output_dir / "results.csv", rows)
  write_csv(output_dir / "curves.csv", curves)
  (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  plot(curves, settings, args, output_dir / "lora_finetune.png")
  return summary


def summarize(rows: list[dict], args) -> list[dict]:
  """Per method: final accuracy mean, standard deviation and min-max over seeds; upload bits per client per round
  and as a fraction of full fine-tuning's."""
  full_bits = next((row["upload_bits_per_client"] for row in rows if row["method"] == "full"), None)
  settings = []
  for method in methods(args):
    mine = [row for row in rows if row["method"] == method]
    accuracies = [row["final_accuracy"] for row in mine]
    bits = mine[0]["upload_bits_per_client"]
    settings.append({
        "method": method, "seeds": len(mine), "final_accuracy_mean": statistics.fmean(accuracies),
        "final_accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
        "final_accuracy_min": min(accuracies), "final_accuracy_max": max(accuracies),
        "upload_bits_per_client": bits, "trained_parameters": mine[0]["trained_parameters"],
        "upload_fraction_of_full": bits / full_bits if full_bits else None})
  return settings


def table(settings: list[dict]) -> str:
  lines = ["| method | trained parameters | upload per client per round (bits) | vs full | "
           "next-token accuracy, mean ± std (min-max) |", "|---|---|---|---|---|"]
  for s in settings:
    fraction = "" if s["upload_fraction_of_full"] is None else f"{100 * s['upload_fraction_of_full']:.2f}%"
    lines.append(f"| {s['method']} | {s['trained_parameters']:,} | {s['upload_bits_per_client']:,} | {fraction} | "
                 f"{s['final_accuracy_mean']:.4f} ± {s['final_accuracy_std']:.4f} ({s['final_accuracy_min']:.4f}-"
                 f"{s['final_accuracy_max']:.4f}) |")
  return "\n".join(lines)


def write_csv(path, rows: list[dict]) -> None:
  with open(path, "w", newline="") as sink:
    writer = csv.DictWriter(sink, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


def plot(curves: list[dict], settings: list[dict], args, path) -> None:
  """Left: test accuracy against rounds (from 0), mean and min-max over seeds. Right: final accuracy against the
  bits each client uploads per round (log scale; the frozen base uploads nothing, drawn at the left edge)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
  for index, method in enumerate(methods(args)):
    color = f"C{index}"
    mine = [c for c in curves if c["method"] == method]
    rounds = sorted({c["round"] for c in mine})
    values = np.array([[c["accuracy"] for c in mine if c["round"] == r] for r in rounds])
    left.plot(rounds, values.mean(1), color=color, label=method, marker="o", markersize=3)
    left.fill_between(rounds, values.min(1), values.max(1), color=color, alpha=0.2)
  left.set_xlabel("round (from 0)")
  left.set_ylabel("next-token test accuracy (shifted clients)")
  left.set_xlim(left=0)
  left.legend()
  left.set_title(f"fine-tuning on domain {args.domain}, shift {args.shift} ({len(args.seeds)} seeds)")
  uploads = [s["upload_bits_per_client"] for s in settings if s["upload_bits_per_client"]]
  floor = min(uploads) / 4 if uploads else 1
  for index, s in enumerate(settings):
    x = s["upload_bits_per_client"] or floor
    right.errorbar([x], [s["final_accuracy_mean"]],
                   yerr=[[s["final_accuracy_mean"] - s["final_accuracy_min"]],
                         [s["final_accuracy_max"] - s["final_accuracy_mean"]]], color=f"C{index}", marker="o",
                   capsize=4, label=s["method"])
  right.set_xscale("log")
  right.set_xlabel("bits uploaded per client per round (frozen: none, drawn at the left)")
  right.set_ylabel("final accuracy (mean, min-max)")
  right.legend()
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)


def main(argv=None) -> int:
  args = parse_args(argv)
  sys.path.insert(0, str(REPOSITORY))
  summary = run(args)
  print(table(summary["settings"]))
  print(f"default model (transformer_lm(), rank 8): adapters {100 * summary['default_model_rank8_fraction']:.2f}% "
        f"of the parameters; wall time {summary['seconds']} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
