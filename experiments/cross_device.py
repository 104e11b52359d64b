"""Cross-device time-to-accuracy: synchronous FedAvg, over-selection, partial work, FedProx and FedNova on a
realistic client-systems model, test accuracy against SIMULATED time.

The population: scikit-learn's digits split into 50 non-IID clients (``datasets.load_digits``, 2 label shards per
client, 28-29 examples each), with FedScale's log-normal compute speeds and bandwidths (``systems.lognormal_systems``:
median 0.0136 s per example, log-sd 0.6; median 6.1 Mbit/s, log-sd 1.1; Lai et al. 2022) and 10% of the selected
clients dropping out of each round (``systems.RandomDropout(0.1)``). Every round targets 10 clients, 5 local epochs
of batches of 10 (14-15 local steps), a small MLP (64-32-10).

The configurations (``CONFIGS``, a dict of named entries; the asynchronous one, FedBuff, brings its own ``run``):

* ``fedavg``: FedAvg, the server waits for every selected client (no deadline), the round as slow as its slowest;
* ``fedavg_overselect``: FedAvg selecting ``ceil(1.3 x 10)`` clients and keeping the first 10 to report (Bonawitz et
  al. 2019);
* ``fedavg_partial``: FedAvg with a deadline ``D`` and partial work: stragglers send the steps they managed;
* ``fedprox_partial``: FedProx (mu = 0.1), same deadline and partial work (Li et al. 2020's "variable amounts of
  work");
* ``fednova_partial``: FedNova (Wang et al. 2020), same deadline and partial work, ``p_i`` uniform (the clients
  hold equal data).
* ``fedbuff``: FedBuff (Nguyen et al. 2022), asynchronous: 10 clients train at once (the synchronous runs'
  concurrency), the server steps whenever 5 updates have arrived (staleness-weighted), a new client starts as one
  finishes or drops out; as many client updates as the synchronous runs' rounds x 10 (``training.run_fed_buff``).

``D`` is the median over the population of the full local work's duration (download, 5 epochs, upload), so about
half the clients do partial work in a round. Each seed ``s`` sets the split, the initialization, the systems draws,
the cohorts and the dropouts. Accuracy curves are step functions of simulated time (a round's accuracy holds from
its end until the next round ends); the mean and min-max over seeds are read on a common time grid.

Usage (from the repository root)::

  python experiments/cross_device.py --output-dir runs/cross_device          # 5 seeds x 2 device assignments x 5 configurations
  python experiments/cross_device.py --fast --output-dir /tmp/cross_device    # smoke run (1 seed, 4 rounds)

Writes ``results.csv`` (one row per configuration and seed), ``curves.csv`` (every round: simulated seconds,
test accuracy, partial / counted clients), ``summary.json`` and ``cross_device.png``; prints a table.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

NUM_CLIENTS, CLIENTS_PER_ROUND, LOCAL_EPOCHS, BATCH_SIZE = 50, 10, 5, 10
# FedBuff at the synchronous runs' concurrency (10 clients training at once), a server step per 5 arrivals; staler
# than 8 steps is dropped (systems.default_max_staleness(10, 5)).
FEDBUFF_BUFFER_SIZE, FEDBUFF_MAX_STALENESS = 5, 8
ASSIGNMENTS = ("independent", "by_label")


@dataclasses.dataclass(frozen=True)
class Config:
  """One curve of the experiment.

  Attributes:
    label: the legend's text.
    build: ``(model, args) -> Process``.
    policy: ``(args, deadline_seconds) -> systems.RoundPolicy``.
    run: ``(config, process, data, params, population, args, seed, evaluate, deadline) -> (records, final
      params)``, the records with ``systems/elapsed_seconds``, ``evaluation/accuracy``, ``systems/num_counted`` and
      ``systems/num_partial``; default :func:`run_synchronous` (``run_training`` with ``systems=``). An
      asynchronous algorithm brings its own.
  """

  label: str
  build: Callable[..., Any]
  policy: Callable[..., Any]
  run: Callable[..., list] | None = None


def _policy(over_selection: float = 1.0, partial: bool = False):
  def make(args, deadline_seconds):
    from fedjax_lite import systems

    return systems.RoundPolicy(deadline_seconds=deadline_seconds if partial else None, over_selection=over_selection,
                               partial_work=partial)

  return make


def _fed_avg(model, args):
  from fedjax_lite import algorithms

  return algorithms.fed_avg(model, client_learning_rate=args.client_lr)


def _fed_prox(model, args):
  from fedjax_lite import algorithms

  return algorithms.fed_prox(model, args.proximal_strength, client_learning_rate=args.client_lr)


def _fed_buff(model, args):
  from fedjax_lite import algorithms

  return algorithms.fed_buff(model, concurrency=CLIENTS_PER_ROUND, buffer_size=FEDBUFF_BUFFER_SIZE,
                             max_staleness=FEDBUFF_MAX_STALENESS, client_learning_rate=args.client_lr)


def run_fed_buff_config(config: Config, process, data, params, population, args, seed, evaluate, deadline) -> list:
  """FedBuff's run: ``training.run_fed_buff`` on the same systems (dropout included) for as many client updates as
  the synchronous runs' ``rounds x CLIENTS_PER_ROUND``, evaluated after every server step; its records carry the
  synchronous runs' keys (``systems/elapsed_seconds``: the step's simulated time; ``systems/num_counted``: the
  updates it applied; no partial work)."""
  from fedjax_lite import core, training

  run = training.run_fed_buff(
      process, data.train, params, client_spec=core.ClientSpec(batch_size=BATCH_SIZE, num_epochs=LOCAL_EPOCHS),
      seed=seed, num_server_steps=args.rounds * CLIENTS_PER_ROUND // FEDBUFF_BUFFER_SIZE, systems=population,
      evaluate=lambda params: {"accuracy": float(evaluate(params)["accuracy"])})
  history = [{**record, "systems/elapsed_seconds": record["fedbuff/elapsed_seconds"],
              "systems/num_counted": record["fedbuff/num_applied"], "systems/num_partial": 0}
             for record in run.history]
  return history, run.state.params


def _fed_nova(model, args):
  from fedjax_lite import algorithms

  return algorithms.fed_nova(model, client_learning_rate=args.client_lr, weighting="uniform")


CONFIGS: dict[str, Config] = {
    "fedavg": Config("FedAvg, wait for all", _fed_avg, _policy()),
    "fedavg_overselect": Config("FedAvg, over-selection 1.3", _fed_avg, _policy(over_selection=1.3)),
    "fedavg_partial": Config("FedAvg, deadline + partial work", _fed_avg, _policy(partial=True)),
    "fedprox_partial": Config("FedProx, deadline + partial work", _fed_prox, _policy(partial=True)),
    "fednova_partial": Config("FedNova, deadline + partial work", _fed_nova, _policy(partial=True)),
    "fedbuff": Config("FedBuff, 10 concurrent, K = 5", _fed_buff, _policy(), run=run_fed_buff_config),
}


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--output-dir", default="runs/cross_device", help="where the CSV, JSON and PNG go")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
  parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
  parser.add_argument("--assignments", nargs="+", choices=ASSIGNMENTS, default=list(ASSIGNMENTS),
                      help="how devices are given to clients: as drawn, or the slowest to the clients of low digits")
  parser.add_argument("--rounds", type=int, default=200, help="rounds per run")
  parser.add_argument("--client-lr", type=float, default=0.05)
  parser.add_argument("--proximal-strength", type=float, default=0.1, help="FedProx's mu")
  parser.add_argument("--dropout", type=float, default=0.1, help="probability a selected client drops out")
  parser.add_argument("--target", type=float, default=0.85, help="test accuracy whose simulated time is reported")
  parser.add_argument("--hidden", type=int, default=32, help="width of the MLP's hidden layer")
  parser.add_argument("--fast", action="store_true", help="1 seed, 4 rounds: a smoke test of the whole pipeline")
  args = parser.parse_args(argv)
  if args.fast:
    args.seeds, args.rounds = [0], 4
  if not 0 < args.target <= 1:
    parser.error(f"--target must be in (0, 1], got {args.target}")
  if args.rounds < 1:
    parser.error("--rounds must be positive")
  if not 0 <= args.dropout < 1:
    parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
  return args


def full_work_seconds(population, data, spec, bits: tuple[int, int]):
  """Every client's full local work's duration (download + compute + upload), in storage order."""
  import numpy as np

  from fedjax_lite import systems

  clients = np.arange(data.num_clients)
  return systems.client_timings(population, clients, steps=spec.num_steps(data, clients),
                                num_examples=spec.num_examples(data, clients), download_bits=bits[0],
                                upload_bits=bits[1]).total_seconds


def assign_by_label(population, data, full_work):
  """The same devices, the slowest given to the clients whose digits are lowest (their mean label): device speed
  correlated with the data, as when older phones are used by a different part of the population."""
  import numpy as np

  sizes = np.diff(data.offsets)
  mean_label = np.add.reduceat(np.asarray(data.examples["y"], np.float64), data.offsets[:-1]) / sizes
  devices = np.argsort(-full_work, kind="stable")                     # slowest device first
  owner = np.empty(data.num_clients, np.int64)
  owner[np.argsort(mean_label, kind="stable")] = devices              # lowest digits get the slowest devices
  return population.replace(**{name: getattr(population, name)[owner] for name in (
      "seconds_per_example", "seconds_per_step", "download_bits_per_second", "upload_bits_per_second")})


def run_synchronous(config: Config, process, data, params, population, args, seed, evaluate, deadline) -> list:
  from fedjax_lite import core, systems, training

  rounds = systems.SystemsRounds(population, config.policy(args, deadline))
  result = training.run_training(
      process, data.train, params, client_spec=core.ClientSpec(batch_size=BATCH_SIZE, num_epochs=LOCAL_EPOCHS),
      clients_per_round=CLIENTS_PER_ROUND, num_rounds=args.rounds, seed=seed, evaluate=evaluate, evaluate_every=1,
      progress=False, systems=rounds)
  return result.history, result.state.params


def run(args: argparse.Namespace) -> dict:
  import jax
  import numpy as np

  from fedjax_lite import algorithms, core, datasets, models, systems

  os.makedirs(args.output_dir, exist_ok=True)
  start = time.perf_counter()
  model = models.mlp(num_classes=10, input_shape=(8, 8, 1), hidden=(args.hidden,))
  processes = {name: CONFIGS[name].build(model, args) for name in args.configs}  # one compilation per algorithm
  evaluator = algorithms.centralized_evaluation(model)
  client_accuracy = algorithms.federated_evaluation(model)
  spec = core.ClientSpec(batch_size=BATCH_SIZE, num_epochs=LOCAL_EPOCHS)
  num_params = sum(int(np.size(leaf)) for leaf in jax.tree.leaves(model.init(jax.random.key(0))))
  bits = (32 * num_params, 32 * num_params)  # float32 model down, float32 delta up (FedNova adds 32 bits)
  rows, curves = [], []
  deadlines = {}
  for assignment in args.assignments:
    for seed in args.seeds:
      data = datasets.load_digits(num_clients=NUM_CLIENTS, seed=seed)
      population = systems.lognormal_systems(NUM_CLIENTS, seed=seed, availability=(
          systems.RandomDropout(args.dropout) if args.dropout > 0 else systems.AlwaysOn()))
      full_work = full_work_seconds(population, data.train, spec, bits)
      if assignment == "by_label":
        population = assign_by_label(population, data.train, full_work)
        full_work = full_work_seconds(population, data.train, spec, bits)
      deadline = float(np.median(full_work))  # the same set of devices: the same median either way
      deadlines[seed] = round(deadline, 3)
      slow = full_work > deadline  # the slower half of the population
      everyone = core.pack_clients(data.train, np.arange(NUM_CLIENTS), batch_size=64)
      params = model.init(jax.random.key(seed))
      initial = float(evaluator(params, data.test)["accuracy"])
      for name in args.configs:
        config = CONFIGS[name]
        runner = config.run or run_synchronous
        run_start = time.perf_counter()
        history, final = runner(config, processes[name], data, params, population, args, seed,
                                lambda p, test=data.test: evaluator(p, test), deadline)
        seconds = time.perf_counter() - run_start
        per_client = jax.device_get(client_accuracy(final, everyone)["per_client"])  # each client's own data
        fairness = algorithms.fairness_metrics(per_client)
        accuracy = np.asarray(per_client["accuracy"], np.float64)
        curve = [(0.0, initial)] + [(float(r["systems/elapsed_seconds"]), float(r["evaluation/accuracy"]))
                                    for r in history]
        reached = next((t for t, value in curve if value >= args.target), None)
        partial = sum(int(r.get("systems/num_partial", 0)) for r in history)
        counted = sum(int(r.get("systems/num_counted", 0)) for r in history)
        rows.append({"assignment": assignment, "config": name, "seed": seed, "rounds": len(history),
                     "simulated_minutes": round(curve[-1][0] / 60, 3),
                     "minutes_to_target": None if reached is None else round(reached / 60, 3),
                     "final_test_accuracy": round(curve[-1][1], 4),
                     "best_test_accuracy": round(max(value for _, value in curve), 4),
                     "partial_share": round(partial / max(counted, 1), 3), "deadline_seconds": round(deadline, 3),
                     "client_accuracy_mean": round(fairness["client_mean"], 4),
                     "client_accuracy_worst_10pct": round(fairness["worst_10_percent"], 4),
                     "slow_minus_fast_accuracy": round(float(accuracy[slow].mean() - accuracy[~slow].mean()), 4),
                     "wall_seconds": round(seconds, 2)})
        curves.append({"assignment": assignment, "config": name, "seed": seed, "round": 0,
                       "simulated_seconds": 0.0, "test_accuracy": round(initial, 4), "num_counted": 0,
                       "num_partial": 0})
        curves.extend({"assignment": assignment, "config": name, "seed": seed, "round": k + 1,
                       "simulated_seconds": round(float(r["systems/elapsed_seconds"]), 3),
                       "test_accuracy": round(float(r["evaluation/accuracy"]), 4),
                       "num_counted": int(r["systems/num_counted"]), "num_partial": int(r["systems/num_partial"])}
                      for k, r in enumerate(history))
        print(f"[cross_device] {assignment:11s} {name:18s} seed={seed}: {curve[-1][0] / 60:6.2f} simulated min, "
              f"final {curve[-1][1]:.3f} ({seconds:.1f} s)", file=sys.stderr, flush=True)
  wall_seconds = time.perf_counter() - start
  horizons = {assignment: min(row["simulated_minutes"] for row in rows if row["assignment"] == assignment)
              for assignment in args.assignments}  # every run of the assignment covers it: compare there
  settings = [setting for assignment in args.assignments
              for setting in summarize([r for r in rows if r["assignment"] == assignment],
                                       [c for c in curves if c["assignment"] == assignment], args,
                                       horizons[assignment])]
  summary = {"config": {key: value for key, value in vars(args).items() if key != "output_dir"},
             "deadline_seconds_per_seed": deadlines, "common_horizon_minutes": horizons, "settings": settings,
             "wall_seconds": round(wall_seconds, 1)}
  write_csv(os.path.join(args.output_dir, "results.csv"), rows)
  write_csv(os.path.join(args.output_dir, "curves.csv"), curves)
  with open(os.path.join(args.output_dir, "summary.json"), "w") as sink:
    json.dump(summary, sink, indent=2)
  plot(curves, args, horizons, os.path.join(args.output_dir, "cross_device.png"))
  for assignment in args.assignments:
    print(f"\ndevices {assignment}:")
    print(table([s for s in settings if s["assignment"] == assignment], args, horizons[assignment]))
  print(f"\nwall time {wall_seconds:.0f} s; results in {args.output_dir}")
  return summary


def accuracy_at(curve_rows: list[dict], minutes: float) -> float:
  """The step function's value at ``minutes``: the accuracy of the last round that ended by then."""
  value = curve_rows[0]["test_accuracy"]
  for row in curve_rows:
    if row["simulated_seconds"] / 60 <= minutes + 1e-12:
      value = row["test_accuracy"]
  return value


