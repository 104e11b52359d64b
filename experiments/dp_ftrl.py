"""DP-FTRL at equal epsilon: the Gaussian mechanism (DP-FedAvg), tree aggregation, BandMF and BLT, with an audit.

Choquette-Choo et al. 2023 ("(Amplified) Banded Matrix Factorization", arXiv:2306.08153) and McMahan et al. 2024
("Don't use tree aggregation, use BLTs", arXiv:2408.08868) report that matrix-factorization noise (BandMF, BLT)
trains better than tree aggregation at the same (epsilon, delta). This script checks that ordering on an
EMNIST-shaped task that runs offline on a laptop: scikit-learn's handwritten digits (8x8 grey images, 10 classes;
``datasets.load_digits``) split IID into many small clients, or real Federated EMNIST with ``--dataset emnist``
when its files are on disk (``datasets.load_emnist``, 62 classes, the writers as clients).

Every mechanism trains the same model with the same clip, client work and server optimizer (SGD with momentum),
its noise multiplier calibrated to the same target epsilon (each of ``--epsilons``) at the same delta after
``--rounds`` rounds:

* ``gaussian``: DP-FedAvg (``algorithms.dp_fed_avg``): Poisson sampling at ``q = m / N``, independent Gaussian
  noise each round, amplified by sampling (``privacy.calibrate_noise_multiplier``);
* ``tree``: DP-FTRL with tree aggregation (``algorithms.dp_ftrl(strategy='tree')``): clients in shuffled epochs of
  ``N // m`` rounds, the tree restarted each epoch (``privacy.tree_run_events``);
* ``banded`` (BandMF) and ``blt``: DP-FTRL with matrix-factorization noise (``algorithms.dp_ftrl`` with a strategy
  planned by ``privacy.matrix_factorization`` for ``--rounds`` rounds and ``b = N // m``-min-separation; clients in
  ``b`` fixed groups visited in turn), calibrated by ``privacy.calibrate_run_noise``;
* ``nonprivate``: the same clip without noise (a reference, not private).

Then, for each private mechanism and epsilon, one more run (the first seed) with ``--audit-canaries K`` canary
clients that take part as the real clients do (``canaries=`` of the recipes) and K held out: the one-shot empirical
epsilon of the trained model (Andrew et al. 2024, ``privacy.audit``) beside the accountant's upper bound.

Usage (from the repository root)::

  python experiments/dp_ftrl.py --output-dir runs/dp_ftrl        # 2 epsilons x 5 mechanisms x 5 seeds, audits
  python experiments/dp_ftrl.py --fast --output-dir /tmp/dp_ftrl  # a smoke run (what the test suite executes)

Writes to ``--output-dir``: ``results.csv`` (one row per target epsilon, mechanism and seed: noise multiplier,
epsilon spent, final and best accuracy), ``curves.csv`` (test accuracy of every round of every run), ``audit.csv``
(the empirical epsilons and the accountant's), ``summary.json`` (configuration, plans, per-setting summary, the
ordering verdict per epsilon, wall time) and ``dp_ftrl.png`` (accuracy against rounds, mean and min-max over seeds,
a panel per epsilon); prints the tables.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time

MECHANISMS = ("nonprivate", "gaussian", "tree", "banded", "blt")
LABELS = {"nonprivate": "clip only (not private)", "gaussian": "DP-FedAvg (Gaussian, Poisson)",
          "tree": "DP-FTRL tree", "banded": "DP-FTRL BandMF", "blt": "DP-FTRL BLT"}


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--output-dir", default="runs/dp_ftrl", help="where the CSV, JSON and PNG go")
  parser.add_argument("--dataset", choices=("digits", "emnist"), default="digits",
                      help="digits (offline) or Federated EMNIST, 62 classes (needs its files in --data-dir)")
  parser.add_argument("--data-dir", default=None, help="EMNIST's folder (default: the dataset cache)")
  parser.add_argument("--mechanisms", nargs="+", choices=MECHANISMS, default=list(MECHANISMS))
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
  parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0],
                      help="the target epsilons (every private mechanism runs at each)")
  parser.add_argument("--delta", type=float, default=1e-4)
  parser.add_argument("--rounds", type=int, default=100, help="rounds of every run (and the strategies' horizon)")
  parser.add_argument("--num-clients", type=int, default=1000, help="digits: clients of the IID split")
  parser.add_argument("--clients-per-round", type=int, default=100,
                      help="m: the cohort (Poisson: expected), so b = N // m rounds between participations")
  parser.add_argument("--clip", type=float, default=0.3, help="the L2 clip of every client update")
  parser.add_argument("--client-lr", type=float, default=0.3)
  parser.add_argument("--batch-size", type=int, default=10)
  parser.add_argument("--server-lr", type=float, default=1.0)
  parser.add_argument("--server-momentum", type=float, default=0.9)
  parser.add_argument("--hidden", type=int, nargs="*", default=[],
                      help="hidden widths of an MLP (none: softmax regression, the default)")
  parser.add_argument("--audit-canaries", type=int, default=100,
                      help="K inserted and K held-out canaries per audit run (0: no audit)")
  parser.add_argument("--max-optimizer-steps", type=int, default=None,
                      help="cap on jax_privacy's BLT/BandMF optimizer steps (default: its own)")
  parser.add_argument("--fast", action="store_true",
                      help="1 seed, 8 rounds, 60 clients, 10 a round, 10 canaries: a smoke test of the pipeline")
  args = parser.parse_args(argv)
  if args.fast:
    args.seeds, args.rounds, args.num_clients, args.clients_per_round = [0], 8, 60, 10
    args.epsilons = args.epsilons[:1]
    args.audit_canaries, args.max_optimizer_steps = min(args.audit_canaries, 10), 10
  if not all(epsilon > 0 for epsilon in args.epsilons) or not 0 < args.delta < 1:
    parser.error("--epsilons must be > 0 and --delta in (0, 1)")
  if args.rounds < 1 or args.clients_per_round < 1 or args.audit_canaries < 0 or args.clip <= 0:
    parser.error("--rounds and --clients-per-round must be positive, --clip > 0, --audit-canaries >= 0")
  if args.dataset == "digits" and not 1 <= args.clients_per_round <= args.num_clients:
    parser.error("--clients-per-round must be in [1, --num-clients]")
  return args


def load_data(args):
  """``(train clients, test examples, num_classes, input_shape)`` of ``--dataset``."""
  from fedjax_lite import datasets

  if args.dataset == "digits":
    digits = datasets.load_digits(num_clients=args.num_clients, partition="iid", seed=0)
    return digits.train, digits.test, digits.num_classes, tuple(digits.input_shape)
  data = datasets.load_emnist(only_digits=False, data_dir=args.data_dir)
  return data.train, data.test.all_examples(), data.num_classes, tuple(data.input_shape)


def plan(args, num_clients: int) -> dict:
  """Per private mechanism: its strategy (planned once: it does not depend on epsilon) and its noise multiplier
  for each of --epsilons at --delta after --rounds."""
  from fedjax_lite import privacy

  groups = num_clients // args.clients_per_round
  q = args.clients_per_round / num_clients
  plans = {}
  for name in args.mechanisms:
    planned = {"strategy": None, "noise_multiplier": {}}
    if name == "tree":
      planned["strategy"] = "tree"
      make_run = lambda z: privacy.tree_run_events(z, groups)  # noqa: E731
    elif name in ("banded", "blt"):
      start = time.perf_counter()
      mechanism = privacy.matrix_factorization(name, num_rounds=args.rounds, min_separation=groups,
                                               max_optimizer_steps=args.max_optimizer_steps)
      planned.update(strategy=mechanism, plan_seconds=round(time.perf_counter() - start, 1),
                     parameters={key: list(value) for key, value in mechanism.parameters})
      make_run = lambda z, mechanism=mechanism: privacy.matrix_factorization_run_events(  # noqa: E731
          mechanism, z, min_separation=groups)
    for epsilon in args.epsilons:
      if name == "nonprivate":
        z = 0.0
      elif name == "gaussian":
        z = privacy.calibrate_noise_multiplier(epsilon, rounds=args.rounds, delta=args.delta, sampling_probability=q)
      else:
        z = privacy.calibrate_run_noise(epsilon, make_run, rounds=args.rounds, delta=args.delta)
      planned["noise_multiplier"][epsilon] = z
      print(f"[dp_ftrl] {name:10s} epsilon {epsilon:g}: z = {z:.4g}", file=sys.stderr, flush=True)
    plans[name] = planned
  return plans


def recipe(args, name: str, planned: dict, epsilon: float, model, num_clients: int, seed: int, canaries=None):
  """The mechanism's ``(process, sampler, ledger)``: every one with the same clip, client and server optimizers."""
  import optax

  from fedjax_lite import aggregators, algorithms, core

  server = optax.sgd(args.server_lr, momentum=args.server_momentum or None)
  common = dict(num_clients=num_clients, clip=args.clip, delta=args.delta, client_learning_rate=args.client_lr,
                server_optimizer=server, seed=seed, canaries=canaries)
  if name == "nonprivate":  # the clip alone, Poisson cohorts as DP-FedAvg's
    process = algorithms.fed_avg(model, client_learning_rate=args.client_lr, server_optimizer=server,
                                 weighting="uniform",
                                 aggregator=aggregators.gaussian_fixed(0.0, float(args.clients_per_round), args.clip))
    return algorithms.PrivateTraining(process, core.PoissonSampler(num_clients, args.clients_per_round / num_clients,
                                                                   seed), None)
  if name == "gaussian":
    return algorithms.dp_fed_avg(model, noise_multiplier=planned["noise_multiplier"][epsilon],
                                 expected_clients_per_round=float(args.clients_per_round), **common)
  return algorithms.dp_ftrl(model, noise_multiplier=planned["noise_multiplier"][epsilon],
                            clients_per_round=args.clients_per_round, strategy=planned["strategy"], **common)


