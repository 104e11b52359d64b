"""The accelerator check: one prepared run that verifies fedjax_lite on a GPU/TPU and prints ONE JSON line.

Issues 12 and 18. On one accelerator it takes under 5 minutes (``--budget-s``, default 290, bounds the whole run:
a section that would start after the budget is spent is recorded as skipped). It measures:

* ``environment`` -- backend, devices, and whether ``Runner().resolved_strategy()`` (the default runner) is ``vmap``
  (it must be on GPU/TPU);
* ``cpu_equivalence`` -- one FedAvg round of a small model (dense softmax, convex and smooth, so a rounding
  difference cannot flip a branch) run with ``Runner('vmap')`` on the default device against the CPU reference
  (``Runner('sequential')`` under ``jax.default_device(cpu)``), at ``highest`` matmul precision (the pass/fail
  check) and at the default precision (reported only: GPUs may use TF32 for float32 matmuls). Tolerance: each
  entry of the update is a sum of at most ``terms = steps * batch * (features + 1) + clients`` float32 products
  and partial sums, so a reordering of those sums moves it by at most ``terms * eps32 * scale`` (Higham's bound
  for recursive summation, ``gamma_n ~ n * eps``), ``scale`` the largest absolute update entry;
* ``standard_round`` -- the standard round (original FedAvg CNN, 62 classes, EMNIST-shaped 28x28x1 random data,
  200 examples per client, batch 20, one epoch = 10 steps, client SGD 0.02) at cohorts of 10, 100 and 1,000 clients
  with the default runner: first round (compile), median s/round, clients/s, device memory;
* ``centralized_ratio`` -- the round against a centralized loop of equal FLOPs: ``steps`` SGD steps of batch
  ``clients * batch`` over the same examples (one ``lax.scan``, the same model and loss); target <= 1.2x at 1,000
  clients;
* ``largest_cohort`` -- the largest cohort of the standard round that runs with ``vmap`` and with ``chunked``: a
  bounded doubling search (``--search-start``, ``--search-max``) that catches RESOURCE_EXHAUSTED (the data is made
  on the device, so host memory does not limit it);
* ``digits_main_job`` -- the CLI's main job (``fedjax-lite train`` defaults: FedAvg, the CNN on scikit-learn's
  digits, 50 clients, 10 per round, 100 rounds) through ``fedjax_lite.training.run_training``: rounds/s of the
  per-round loop, then of whole training on the device (``rounds_per_dispatch=R``, default 25) and their ratio
  (``whole_training.speedup_steady``; target >= 3x).

Every measurement runs in its own ``try``: an error is recorded in the JSON (``{"error": ...}``), never raised.

Usage (on the GPU machine): ``python benchmarks/accelerator_check.py [--output results.jsonl]``.
Smoke mode on CPU (what the test suite runs; about 20 s of CPU time):
``JAX_PLATFORMS=cpu python benchmarks/accelerator_check.py --platform cpu`` -- tiny sizes (cohorts 2 and 4, 20
examples per client, a dense softmax instead of the CNN).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform as platform_module
import statistics
import sys
import time
import traceback

from fedjax_lite.training.cli import positive_float, positive_int

EPS32 = 2.0 ** -23  # float32 unit roundoff x 2 (machine epsilon)


def _parse_cohorts(text: str) -> list[int]:
  try:
    values = [int(part) for part in text.split(",") if part.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"cohorts must be comma-separated positive ints, got {text!r}") from None
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(f"cohorts must be comma-separated positive ints, got {text!r}")
  return values


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--platform", default=None,
                      help="JAX platform to run on (e.g. cpu, cuda); 'cpu' selects the smoke sizes. Default: JAX's")
  parser.add_argument("--smoke", action="store_true", help="tiny sizes (implied by --platform cpu)")
  parser.add_argument("--full", action="store_true", help="full sizes even with --platform cpu (slow)")
  parser.add_argument("--budget-s", type=positive_float, default=290.0, help="total time budget in seconds")
  parser.add_argument("--cohorts", type=_parse_cohorts, default=None, help="default 10,100,1000 (smoke: 2,4)")
  parser.add_argument("--rounds", type=positive_int, default=3, help="timed rounds per cohort after one warm-up")
  parser.add_argument("--search-start", type=positive_int, default=None, help="first cohort of the memory search")
  parser.add_argument("--search-max", type=positive_int, default=None, help="the memory search stops here")
  parser.add_argument("--digits-rounds", type=positive_int, default=None,
                      help="rounds of the digits main job (default: the CLI's 100; smoke: 2)")
  parser.add_argument("--rounds-per-dispatch", type=positive_int, default=None,
                      help="R of the digits job's whole-training-on-the-device run (default 25; smoke: 2)")
  parser.add_argument("--output", default=None, help="also append the JSON line to this file")
  return parser


class Budget:
  """Wall-clock budget of the whole run; ``left()`` seconds remain."""

  def __init__(self, seconds: float):
    self.seconds = seconds
    self.start = time.perf_counter()

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def left(self) -> float:
    return self.seconds - self.elapsed()


def guarded(report: dict, name: str, budget: Budget, fn, *args, **kwargs):
  """Runs ``fn`` and stores its result (or its error, or 'skipped') under ``report[name]``; never raises."""
  if budget.left() <= 0:
    report[name] = {"skipped": f"time budget of {budget.seconds:g} s spent"}
    return None
  start = time.perf_counter()
  try:
    result = fn(*args, **kwargs)
  except Exception as error:  # noqa: BLE001 -- the point: record, do not crash
    result = {"error": f"{type(error).__name__}: {str(error)[:2000]}",
              "traceback_tail": traceback.format_exc()[-1500:]}
  result = dict(result)
  result["section_s"] = round(time.perf_counter() - start, 3)
  report[name] = result
  gc.collect()
  return result


def is_out_of_memory(error: BaseException) -> bool:
  text = f"{type(error).__name__}: {error}"
  return any(marker in text for marker in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM"))


def device_memory() -> dict:
  """``memory_stats()`` of the first default device (GPU/TPU); ``{}`` where the backend gives none (CPU)."""
  import jax

  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # noqa: BLE001 -- some backends do not implement it
    stats = None
  if not stats:
    return {}
  keys = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit", "largest_alloc_size")
  return {key: int(stats[key]) for key in keys if key in stats}


# Workloads --------------------------------------------------------------------------------------------------------


def sizes(smoke: bool) -> dict:
  if smoke:
    return dict(examples=20, batch=10, num_classes=62, cohorts=[2, 4], search_start=4, search_max=4,
                digits_rounds=2, rounds_per_dispatch=2, model="dense")
  return dict(examples=200, batch=20, num_classes=62, cohorts=[10, 100, 1000], search_start=1000,
              search_max=65536, digits_rounds=None, rounds_per_dispatch=25, model="cnn")


def make_model(kind: str, num_classes: int):
  from fedjax_lite import models

  if kind == "cnn":
    return models.original_fedavg_cnn(num_classes=num_classes, input_shape=(28, 28, 1))
  return models.dense_softmax(num_classes=num_classes, input_shape=(28, 28, 1))


def device_round_data(num_clients: int, examples: int, batch: int, num_classes: int, seed: int = 0):
  """The packed round (``[clients, steps, batch, ...]``, every example real) made on the default device."""
  import jax
  import jax.numpy as jnp

  steps = -(-examples // batch)

  @jax.jit
  def make(key):
    image_key, label_key = jax.random.split(key)
    x = jax.random.uniform(image_key, (num_clients, steps, batch, 28, 28, 1), jnp.float32)
    y = jax.random.randint(label_key, (num_clients, steps, batch), 0, num_classes, jnp.int32)
    mask = jnp.arange(steps * batch).reshape(steps, batch) < examples
    return {"x": x, "y": y, "mask": jnp.broadcast_to(mask, (num_clients, steps, batch)),
            "num_examples": jnp.full((num_clients,), examples, jnp.int32)}

  return make(jax.random.key(seed))


def host_round_data(num_clients: int, examples: int, batch: int, num_classes: int, seed: int = 0):
  """The same kind of round packed on the host with ``pack_clients`` (numpy random data)."""
  import numpy as np

  from fedjax_lite.core import FederatedData, pack_clients

  rng = np.random.default_rng(seed)
  images = rng.random((num_clients * examples, 28, 28, 1), dtype=np.float32)
  labels = rng.integers(0, num_classes, num_clients * examples).astype(np.int32)
  data = FederatedData.from_arrays({"x": images, "y": labels}, np.repeat(np.arange(num_clients), examples))
  return pack_clients(data, np.arange(num_clients), batch_size=batch, shuffle=False)


def time_rounds(step, state, round_data, rounds: int, budget: Budget):
  """Runs one warm-up round then up to ``rounds`` timed ones (fewer if the budget runs out)."""
  import jax

  start = time.perf_counter()
  state, metrics, _ = step(state, round_data, jax.random.key(0))
  jax.block_until_ready((state, metrics))
  first = time.perf_counter() - start
  seconds = []
  for repetition in range(rounds):
    if seconds and budget.left() < 2 * seconds[-1]:
      break
    start = time.perf_counter()
    state, metrics, _ = step(state, round_data, jax.random.key(repetition + 1))
    jax.block_until_ready((state, metrics))
    seconds.append(time.perf_counter() - start)
  return state, first, seconds


# Sections -------------------------------------------------------------------------------------------------------


def environment_section() -> dict:
  import jax
  import jaxlib

  from fedjax_lite.core import Runner

  devices = jax.devices()
  resolved = Runner().resolved_strategy()
  return {
      "backend": jax.default_backend(),
      "device_kind": devices[0].device_kind,
      "num_devices": len(devices),
      "default_runner_strategy": resolved,
      "default_runner_is_vmap": resolved == "vmap",
      "expected_default": "sequential" if jax.default_backend() == "cpu" else "vmap",
      "ok": resolved == ("sequential" if jax.default_backend() == "cpu" else "vmap"),
      "jax": jax.__version__, "jaxlib": jaxlib.__version__,
  }


def cpu_equivalence_section(smoke: bool) -> dict:
  """One FedAvg round of a dense softmax: ``vmap`` on the default device vs ``sequential`` on the CPU."""
  import jax
  import numpy as np

  from fedjax_lite.algorithms import fed_avg
  from fedjax_lite.core import Runner

  num_clients, examples, batch, num_classes = (3, 20, 10, 10) if smoke else (16, 40, 10, 10)
  features = 28 * 28
  model = make_model("dense", num_classes)
  round_data = host_round_data(num_clients, examples, batch, num_classes, seed=1)
  steps = round_data["mask"].shape[1]
  cpu = jax.devices("cpu")[0]

  def one_round(strategy, device, precision):
    process = fed_avg(model, client_learning_rate=0.1, runner=Runner(strategy))
    with jax.default_device(device), jax.default_matmul_precision(precision):
      params = jax.device_put(model.init(jax.random.key(0)), device)
      state = process.init(params)
      state, metrics, _ = jax.jit(process.next)(state, jax.device_put(round_data, device), jax.random.key(7))
      update = jax.tree.map(lambda new, old: np.asarray(new) - np.asarray(old), state.params, params)
      return update, metrics

  accelerator = jax.devices()[0]
  reference, _ = one_round("sequential", cpu, "highest")
  result = {"model": f"dense softmax 784 -> {num_classes}", "clients": num_clients, "examples_per_client": examples,
            "batch": batch, "steps": steps, "device": str(accelerator), "reference": str(cpu)}
  terms = steps * batch * (features + 1) + num_clients
  scale = max(float(np.max(np.abs(leaf))) for leaf in jax.tree.leaves(reference))
  tolerance = terms * EPS32 * scale
  result["tolerance"] = tolerance
  result["tolerance_formula"] = "steps*batch*(features+1)+clients terms x eps32 x max|update|"
  for precision in ("highest", "default"):
    if precision == "default" and accelerator.platform == "cpu":
      result["default_precision"] = {"same_as": "highest (XLA:CPU computes float32 matmuls in float32)"}
      continue
    update, _ = one_round("vmap", accelerator, precision)
    leaves = jax.tree.leaves(update)
    if not all(np.all(np.isfinite(leaf)) for leaf in leaves):
      result[f"{precision}_precision"] = {"error": "non-finite update on the device"}
      continue
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(leaves, jax.tree.leaves(reference)))
    result[f"{precision}_precision"] = {"max_abs_diff": diff, "within_tolerance": diff <= tolerance}
  result["ok"] = bool(result["highest_precision"].get("within_tolerance", False))
  return result


def standard_round_section(cfg: dict, rounds: int, budget: Budget) -> dict:
  """The standard round at each cohort, with the default runner, plus the centralized loop of equal FLOPs."""
  import jax

  from fedjax_lite.algorithms import fed_avg
  from fedjax_lite.core import Runner

  model = make_model(cfg["model"], cfg["num_classes"])
  params = model.init(jax.random.key(0))
  process = fed_avg(model, client_learning_rate=0.02, runner=Runner())
  step = jax.jit(process.next)
  results = {"workload": f"{cfg['model']} ({cfg['num_classes']} classes), {cfg['examples']} examples/client, "
                         f"batch {cfg['batch']}, 1 epoch, client SGD 0.02",
             "runner": Runner().resolved_strategy(), "cohorts": {}}
  for cohort in cfg["cohorts"]:
    entry = {}
    results["cohorts"][str(cohort)] = entry
    if budget.left() <= 0:
      entry["skipped"] = "time budget spent"
      continue
    try:
      round_data = device_round_data(cohort, cfg["examples"], cfg["batch"], cfg["num_classes"])
      _, first, seconds = time_rounds(step, process.init(params), round_data, rounds, budget)
      median = statistics.median(seconds) if seconds else first
      entry.update(first_round_s=round(first, 4), seconds_per_round=round(median, 5),
                   all_rounds=[round(s, 5) for s in seconds], clients_per_s=round(cohort / median, 2),
                   device_memory=device_memory())
      entry["centralized"] = centralized_loop(model, round_data, rounds, budget)
      if "seconds_per_loop" in entry["centralized"]:
        entry["ratio_round_to_centralized"] = round(median / entry["centralized"]["seconds_per_loop"], 3)
      del round_data
    except Exception as error:  # noqa: BLE001
      entry["error"] = f"{type(error).__name__}: {str(error)[:1000]}"
    gc.collect()
  largest = str(max(cfg["cohorts"]))
  ratio = results["cohorts"].get(largest, {}).get("ratio_round_to_centralized")
  results["target"] = {"ratio_round_to_centralized_at": int(largest), "at_most": 1.2,
                       "met": None if ratio is None else ratio <= 1.2}
  return results


def centralized_loop(model, round_data, rounds: int, budget: Budget) -> dict:
  """``steps`` SGD steps of batch ``clients * batch`` over the round's examples: the same FLOPs, one client."""
  import jax
  import jax.numpy as jnp

  def to_central(values):  # [clients, steps, batch, ...] -> [steps, clients * batch, ...]
    moved = jnp.moveaxis(values, 1, 0)
    return moved.reshape((moved.shape[0], moved.shape[1] * moved.shape[2]) + moved.shape[3:])

  central = jax.jit(lambda data: {key: to_central(data[key]) for key in ("x", "y", "mask")})(round_data)

  @jax.jit
  def loop(params, data):
    def body(params, batch):
      def loss_fn(params):
        predictions = model.apply(params, batch, None, True)
        per_example = model.loss(batch, predictions)
        weights = batch["mask"].astype(per_example.dtype)
        return jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1.0)

      grads = jax.grad(loss_fn)(params)
      return jax.tree.map(lambda p, g: p - 0.02 * g, params, grads), None

    params, _ = jax.lax.scan(body, params, data)
    return params

  params = model.init(jax.random.key(0))
  start = time.perf_counter()
  out = loop(params, central)
  jax.block_until_ready(out)
  first = time.perf_counter() - start
  seconds = []
  for _ in range(rounds):
    if seconds and budget.left() < 2 * seconds[-1]:
      break
    start = time.perf_counter()
    out = loop(params, central)
    jax.block_until_ready(out)
    seconds.append(time.perf_counter() - start)
  median = statistics.median(seconds) if seconds else first
  steps, central_batch = central["mask"].shape
  return {"steps": int(steps), "batch": int(central_batch), "first_s": round(first, 4),
          "seconds_per_loop": round(median, 5)}