def late_accuracy(curve_rows: list[dict], horizon: float) -> float:
  """The step function's time average over the last quarter of the common horizon, ``[0.75 H, H]`` (one round's
  accuracy on pathological non-IID clients jumps by several points; the average is a steadier reading)."""
  import numpy as np

  return float(np.mean([accuracy_at(curve_rows, t) for t in np.linspace(0.75 * horizon, horizon, 200)]))


def summarize(rows: list[dict], curves: list[dict], args, horizon: float) -> list[dict]:
  settings = []
  for name in args.configs:
    runs = [row for row in rows if row["config"] == name]
    late = [late_accuracy([c for c in curves if c["config"] == name and c["seed"] == row["seed"]], horizon)
            for row in runs]
    reached = [row["minutes_to_target"] for row in runs]
    mean = lambda key: round(statistics.fmean(row[key] for row in runs), 4)  # noqa: E731
    settings.append({
        "assignment": runs[0]["assignment"], "config": name, "label": CONFIGS[name].label,
        "late_accuracy_mean": round(statistics.fmean(late), 4),
        "late_accuracy_min": round(min(late), 4), "late_accuracy_max": round(max(late), 4),
        "final_accuracy_mean": mean("final_test_accuracy"),
        "minutes_to_target_per_seed": reached,
        "seconds_per_round_mean": round(statistics.fmean(60 * row["simulated_minutes"] / row["rounds"] for row in runs),
                                        3),
        "partial_share_mean": mean("partial_share"),
        "client_accuracy_mean": mean("client_accuracy_mean"),
        "client_accuracy_worst_10pct_mean": mean("client_accuracy_worst_10pct"),
        "slow_minus_fast_accuracy_mean": mean("slow_minus_fast_accuracy"),
        "slow_minus_fast_accuracy_per_seed": [row["slow_minus_fast_accuracy"] for row in runs],
    })
  return settings


