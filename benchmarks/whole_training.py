"""Whole training on the device against the per-round loop: rounds/s of two CLI jobs, in ONE process.

For each workload, ``run_training`` runs the job twice per repetition, interleaved: the per-round loop (cohorts
sampled and packed on the host, one dispatch per round; the default) and whole training on the device
(``rounds_per_dispatch=R``: the population on the device once, R rounds per ``lax.scan`` dispatch, cohorts and
shuffles drawn there). Both evaluate on the test set every ``--eval-every`` rounds, as the CLI does.

Workloads (the CLI's own jobs, built by ``fedjax_lite.training.cli``):

* ``digits``: ``fedjax-lite train`` with no flags: FedAvg, the original FedAvg CNN on scikit-learn's digits, 50
  non-IID clients, 10 per round, 5 local epochs, batch 10, evaluation every 5 rounds.
* ``synthetic``: ``fedjax-lite train --dataset synthetic --model dense``: LEAF's Synthetic(1, 1), 50 clients,
  multinomial logistic regression (FedProx's setup), otherwise the same defaults.

Reported per workload and mode: end-to-end seconds (compilation included), the first round/dispatch, and the
steady rounds/s after it; ``speedup_*`` are scanned / per-round ratios of the medians. Prints one JSON line.

  .venv/bin/python benchmarks/whole_training.py                 # 100 rounds each (the CLI default), 2 repetitions
  .venv/bin/python benchmarks/whole_training.py --quick         # seconds: 10 rounds, dense models, 1 repetition
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: the repository root, for ``benchmarks.cpu_setup``
  sys.path.insert(0, ROOT)
from benchmarks import cpu_setup  # noqa: E402

WORKLOADS = {
    "digits": ["train"],
    "synthetic": ["train", "--dataset", "synthetic", "--model", "dense"],
}


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=100, help="rounds per run (default: the CLI's 100)")
  parser.add_argument("--repeats", type=int, default=2, help="interleaved repetitions of each mode")
  parser.add_argument("--rounds-per-dispatch", type=int, default=5,
                      help="R of the scanned mode (dispatches also end at every evaluation round)")
  parser.add_argument("--eval-every", type=int, default=5, help="the CLI's default 5")
  parser.add_argument("--workloads", default="digits,synthetic")
  parser.add_argument("--quick", action="store_true", help="smoke run: 10 rounds, dense models, 1 repetition")
  parser.add_argument("--output", default=None, help="also append the JSON line to this file")
  cpu_setup.add_argument(parser)
  return parser


def one_run(argv: list[str], rounds: int, eval_every: int, rounds_per_dispatch: int | None) -> dict:
  """One ``run_training`` of the CLI job ``argv``; its timings."""
  import jax

  from fedjax_lite.algorithms import centralized_evaluation
  from fedjax_lite.training import cli
  from fedjax_lite.training.loop import run_training

  args = cli.build_parser().parse_args(argv + ["--rounds", str(rounds), "--eval-every", str(eval_every)])
  train_data, test_data, model, process, client_spec, runner, _ = cli._build_job(args)
  evaluate = centralized_evaluation(model)
  result = run_training(process, train_data, model.init(jax.random.key(args.seed)), client_spec=client_spec,
                        clients_per_round=args.clients_per_round, num_rounds=args.rounds, seed=args.seed,
                        evaluate=lambda params: evaluate(params, test_data), evaluate_every=args.eval_every,
                        progress=False, rounds_per_dispatch=rounds_per_dispatch)
  rounds_done = len(result.history)
  # The first round (per-round loop) or the first dispatch (scanned) holds the compilation.
  first_rounds = 1 if rounds_per_dispatch is None else min(rounds_per_dispatch, eval_every, rounds_done)
  steady_seconds = result.seconds - result.first_round_seconds
  return {
      "seconds": result.seconds,
      "first_seconds": result.first_round_seconds,
      "steady_rounds_per_s": ((rounds_done - first_rounds) / steady_seconds
                              if rounds_done > first_rounds and steady_seconds > 0 else float("nan")),
      "rounds_per_s": rounds_done / result.seconds,
      "final_train_loss": result.history[-1].get("client_work/train/loss"),
      "final_test_accuracy": result.history[-1].get("evaluation/accuracy"),
      "runner": runner.resolved_strategy(),
      "clients": train_data.num_clients,
      "clients_per_round": args.clients_per_round,
  }


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  setup = cpu_setup.apply(args)
  import jax

  rounds, repeats = (10, 1) if args.quick else (args.rounds, args.repeats)
  report = {"benchmark": "whole_training", "backend": jax.default_backend(), "device": str(jax.devices()[0]),
            "machine": platform.processor() or platform.machine(), "jax": jax.__version__, "rounds": rounds,
            "repeats": repeats, "rounds_per_dispatch": args.rounds_per_dispatch, "eval_every": args.eval_every,
            "workloads": {}, **setup}
  for name in args.workloads.split(","):
    job = list(WORKLOADS[name])
    if args.quick and "--model" not in job:
      job += ["--model", "dense"]
    runs = {"per_round": [], "scanned": []}
    for _ in range(repeats):  # interleaved, so both modes see the same machine load
      runs["per_round"].append(one_run(job, rounds, args.eval_every, None))
      runs["scanned"].append(one_run(job, rounds, args.eval_every, args.rounds_per_dispatch))
    summary = {"job": "fedjax-lite " + " ".join(job), "clients": runs["per_round"][0]["clients"],
               "clients_per_round": runs["per_round"][0]["clients_per_round"],
               "runner": runs["per_round"][0]["runner"]}
    for mode, results in runs.items():
      summary[mode] = {
          "seconds": [round(r["seconds"], 3) for r in results],
          "first_seconds": [round(r["first_seconds"], 3) for r in results],
          "steady_rounds_per_s": [round(r["steady_rounds_per_s"], 2) for r in results],
          "final_train_loss": results[-1]["final_train_loss"],
          "final_test_accuracy": results[-1]["final_test_accuracy"],
      }
    median = lambda mode, key: statistics.median(r[key] for r in runs[mode])
    summary["speedup_steady"] = round(median("scanned", "steady_rounds_per_s")
                                      / median("per_round", "steady_rounds_per_s"), 2)
    summary["speedup_end_to_end"] = round(median("per_round", "seconds") / median("scanned", "seconds"), 2)
    report["workloads"][name] = summary
    print(f"{name}: {json.dumps(summary)}", file=sys.stderr)
  line = json.dumps(report)
  print(line)
  if args.output:
    with open(args.output, "a") as sink:
      sink.write(line + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