def doubling_search(try_cohort, start: int, maximum: int, time_left) -> dict:
  """The largest cohort in ``start, 2 start, 4 start, ... <= maximum`` for which ``try_cohort(cohort)`` (returning
  a dict of measurements) does not raise.

  The search stops at the first failure: ``stopped_by`` is ``'out of memory'`` for RESOURCE_EXHAUSTED (or another
  out-of-memory message), ``'error'`` for anything else; ``'time budget'`` when ``time_left()`` seconds would not
  cover 3x the last trial; ``'reached search_max'`` otherwise.
  """
  tried, fits, stop = [], None, "reached search_max"
  cohort, last_s = start, 0.0
  while cohort <= maximum:
    if time_left() < 3 * last_s + 1:
      stop = "time budget"
      break
    began = time.perf_counter()
    try:
      measured = try_cohort(cohort)
    except Exception as error:  # noqa: BLE001 -- an allocation failure is the answer, not a crash
      oom = is_out_of_memory(error)
      tried.append({"clients": cohort, "ok": False, "out_of_memory": oom,
                    "error": f"{type(error).__name__}: {str(error)[:300]}"})
      stop = "out of memory" if oom else "error"
      break
    finally:
      gc.collect()
    last_s = time.perf_counter() - began
    tried.append({"clients": cohort, "ok": True, "round_s": round(last_s, 3), **measured})
    fits = cohort
    cohort *= 2
  return {"largest_fitting_cohort": fits, "stopped_by": stop, "tried": tried}