def run(args: argparse.Namespace) -> dict:
  import dataclasses

  import jax

  from fedjax_lite import algorithms, core, models, privacy, training

  try:
    from absl import logging as absl_logging  # dp_accounting's RDP-order warnings

    absl_logging.set_verbosity(absl_logging.ERROR)
  except ImportError:
    pass
  os.makedirs(args.output_dir, exist_ok=True)
  start = time.perf_counter()
  train, test, num_classes, input_shape = load_data(args)
  num_clients = train.num_clients
  if args.clients_per_round > num_clients:
    raise SystemExit(f"--clients-per-round {args.clients_per_round} exceeds the {num_clients} clients")
  model = (models.mlp(num_classes=num_classes, input_shape=input_shape, hidden=tuple(args.hidden)) if args.hidden
           else models.dense_softmax(num_classes=num_classes, input_shape=input_shape))
  evaluate = algorithms.centralized_evaluation(model)
  spec = core.ClientSpec(batch_size=args.batch_size, num_epochs=1)
  plans = plan(args, num_clients)

  rows, curves = [], []
  for epsilon in args.epsilons:
    for name in args.mechanisms:
      if name == "nonprivate" and epsilon != args.epsilons[0]:
        continue  # epsilon-independent: run once
      shared = recipe(args, name, plans[name], epsilon, model, num_clients, args.seeds[0])
      for seed in args.seeds:
        # One process per setting (compiled once); each seed its own initialization, cohorts and noise.
        sampler = dataclasses.replace(shared.sampler, seed=seed)
        result = training.run_training(
            shared.process, train, model.init(jax.random.key(seed)), client_spec=spec, num_rounds=args.rounds,
            seed=seed, sampler=sampler, privacy=shared.ledger, evaluate=lambda params: evaluate(params, test),
            evaluate_every=1, progress=False)
        accuracies = [record["evaluation/accuracy"] for record in result.history]
        spent = result.history[-1].get("privacy/epsilon")
        target = None if name == "nonprivate" else epsilon
        rows.append({"target_epsilon": target, "mechanism": name, "seed": seed,
                     "noise_multiplier": round(plans[name]["noise_multiplier"][epsilon], 5),
                     "epsilon": None if spent is None else round(spent, 4),
                     "final_test_accuracy": round(accuracies[-1], 4),
                     "best_test_accuracy": round(max(accuracies), 4), "seconds": round(result.seconds, 2)})
        curves.extend({"target_epsilon": target, "mechanism": name, "seed": seed, "round": k + 1,
                       "test_accuracy": round(accuracy, 4)} for k, accuracy in enumerate(accuracies))
        print(f"[dp_ftrl] epsilon {epsilon:g} {name:10s} seed={seed}: final {accuracies[-1]:.3f}, epsilon spent "
              f"{spent} ({result.seconds:.1f} s)", file=sys.stderr, flush=True)

  audits = []
  for epsilon in args.epsilons if args.audit_canaries else ():
    for name in [n for n in args.mechanisms if n != "nonprivate"]:
      seed = args.seeds[0]
      initial = model.init(jax.random.key(seed))
      directions = privacy.canary_directions(jax.random.key(10_000 + seed), initial, 2 * args.audit_canaries,
                                             norm=args.clip)
      inserted = jax.tree.map(lambda c: c[:args.audit_canaries], directions)
      held_out = jax.tree.map(lambda c: c[args.audit_canaries:], directions)
      audited = recipe(args, name, plans[name], epsilon, model, num_clients, seed, canaries=inserted)
      result = training.run_training(audited.process, train, initial, client_spec=spec, num_rounds=args.rounds,
                                     seed=seed, sampler=audited.sampler, privacy=audited.ledger, progress=False)
      model_delta = jax.tree.map(lambda a, b: a - b, initial, result.state.params)
      found = privacy.audit(model_delta, inserted, held_out, delta=args.delta)
      bound = audited.ledger.epsilon_after(args.rounds)
      audits.append({"target_epsilon": epsilon, "mechanism": name, "canaries": args.audit_canaries,
                     "accountant_epsilon": round(bound, 4),
                     "empirical_epsilon_estimate": round(found.epsilon_estimate, 4),
                     "empirical_epsilon_lower_bound": round(found.epsilon_lower_bound, 4),
                     "empirical_epsilon_lower_bound_clopper_pearson": (
                         None if found.epsilon_lower_bound_clopper_pearson is None
                         else round(found.epsilon_lower_bound_clopper_pearson, 4)),
                     "mu_estimate": round(found.mu_estimate, 4),
                     "lower_bounds_below_accountant": bool(
                         found.epsilon_lower_bound <= bound
                         and (found.epsilon_lower_bound_clopper_pearson or 0.0) <= bound)})
      print(f"[dp_ftrl] audit epsilon {epsilon:g} {name:8s}: estimate {found.epsilon_estimate:.3g}, lower bound "
            f"{found.epsilon_lower_bound:.3g} <= accountant {bound:.3g}", file=sys.stderr, flush=True)
  wall_seconds = time.perf_counter() - start

  settings = summarize(rows, args)
  summary = {"config": {key: value for key, value in vars(args).items() if key != "output_dir"},
             "num_clients": num_clients, "min_separation": num_clients // args.clients_per_round,
             "plans": {name: {key: value for key, value in planned.items() if key != "strategy"}
                       for name, planned in plans.items()},
             "settings": settings,
             "ordering": {str(epsilon): ordering([s for s in settings if s["target_epsilon"] == epsilon])
                          for epsilon in args.epsilons},
             "audit": audits,
             "wall_seconds": round(wall_seconds, 1)}
  write_csv(os.path.join(args.output_dir, "results.csv"), rows)
  write_csv(os.path.join(args.output_dir, "curves.csv"), curves)
  if audits:
    write_csv(os.path.join(args.output_dir, "audit.csv"), audits)
  with open(os.path.join(args.output_dir, "summary.json"), "w") as sink:
    json.dump(summary, sink, indent=2)
  plot(curves, args, num_clients, os.path.join(args.output_dir, "dp_ftrl.png"))
  print(table(settings, audits))
  for epsilon, verdict in summary["ordering"].items():
    print(f"epsilon {epsilon}: {verdict['statement']}")
  print(f"wall time {wall_seconds:.0f} s; results in {args.output_dir}")
  return summary


