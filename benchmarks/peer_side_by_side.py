"""The library against pfl-research on the two peer workloads, interleaved in one run, with the ratios.

Where this sits: ``benchmarks/``; the peer itself is ``pfl_peer.py`` (run in its own environment, see
``benchmarks/README.md``, "pfl-research as a peer"). Never part of the test suite (its smoke test runs the library
side only). Run from the repository root, with the library's environment::

  .venv/bin/python benchmarks/peer_side_by_side.py --pfl-python .venv-pfl/bin/python        # ~15-25 min
  .venv/bin/python benchmarks/peer_side_by_side.py --pfl-python .venv-pfl/bin/python --workloads standard \\
      --repeats 1 --rounds 6                                                                 # a quick look

Configurations, each a fresh process per measurement (so every one pays its own start, and its first round is a
cold first round):

* ``library``: ``fed_avg`` on the workload's zoo model (:func:`fedjax_lite.models.original_fedavg_cnn` /
  :func:`~fedjax_lite.models.cnn_dropout`), ``jax.jit(process.next)`` on a cohort packed by ``pack_clients``, after
  :func:`fedjax_lite.configure_cpu` (the README's setup: one XLA:CPU device per core, the clients sharded over
  them); ``--library-xla-flags`` adds XLA flags (a separate configuration ``library+flags``);
* ``pfl_1proc``: pfl in one process with PyTorch's default intra-op threads (one per core);
* ``pfl_workers``: pfl's multi-worker mode, ``torchrun --standalone --nproc_per_node=<cores>`` with one
  single-threaded worker per core (``OMP_NUM_THREADS=1``).

The configurations run round-robin ``--repeats`` times, the order rotated each repetition, so machine noise hits
them alike; each measurement reports its steady seconds per round (the median of rounds 3..R) and its first round.
``ratios`` divides the library's median steady time by each pfl configuration's, and by pfl's best (the faster of
the two); ``cpu_time_library_to_*`` divides the CPU seconds per steady round (all of a configuration's processes
and threads), the steadier figure on a loaded machine (it counts work, not waiting; spinning threads count too). Output: one JSON line on stdout (and ``--output``), progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:  # run as a script: the repository root, for ``benchmarks.report``
  sys.path.insert(0, ROOT)
from benchmarks import report  # noqa: E402

# The two workloads, as pfl_peer.WORKLOADS (the library side reads them from here).
WORKLOADS = {
    "standard": dict(users=10, examples=200, image=(28, 28, 1), classes=62, batch=20, local_lr=0.02,
                     weighting="num_examples"),
    "cifar10": dict(users=50, examples=50, image=(32, 32, 3), classes=10, batch=10, local_lr=0.1,
                    weighting="uniform"),
}


def log(message: str) -> None:
  print(f"[peer_side_by_side {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# The library's side (a child process) --------------------------------------------------------------------------------


def library_child(workload_name: str, rounds: int, seed: int, configure: bool, quick: bool = False) -> dict:
  """Runs ``rounds`` FedAvg rounds of the library on the workload and returns the per-round times (``quick``: the
  same model on 2 clients of 2 batches, a smoke test)."""
  start = time.perf_counter()
  import fedjax_lite

  devices = fedjax_lite.configure_cpu() if configure else 1
  import jax
  import numpy as np
  import optax

  from fedjax_lite.algorithms import fed_avg
  from fedjax_lite.core import FederatedData, pack_clients
  from fedjax_lite.models import cnn_dropout, original_fedavg_cnn

  workload = dict(WORKLOADS[workload_name])
  if quick:
    workload.update(users=2, examples=2 * workload["batch"])
  rng = np.random.default_rng(seed)
  total = workload["users"] * workload["examples"]
  examples = {"x": rng.random((total,) + workload["image"], dtype=np.float32),
              "y": rng.integers(0, workload["classes"], total).astype(np.int32)}
  data = FederatedData(tuple(f"user{k}" for k in range(workload["users"])), examples,
                       np.arange(0, total + 1, workload["examples"]))
  if workload_name == "standard":
    model = original_fedavg_cnn(num_classes=62)
  else:
    model = cnn_dropout(num_classes=10, input_shape=workload["image"])
  process = fed_avg(model, client_optimizer=optax.sgd, client_learning_rate=workload["local_lr"],
                    server_optimizer=optax.sgd(1.0), weighting=workload["weighting"])
  round_data = pack_clients(data, np.arange(workload["users"]), batch_size=workload["batch"], seed=seed)
  state = process.init(model.init(jax.random.key(seed)))
  step = jax.jit(process.next)
  keys = jax.random.split(jax.random.key(seed + 1), rounds)
  marks, cpu_marks = [time.perf_counter()], [time.process_time()]
  for index in range(rounds):
    state, metrics, _ = step(state, round_data, keys[index])
    jax.block_until_ready((state, metrics))
    marks.append(time.perf_counter())
    cpu_marks.append(time.process_time())
  rounds_s = [b - a for a, b in zip(marks, marks[1:])]
  cpu_s = [b - a for a, b in zip(cpu_marks, cpu_marks[1:])]
  return {"system": "fedjax_lite", "workload": workload_name, "rounds": rounds,
          "round_s": [round(r, 4) for r in rounds_s], "first_round_s": round(rounds_s[0], 3),
          "first_round_cpu_s": round(cpu_s[0], 3),
          "startup_s": round(marks[0] - start, 3), "steady_s": round(statistics.median(rounds_s[2:] or rounds_s), 4),
          "cpu_round_s": [round(c, 4) for c in cpu_s], "steady_cpu_s": round(statistics.median(cpu_s[2:] or cpu_s), 4),
          "cpu_devices": devices, "users": workload["users"], "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", "")}


# The driver ----------------------------------------------------------------------------------------------------------


def run_json(command: list[str], env: dict, timeout: float) -> dict:
  """Runs a child and returns the last JSON line of its stdout (or an error record)."""
  started = time.perf_counter()
  try:
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout} s"}
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  if proc.returncode != 0 or not lines:
    return {"error": f"exit {proc.returncode}", "stderr_tail": proc.stderr[-2000:]}
  records = [json.loads(line) for line in lines]
  result = next((r for r in records if r.get("rank", 0) == 0), records[-1])
  if len(records) > 1 and all("steady_cpu_s" in r for r in records):  # several workers: their CPU time adds up
    result["steady_cpu_s"] = round(sum(r["steady_cpu_s"] for r in records), 4)
    result["worker_steady_s"] = [r["steady_s"] for r in records]
  result["process_wall_s"] = round(time.perf_counter() - started, 2)
  return result


def configurations(args) -> dict[str, tuple[list[str], dict]]:
  cores = len(os.sched_getaffinity(0))
  base_env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "OMP_NUM_THREADS")}
  configs = {}
  library = [sys.executable, os.path.abspath(__file__), "--child", "library"]
  configs["library"] = (library, dict(base_env))
  if args.library_xla_flags:
    configs["library+flags"] = (library, dict(base_env, XLA_FLAGS=args.library_xla_flags))
  if args.pfl_python:
    pfl = [os.path.join(HERE, "pfl_peer.py")]
    configs["pfl_1proc"] = ([args.pfl_python] + pfl, dict(base_env))
    torchrun = os.path.join(os.path.dirname(args.pfl_python), "torchrun")
    if not os.path.exists(torchrun):
      torchrun = shutil.which("torchrun") or torchrun
    configs["pfl_workers"] = ([torchrun, "--standalone", "--nnodes=1", f"--nproc_per_node={cores}"] + pfl,
                              dict(base_env, OMP_NUM_THREADS="1"))
  return configs


def summarize(samples: dict[str, list[dict]]) -> dict:
  out = {}
  for name, results in samples.items():
    good = [r for r in results if "steady_s" in r]
    out[name] = {
        "steady_s": [r["steady_s"] for r in good], "first_round_s": [r["first_round_s"] for r in good],
        "first_round_cpu_s": [r.get("first_round_cpu_s") for r in good],
        "median_steady_s": round(statistics.median([r["steady_s"] for r in good]), 4) if good else None,
        "steady_cpu_s": [r.get("steady_cpu_s") for r in good],
        "median_steady_cpu_s": (round(statistics.median([r["steady_cpu_s"] for r in good]), 4)
                                if good and all("steady_cpu_s" in r for r in good) else None),
        "errors": [r for r in results if "error" in r],
    }
  return out


def ratios(summary: dict) -> dict:
  lib = summary.get("library", {}).get("median_steady_s")
  pfl = {k: v["median_steady_s"] for k, v in summary.items() if k.startswith("pfl") and v["median_steady_s"]}
  out = {}
  if lib and pfl:
    for name, value in pfl.items():
      out[f"library_to_{name}"] = round(lib / value, 3)
    out["library_to_pfl_best"] = round(lib / min(pfl.values()), 3)
    lib_cpu = summary["library"].get("median_steady_cpu_s")
    for name in pfl:
      if lib_cpu and summary[name].get("median_steady_cpu_s"):
        out[f"cpu_time_library_to_{name}"] = round(lib_cpu / summary[name]["median_steady_cpu_s"], 3)
    if summary.get("library+flags", {}).get("median_steady_s"):
      out["library+flags_to_pfl_best"] = round(summary["library+flags"]["median_steady_s"] / min(pfl.values()), 3)
      out["library+flags_to_library"] = round(summary["library+flags"]["median_steady_s"] / lib, 3)
  return out


def paired_ratios(samples: dict[str, list[dict]]) -> dict:
  """Library / pfl per repetition (the two measured back to back), then the median over repetitions."""
  out = {}
  lib = samples.get("library", [])
  for name in samples:
    if not name.startswith("pfl"):
      continue
    pairs = [a["steady_s"] / b["steady_s"] for a, b in zip(lib, samples[name]) if "steady_s" in a and "steady_s" in b]
    if pairs:
      out[f"library_to_{name}"] = {"per_repeat": [round(p, 3) for p in pairs], "median": round(statistics.median(pairs), 3)}
  return out




def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workloads", default="standard,cifar10")
  parser.add_argument("--rounds", type=int, default=12)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--pfl-python", default=None, help="python of the pfl environment (omit: library only)")
  parser.add_argument("--library-xla-flags", default=None, help="also run the library with these XLA_FLAGS")
  parser.add_argument("--configs", default=None,
                      help="comma list of configurations to run (default: library, [library+flags,] pfl_1proc, "
                           "pfl_workers)")
  parser.add_argument("--timeout", type=float, default=1800)
  parser.add_argument("--output", default=None)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--jax-defaults", action="store_true", help="library child: skip configure_cpu()")
  parser.add_argument("--quick", action="store_true",
                      help="tiny cohorts (2 clients of 2 batches), the library only unless --pfl-python: a smoke test")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--workload", default="standard", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  if args.child == "library":
    result = library_child(args.workload, args.rounds, args.seed, configure=not args.jax_defaults, quick=args.quick)
    print(json.dumps(result), flush=True)
    return result

  configs = configurations(args)
  if args.configs:
    wanted = args.configs.split(",")
    unknown = sorted(set(wanted) - set(configs))
    if unknown:
      parser.error(f"unknown configurations {unknown}; available: {sorted(configs)}")
    configs = {name: configs[name] for name in wanted}
  result = {"benchmark": "peer_side_by_side", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "cpu": report.cpu_model(),
            "cores": len(os.sched_getaffinity(0)), "load_average_start": os.getloadavg(), "rounds": args.rounds,
            "repeats": args.repeats, "configurations": list(configs)}
  for workload in args.workloads.split(","):
    samples: dict[str, list[dict]] = {name: [] for name in configs}
    names = list(configs)
    for rep in range(args.repeats):
      order = names[rep % len(names):] + names[:rep % len(names)]
      for name in order:
        command, env = configs[name]
        extra = ["--workload", workload, "--rounds", str(args.rounds), "--seed", str(args.seed)]
        if name.startswith("library") and args.jax_defaults:
          extra.append("--jax-defaults")
        if name.startswith("library") and args.quick:
          extra.append("--quick")
        load = os.getloadavg()[0]
        record = run_json(command + extra, env, args.timeout)
        record["load_average_before"] = load
        samples[name].append(record)
        log(f"{workload} rep {rep} {name}: steady {record.get('steady_s')} s, first {record.get('first_round_s')} s"
            + (f" ERROR {record['error']}: {record.get('stderr_tail', '')[-300:]}" if "error" in record else ""))
    summary = summarize(samples)
    result[workload] = {"summary": summary, "ratios": ratios(summary), "paired": paired_ratios(samples),
                        "raw": samples}
    log(f"{workload}: " + json.dumps(result[workload]["ratios"]))
  result["load_average_end"] = os.getloadavg()
  report.emit(result, args.output)
  return result


if __name__ == "__main__":
  main()