def largest_cohort_section(cfg: dict, budget: Budget) -> dict:
  """For ``vmap`` and ``chunked``: the largest cohort (doubling from ``search_start`` to ``search_max``) whose
  standard round runs; a RESOURCE_EXHAUSTED ends the search for that strategy. Each strategy gets its share of
  the time left."""
  import jax

  from fedjax_lite.algorithms import fed_avg
  from fedjax_lite.core import Runner

  model = make_model(cfg["model"], cfg["num_classes"])
  params = model.init(jax.random.key(0))
  results = {"search": f"doubling from {cfg['search_start']} to at most {cfg['search_max']}"}
  strategies = ("vmap", "chunked")
  for position, strategy in enumerate(strategies):
    deadline = budget.elapsed() + budget.left() / (len(strategies) - position)
    process = fed_avg(model, client_learning_rate=0.02, runner=Runner(strategy))
    step = jax.jit(process.next)

    def try_cohort(cohort, step=step, process=process):
      round_data = device_round_data(cohort, cfg["examples"], cfg["batch"], cfg["num_classes"])
      jax.block_until_ready(step(process.init(params), round_data, jax.random.key(0)))
      return {"device_memory": device_memory()}

    results[strategy] = doubling_search(try_cohort, cfg["search_start"], cfg["search_max"],
                                        lambda: min(budget.left(), deadline - budget.elapsed()))
    del step, try_cohort
    jax.clear_caches()
    gc.collect()
  return results