def summarize(rows: list[dict], args: argparse.Namespace) -> list[dict]:
  """Per target epsilon and mechanism (the non-private reference listed at every epsilon): the noise multiplier,
  the epsilon spent, final accuracy mean, std and range over seeds."""
  settings = []
  for epsilon in args.epsilons:
    for name in args.mechanisms:
      runs = [row for row in rows if row["mechanism"] == name
              and (name == "nonprivate" or row["target_epsilon"] == epsilon)]
      finals = [row["final_test_accuracy"] for row in runs]
      settings.append({"target_epsilon": epsilon, "mechanism": name, "noise_multiplier": runs[0]["noise_multiplier"],
                       "epsilon": runs[0]["epsilon"], "final_accuracy_per_seed": finals,
                       "final_accuracy_mean": round(statistics.fmean(finals), 4),
                       "final_accuracy_std": round(statistics.pstdev(finals), 4),
                       "final_accuracy_min": min(finals), "final_accuracy_max": max(finals)})
  return settings


def ordering(settings: list[dict]) -> dict:
  """Whether the papers' ordering holds: BLT and BandMF above tree aggregation, by mean final accuracy; 'clearly'
  when the gap exceeds the two runs' seed standard deviations added (else within the spread)."""
  by_name = {s["mechanism"]: s for s in settings}
  verdicts = {}
  for name in ("banded", "blt"):
    if name in by_name and "tree" in by_name:
      gap = by_name[name]["final_accuracy_mean"] - by_name["tree"]["final_accuracy_mean"]
      spread = by_name[name]["final_accuracy_std"] + by_name["tree"]["final_accuracy_std"]
      verdicts[name] = {"gap_over_tree": round(gap, 4), "seed_spread": round(spread, 4),
                        "above_tree": gap > 0, "clearly_above_tree": gap > spread}
  if not verdicts:
    return {"holds": None, "statement": "ordering: needs tree and banded or blt among --mechanisms"}
  holds = all(v["above_tree"] for v in verdicts.values())
  clear = all(v["clearly_above_tree"] for v in verdicts.values())
  statement = ("ordering (BLT/BandMF above tree): " + ("holds" if holds else "does not hold")
               + (", beyond the seed spread" if clear else ", within the seed spread" if holds else "") + "; "
               + ", ".join(f"{name} {v['gap_over_tree']:+.3f} vs tree" for name, v in verdicts.items()))
  return {"holds": holds, "clearly": clear, "per_strategy": verdicts, "statement": statement}


