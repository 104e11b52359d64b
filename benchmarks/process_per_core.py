"""Process per core: the standard round run by one process per CPU core (jax.distributed) against one process.

Where this sits: issue 12 section 1 asks whether the CPU's cores can be kept busy by one process per core, since
in-process concurrency (parallel client scans, host devices) measured at about one core's throughput
(``benchmarks/README.md``). This script measures, in ONE run with the two configurations interleaved:

* ``one_process``: the library's default CPU setup in one process: :func:`fedjax_lite.configure_cpu` (one host device
  per usable core, single-threaded Eigen) and ``Runner()``, which shards the client axis over those devices;
* ``one_process_jax_defaults``: one process with JAX's own defaults (one CPU device, multi-threaded Eigen;
  ``Runner()`` then runs one sequential scan over the clients) -- the configuration before ``configure_cpu``;
* ``process_per_core``: ``P`` processes on localhost (``P`` = the cores this process may use), each exposing one CPU
  device with single-threaded Eigen (``--pin``: each also pinned to its core with ``taskset``), joined with ``jax.distributed`` (gloo
  collectives); the round's client axis is sharded over the ``P`` devices, each process packs only its clients
  (:mod:`fedjax_lite.training.distributed`), and the partial sums meet in a cross-process all-reduce.

Workload: the standard round of ``benchmarks/round_speed.py`` (original FedAvg CNN, 62 classes, 10 clients x 200
EMNIST-shaped random examples, batch 20, one epoch, client SGD 0.02, server SGD 1.0), the same packed round data
every round with a new key. Every measurement is a fresh set of processes: the first round (compile + run), then
``--rounds`` timed rounds (each ended with ``block_until_ready``); ``steady_s`` is the median. The configurations
alternate ``--repeats`` times (the order rotates each repeat), and the CPU time that OTHER processes used during each
measurement is reported (``others_cpu_fraction``, from ``/proc/stat`` minus this run's own children), because the
machine may be shared. The parameters of the two configurations are compared after the first round (they differ
only by float32 summation order) and after the last (where training amplifies those differences).

Run from the repository root::

  python benchmarks/process_per_core.py              # standard workload, ~4-7 min on a 2-core CPU
  python benchmarks/process_per_core.py --quick      # tiny workload, a smoke test

Output: ONE JSON line on stdout (progress on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
from typing import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

WORKER_TIMEOUT_S = 600


def log(message: str) -> None:
  print(f"[process_per_core {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# Worker: one measurement in this process (one of the P processes, or the one process) ---------------------------


def worker(mode: str, rounds: int, quick: bool, port: int | None, process_id: int, num_processes: int) -> None:
  """Runs the first round and ``rounds`` timed rounds; process 0 (or the one process) prints one JSON line."""
  if mode == "process":
    from fedjax_lite.training import distributed

    distributed.initialize(distributed.DistributedConfig(f"127.0.0.1:{port}", num_processes, process_id,
                                                         local_devices=1))
  elif mode == "one":
    import fedjax_lite

    fedjax_lite.configure_cpu()
  import jax
  import numpy as np
  import optax

  from benchmarks.round_speed import QUICK, STANDARD, make_federated_data
  from fedjax_lite.algorithms import fed_avg
  from fedjax_lite.core import ClientSpec, Runner
  from fedjax_lite.models import original_fedavg_cnn

  workload = QUICK if quick else STANDARD
  data = make_federated_data([workload.examples_per_client] * workload.num_clients, workload.num_classes,
                             workload.image_shape, workload.seed)
  model = original_fedavg_cnn(num_classes=workload.num_classes)
  params = model.init(jax.random.key(workload.seed))
  spec = ClientSpec(batch_size=workload.batch_size, shuffle=False)
  cohort = np.arange(workload.num_clients)
  server = optax.sgd(workload.server_learning_rate)
  if mode == "process":
    mesh = distributed.global_client_mesh()
    process = distributed.distribute_process(
        fed_avg(model, client_learning_rate=workload.client_learning_rate, server_optimizer=server,
                runner=Runner(mesh=mesh)), mesh)
    shard = distributed.ProcessShard(mesh)
    round_data = shard.place(shard.pack(spec, data, cohort, seed=0, round_num=0, num_steps=None,
                                        cohort_size=workload.num_clients))
  else:
    process = fed_avg(model, client_learning_rate=workload.client_learning_rate, server_optimizer=server)
    round_data = jax.device_put(spec.pack(data, cohort, seed=0, round_num=0))
  step = jax.jit(process.next)
  state = process.init(params)
  keys = [jax.random.fold_in(jax.random.key(workload.seed), r) for r in range(rounds + 1)]
  times = []
  sample = lambda tree: [np.asarray(leaf).ravel()[:: max(1, np.asarray(leaf).size // 512)].tolist()  # noqa: E731
                         for leaf in jax.tree.leaves(tree)]
  for r in range(rounds + 1):
    start = time.perf_counter()
    state, metrics, _ = step(state, round_data, keys[r])
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
    if r == 0:
      first_params = sample(state.params)
  if mode != "process" or jax.process_index() == 0:
    print(json.dumps({
        "first_round_s": times[0], "round_s": times[1:], "devices": jax.device_count(),
        "processes": jax.process_count(), "steps_per_client": int(round_data["mask"].shape[1]),
        "first_params": first_params, "params": sample(state.params),
    }), flush=True)
  if mode == "process":
    distributed.shutdown()


# Parent: interleaved measurements ---------------------------------------------------------------------------------


def _free_port() -> int:
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


def _busy_seconds() -> float:
  from benchmarks.round_speed import system_busy_seconds

  return system_busy_seconds()


def _children_cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def measure(mode: str, rounds: int, quick: bool, cores: Sequence[int], pin: bool) -> dict:
  """One measurement in fresh subprocesses; returns process 0's record plus wall time and others' CPU share."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("XLA_FLAGS", None)
  if mode == "process":  # what configure_cpu sets besides the device count (the one-process mode calls it)
    from fedjax_lite.core.cpu import EIGEN_FLAG

    env["XLA_FLAGS"] = EIGEN_FLAG
  script = os.path.abspath(__file__)
  common = ["--rounds", str(rounds)] + (["--quick"] if quick else [])
  if mode in ("one", "jax_defaults"):
    commands = [[sys.executable, script, "--worker", mode, *common]]
  else:
    port = _free_port()
    commands = [(["taskset", "-c", str(core)] if pin else []) +
                [sys.executable, script, "--worker", "process", "--port", str(port), "--process-id", str(k),
                 "--num-processes", str(len(cores)), *common] for k, core in enumerate(cores)]
  busy, own, start = _busy_seconds(), _children_cpu_seconds(), time.perf_counter()
  procs = [subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for command in commands]
  outputs = [proc.communicate(timeout=WORKER_TIMEOUT_S) for proc in procs]
  wall = time.perf_counter() - start
  others = (_busy_seconds() - busy) - (_children_cpu_seconds() - own)
  for proc, (_, err) in zip(procs, outputs):
    if proc.returncode != 0:
      raise RuntimeError(f"{mode} worker failed ({proc.returncode}):\n{err[-3000:]}")
  record = json.loads(outputs[0][0].strip().splitlines()[-1])
  record.update(wall_s=wall, others_cpu_fraction=max(0.0, others) / (wall * (os.cpu_count() or 1)))
  return record