def _steady_rounds_per_s(result, first_rounds: int) -> float | None:
  """Rounds/s after the first round (per-round loop) or the first dispatch (scanned), which hold compilation."""
  rounds_done = len(result.history)
  steady = result.seconds - result.first_round_seconds
  return round((rounds_done - first_rounds) / steady, 3) if rounds_done > first_rounds and steady > 0 else None


def digits_section(rounds: int | None, smoke: bool, rounds_per_dispatch: int, budget: Budget) -> dict:
  """The CLI's main job (``fedjax-lite train`` defaults) through ``run_training``: the per-round loop (host packing,
  one dispatch per round), then whole training on the device (``rounds_per_dispatch``: the population on the
  device, R rounds per dispatch) -- rounds/s of each and their ratio (issue target: >= 3x on an accelerator)."""
  import jax

  from fedjax_lite.training import cli
  from fedjax_lite.training.loop import run_training

  argv = ["train"] + ([] if rounds is None else ["--rounds", str(rounds)])
  if smoke:
    argv += ["--model", "dense"]  # the CNN's compile alone would take most of the smoke budget on CPU
  args = cli.build_parser().parse_args(argv)
  train_data, test_data, model, process, client_spec, runner, _ = cli._build_job(args)  # the CLI's own job
  del test_data

  def run(dispatch):
    return run_training(process, train_data, model.init(jax.random.key(args.seed)), client_spec=client_spec,
                        clients_per_round=args.clients_per_round, num_rounds=args.rounds, seed=args.seed,
                        progress=False, rounds_per_dispatch=dispatch)

  result = run(None)
  rounds_done = len(result.history)
  report = {
      "job": f"fedjax-lite train {' '.join(argv[1:])}".strip(),
      "model": args.model, "clients_per_round": args.clients_per_round, "local_epochs": args.local_epochs,
      "batch_size": args.batch_size, "runner": runner.resolved_strategy(), "rounds": rounds_done,
      "evaluation": "off (the CLI evaluates every 5 rounds; rounds/s here is training only)",
      "seconds": round(result.seconds, 3), "first_round_s": round(result.first_round_seconds, 3),
      "rounds_per_s": round(rounds_done / result.seconds, 3),
      "rounds_per_s_after_first": _steady_rounds_per_s(result, 1),
      "final_train_loss": result.history[-1].get("client_work/train/loss"),
  }
  if budget.left() < 2 * result.seconds + 5:
    report["whole_training"] = {"skipped": "time budget"}
    return report
  dispatch = min(rounds_per_dispatch, rounds_done)
  scanned = run(dispatch)
  whole = {
      "rounds_per_dispatch": dispatch, "rounds": len(scanned.history), "seconds": round(scanned.seconds, 3),
      "first_dispatch_s": round(scanned.first_round_seconds, 3),
      "rounds_per_s": round(len(scanned.history) / scanned.seconds, 3),
      "rounds_per_s_after_first_dispatch": _steady_rounds_per_s(scanned, dispatch),
      "final_train_loss": scanned.history[-1].get("client_work/train/loss"),
  }
  per_round, whole_steady = report["rounds_per_s_after_first"], whole["rounds_per_s_after_first_dispatch"]
  whole["speedup_steady"] = round(whole_steady / per_round, 3) if per_round and whole_steady else None
  whole["speedup_end_to_end"] = round(result.seconds / scanned.seconds, 3)
  whole["target"] = {"speedup_steady_at_least": 3.0,
                     "met": None if whole["speedup_steady"] is None else whole["speedup_steady"] >= 3.0}
  report["whole_training"] = whole
  return report


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  if args.platform:
    os.environ["JAX_PLATFORMS"] = args.platform if args.platform == "cpu" else f"{args.platform},cpu"
  import jax

  if args.platform:
    jax.config.update("jax_platforms", os.environ["JAX_PLATFORMS"])
  smoke = (args.smoke or args.platform == "cpu") and not args.full
  cfg = sizes(smoke)
  if args.cohorts:
    cfg["cohorts"] = args.cohorts
  for key in ("search_start", "search_max", "digits_rounds", "rounds_per_dispatch"):
    if getattr(args, key) is not None:
      cfg[key] = getattr(args, key)
  budget = Budget(args.budget_s)
  report = {"benchmark": "accelerator_check", "smoke": smoke, "budget_s": args.budget_s,
            "date": time.strftime("%Y-%m-%d"), "python": platform_module.python_version()}
  guarded(report, "environment", budget, environment_section)
  guarded(report, "cpu_equivalence", budget, cpu_equivalence_section, smoke)
  guarded(report, "standard_round", budget, standard_round_section, cfg, args.rounds, budget)
  guarded(report, "digits_main_job", budget, digits_section, cfg["digits_rounds"], smoke, cfg["rounds_per_dispatch"],
          budget)
  guarded(report, "largest_cohort", budget, largest_cohort_section, cfg, budget)  # open-ended: last
  report["device_memory_end"] = device_memory()
  report["total_s"] = round(budget.elapsed(), 2)
  report["errors"] = sorted(name for name, value in report.items()
                            if isinstance(value, dict) and "error" in value)
  line = json.dumps(report, default=str)
  print(line, flush=True)
  if args.output:
    with open(args.output, "a") as file:
      file.write(line + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