def table(settings: list[dict], audits: list[dict]) -> str:
  lines = ["| target epsilon | mechanism | noise multiplier z | epsilon spent | final accuracy (mean ± std) | "
           "min-max over seeds |", "|---|---|---|---|---|---|"]
  for s in settings:
    epsilon = "inf" if s["epsilon"] is None else f"{s['epsilon']:.3g}"
    lines.append(f"| {s['target_epsilon']:g} | {LABELS[s['mechanism']]} | {s['noise_multiplier']:.3g} | {epsilon} | "
                 f"{s['final_accuracy_mean']:.3f} ± {s['final_accuracy_std']:.3f} | "
                 f"{s['final_accuracy_min']:.3f}-{s['final_accuracy_max']:.3f} |")
  if audits:
    lines += ["", "| target epsilon | mechanism | accountant epsilon (upper bound) | empirical estimate | lower "
              "bound (Gaussian scores, 95%) | lower bound (Clopper-Pearson, 95%) |", "|---|---|---|---|---|---|"]
    for a in audits:
      clopper_pearson = a["empirical_epsilon_lower_bound_clopper_pearson"]
      lines.append(f"| {a['target_epsilon']:g} | {LABELS[a['mechanism']]} | {a['accountant_epsilon']:.3g} | "
                   f"{a['empirical_epsilon_estimate']:.3g} | {a['empirical_epsilon_lower_bound']:.3g} | "
                   f"{'n/a' if clopper_pearson is None else format(clopper_pearson, '.3g')} |")
  return "\n".join(lines)