def table(settings: list[dict], args, horizon: float) -> str:
  lines = [f"| configuration | simulated s / round | test accuracy over [{0.75 * horizon:.1f}, {horizon:.1f}] min "
           f"(mean, min-max) | minutes to {args.target:.0%} (per seed) | partial share | after {args.rounds} rounds: "
           "client accuracy mean / worst 10% | slow - fast clients (per seed) |",
           "|---|---|---|---|---|---|---|"]
  for s in settings:
    reached = ", ".join("never" if r is None else f"{r:.2f}" for r in s["minutes_to_target_per_seed"])
    gaps = ", ".join(f"{g:+.3f}" for g in s["slow_minus_fast_accuracy_per_seed"])
    lines.append(f"| {s['label']} | {s['seconds_per_round_mean']:.2f} | {s['late_accuracy_mean']:.3f} "
                 f"({s['late_accuracy_min']:.3f}-{s['late_accuracy_max']:.3f}) | {reached} | "
                 f"{s['partial_share_mean']:.2f} | {s['client_accuracy_mean']:.3f} / "
                 f"{s['client_accuracy_worst_10pct_mean']:.3f} | {s['slow_minus_fast_accuracy_mean']:+.3f} ({gaps}) |")
  return "\n".join(lines)


def write_csv(path: str, rows: list[dict]) -> None:
  with open(path, "w", newline="") as sink:
    writer = csv.DictWriter(sink, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


def plot(curves: list[dict], args, horizons: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  figure, panels = plt.subplots(1, len(args.assignments), figsize=(7 * len(args.assignments), 4.6), squeeze=False,
                                sharey=True)
  for axis, assignment in zip(panels[0], args.assignments):
    mine = [c for c in curves if c["assignment"] == assignment]
    horizon = horizons[assignment]
    grid = np.linspace(0.0, 2.0 * horizon, 400)
    for name in args.configs:
      per_seed = [[c for c in mine if c["config"] == name and c["seed"] == seed] for seed in args.seeds]
      runs = np.array([[accuracy_at(rows, t) for t in grid] for rows in per_seed])
      last = min(rows[-1]["simulated_seconds"] for rows in per_seed) / 60
      shown = grid <= last + 1e-12  # each curve up to where every seed still has data
      line, = axis.step(grid[shown], runs.mean(axis=0)[shown], where="post", label=CONFIGS[name].label, lw=1.2)
      axis.fill_between(grid[shown], runs.min(axis=0)[shown], runs.max(axis=0)[shown], step="post", alpha=0.12,
                        color=line.get_color())
    axis.axvspan(0.75 * horizon, horizon, color="grey", alpha=0.08, lw=0)
    axis.axhline(args.target, color="grey", lw=0.8, ls="--")
    axis.set_xlim(0.0, 2.0 * horizon)
    axis.set_xlabel("simulated time (minutes)")
    axis.set_title(f"devices {assignment.replace('_', ' ')}", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right", fontsize=8)
  panels[0][0].set_ylabel(f"test accuracy (mean, min-max over {len(args.seeds)} seeds)")
  figure.suptitle(f"digits, {NUM_CLIENTS} non-IID clients, {CLIENTS_PER_ROUND} per round, FedScale log-normal "
                  f"systems, {args.dropout:.0%} dropout", fontsize=11)
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)


if __name__ == "__main__":
  run(parse_args())