def summarize(records: list[dict]) -> dict:
  steady = [statistics.median(r["round_s"]) for r in records]
  return {"steady_s": statistics.median(steady), "steady_s_per_repeat": steady,
          "min_s": min(min(r["round_s"]) for r in records),
          "first_round_s": statistics.median(r["first_round_s"] for r in records),
          "others_cpu_fraction": [round(r["others_cpu_fraction"], 3) for r in records],
          "devices": records[0]["devices"], "processes": records[0]["processes"]}


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=10, help="timed rounds per measurement (after the first)")
  parser.add_argument("--repeats", type=int, default=2, help="measurements of each configuration, interleaved")
  parser.add_argument("--quick", action="store_true", help="tiny workload (smoke test)")
  parser.add_argument("--pin", action="store_true",
                      help="pin each process to its own core with taskset (measured slower on a shared machine)")
  parser.add_argument("--worker", choices=("one", "jax_defaults", "process"), default=None, help=argparse.SUPPRESS)
  parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
  parser.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument("--num-processes", type=int, default=1, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.rounds < 1 or args.repeats < 1:
    parser.error("--rounds and --repeats must be >= 1")
  if args.worker is not None:
    worker(args.worker, args.rounds, args.quick, args.port, args.process_id, args.num_processes)
    return {}

  import numpy as np

  from benchmarks.round_speed import cpu_model

  cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
  pin = args.pin and shutil.which("taskset") is not None
  if args.pin and not pin:
    log("taskset not found: the processes run unpinned")
  if len(cores) < 2:
    log("only one usable core: the process-per-core configuration runs one process")
  modes = {"one_process": "one", "process_per_core": "process", "one_process_jax_defaults": "jax_defaults"}
  records = {name: [] for name in modes}
  for repeat in range(args.repeats):
    names = list(modes)
    order = names[repeat % len(names):] + names[:repeat % len(names)]
    for name in order:
      log(f"repeat {repeat + 1}/{args.repeats}: {name}")
      record = measure(modes[name], args.rounds, args.quick, cores, pin)
      log(f"  steady {statistics.median(record['round_s']):.3f} s/round, first {record['first_round_s']:.2f} s, "
          f"others used {record['others_cpu_fraction']:.0%} of the CPU")
      records[name].append(record)
  result = {name: summarize(values) for name, values in records.items()}
  def max_difference(key):  # over every 512th parameter of each leaf
    one, many = records["one_process"][-1][key], records["process_per_core"][-1][key]
    return float(max(np.max(np.abs(np.asarray(a) - np.asarray(b))) for a, b in zip(one, many)))

  result.update(
      benchmark="process_per_core", cpu=cpu_model(), usable_cores=len(cores), pinned=pin,
      workload="quick" if args.quick else "standard", rounds=args.rounds, repeats=args.repeats,
      steady_ratio_process_per_core_to_one_process=(result["process_per_core"]["steady_s"]
                                                    / result["one_process"]["steady_s"]),
      steady_ratio_one_process_to_jax_defaults=(result["one_process"]["steady_s"]
                                                / result["one_process_jax_defaults"]["steady_s"]),
      max_abs_param_difference_after_round_1=max_difference("first_params"),
      max_abs_param_difference_after_all_rounds=max_difference("params"),
      max_abs_param_after_round_1=float(max(np.max(np.abs(np.asarray(a)))
                                            for a in records["one_process"][-1]["first_params"])),
  )
  print(json.dumps(result), flush=True)
  return result


if __name__ == "__main__":
  main()