def write_csv(path: str, rows: list[dict]) -> None:
  with open(path, "w", newline="") as sink:
    writer = csv.DictWriter(sink, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


def plot(curves: list[dict], args: argparse.Namespace, num_clients: int, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  figure, axes = plt.subplots(1, len(args.epsilons), figsize=(6.5 * len(args.epsilons), 4.5), squeeze=False,
                              sharey=True)
  for axis, epsilon in zip(axes[0], args.epsilons):
    for name in args.mechanisms:
      target = None if name == "nonprivate" else epsilon
      accuracy = np.array([[c["test_accuracy"] for c in curves
                            if c["mechanism"] == name and c["target_epsilon"] == target and c["seed"] == seed]
                           for seed in args.seeds])
      rounds = np.arange(1, accuracy.shape[1] + 1)
      style = dict(ls="--", color="grey") if name == "nonprivate" else {}
      line, = axis.plot(rounds, accuracy.mean(axis=0), label=LABELS[name], **style)
      axis.fill_between(rounds, accuracy.min(axis=0), accuracy.max(axis=0), alpha=0.15, color=line.get_color())
    axis.set_xlabel("round")
    axis.set_title(f"epsilon {epsilon:g} at delta {args.delta:g} after {args.rounds} rounds", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right", fontsize=9)
  axes[0][0].set_ylabel(f"test accuracy (mean, min-max over {len(args.seeds)} seeds)")
  figure.suptitle(f"{args.dataset}: {args.clients_per_round} of {num_clients} clients a round, clip {args.clip:g}, "
                  f"server SGD {args.server_lr:g} (momentum {args.server_momentum:g})", fontsize=10)
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)


if __name__ == "__main__":
  run(parse_args())
