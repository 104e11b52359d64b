"""Model-speed benchmark: the Shakespeare LSTM's local step inside a client's rolled loop vs the step jitted alone.

Where this sits: ``benchmarks/`` measures the facts behind the models' design (``fedjax_lite/models/recurrent.py``).
On XLA:CPU a convolution's backward pass inside a rolled loop was ~10x slower than alone
(jax-ml/jax#12868, ``docs/xla_cpu.md``); this script checks that the recurrent models do not pay such a price in the
loops the library runs them in. Run it from the repository root::

  python benchmarks/model_speed.py                 # the reference's model: embedding 8, LSTM 256 x 2, T = 80
  python benchmarks/model_speed.py --quick         # tiny sizes, a smoke test (seconds)

Workload: ``fedjax_lite.models.shakespeare_lstm()`` (820,522 parameters), one client of ``--steps`` batches of
``--batch-size`` random sequences of ``--sequence-length`` ids, in the library's packed layout (``x``, ``y``
``[steps, batch, T]``, ``mask`` ``[steps, batch]``, ``num_examples``), client SGD.

Variants, for each time-loop unroll in ``--unrolls`` (1 = the LSTM's time loop fully rolled):

* ``alone``: ONE local step (forward, masked loss and metric sums, gradient, SGD update) jitted by itself and
  called ``--steps`` times from Python;
* ``in_loop``: ``fedjax_lite.algorithms.train_locally`` over the client's ``--steps`` batches in one jitted call
  (a rolled ``lax.fori_loop``, the library's client loop), per step;
* ``vmap_in_loop``: the same under ``jax.vmap`` over ``--vmap-clients`` clients (the runner's accelerator
  strategy), per client step.

Timing: after a warm-up call per variant, ``--repeats`` repetitions with the variants interleaved round-robin, so
machine noise hits all alike; medians. ``ratio_in_loop_vs_alone`` (target <= 1.3) compares the two at the same
unroll. ``--model cifar100_resnet18`` runs the same comparison for the GroupNorm ResNet-18 on 24x24x3 crops
(batch 20, no time loop). Output: one JSON line on stdout (progress on stderr); ``--output PATH`` appends it to a file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lite.algorithms import train_locally
from fedjax_lite.core.model import masked_loss_and_metric_sums
from fedjax_lite.models import cifar100_resnet18, shakespeare_lstm

MODELS = ("shakespeare_lstm", "cifar100_resnet18")


def log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def packed_client(steps: int, batch_size: int, sequence_length: int, vocab_ids: int, seed: int) -> dict:
  """One client's packed data of random ids (no padding: every example real)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, vocab_ids, size=(steps, batch_size, sequence_length + 1)).astype(np.int32)
  return {
      "x": ids[..., :-1],
      "y": ids[..., 1:],
      "mask": np.ones((steps, batch_size), bool),
      "num_examples": np.int32(steps * batch_size),
  }


def packed_images(steps: int, batch_size: int, seed: int) -> dict:
  """One client's packed CIFAR-100 crops (24x24x3 uniform [0, 1)) with labels in [0, 100)."""
  rng = np.random.default_rng(seed)
  return {
      "x": rng.random((steps, batch_size, 24, 24, 3), dtype=np.float32),
      "y": rng.integers(0, 100, (steps, batch_size)).astype(np.int32),
      "mask": np.ones((steps, batch_size), bool),
      "num_examples": np.int32(steps * batch_size),
  }


def build_variants(model, params, client: dict, learning_rate: float, vmap_clients: int) -> dict:
  optimizer = optax.sgd(learning_rate)
  rng = jax.random.key(0)

  @jax.jit
  def one_step(params, opt_state, batch, mask, step_rng):
    def loss_fn(p):
      return masked_loss_and_metric_sums(model, p, batch, mask, step_rng, True)

    (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, sums

  in_loop = jax.jit(lambda p, data, key: train_locally(model, optimizer, p, data, key))
  vmapped = jax.jit(jax.vmap(lambda p, data, key: train_locally(model, optimizer, p, data, key), in_axes=(None, 0, 0)))

  steps = client["mask"].shape[0]
  batches = [({"x": client["x"][s], "y": client["y"][s]}, client["mask"][s]) for s in range(steps)]
  batches = jax.device_put(batches)
  device_client = jax.device_put(client)
  if vmap_clients > 0:
    stacked = jax.device_put(jax.tree.map(lambda v: np.stack([v] * vmap_clients), client))
    keys = jax.random.split(rng, vmap_clients)

  def run_alone():
    p, state = params, optimizer.init(params)
    for step, (batch, mask) in enumerate(batches):
      p, state, _ = one_step(p, state, batch, mask, jax.random.fold_in(rng, step))
    jax.block_until_ready(p)

  def run_in_loop():
    jax.block_until_ready(in_loop(params, device_client, rng))

  def run_vmap():
    jax.block_until_ready(vmapped(params, stacked, keys))

  def max_abs_difference() -> float:
    """Max |difference| of the final parameters of the two ways (they compute the same steps)."""
    p, state = params, optimizer.init(params)
    for step, (batch, mask) in enumerate(batches):
      p, state, _ = one_step(p, state, batch, mask, jax.random.fold_in(rng, step))
    looped, _ = in_loop(params, device_client, rng)
    return max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(looped), jax.tree.leaves(p)))

  variants = {"alone": (run_alone, steps), "in_loop": (run_in_loop, steps)}
  if vmap_clients > 0:
    variants["vmap_in_loop"] = (run_vmap, steps * vmap_clients)
  return variants, max_abs_difference


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test")
  parser.add_argument("--model", choices=MODELS, default="shakespeare_lstm")
  parser.add_argument("--batch-size", type=int, default=None,
                      help="examples per batch (default 10 sequences, McMahan et al.; 20 images for the ResNet)")
  parser.add_argument("--sequence-length", type=int, default=80)
  parser.add_argument("--steps", type=int, default=10, help="local steps of the client")
  parser.add_argument("--unrolls", default="1,8", help="comma-separated time-loop unrolls to compare")
  parser.add_argument("--vmap-clients", type=int, default=2, help="clients under vmap (0: skip that variant)")
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--learning-rate", type=float, default=1.0)
  parser.add_argument("--output", default=None, help="also append the JSON line to this file")
  args = parser.parse_args(argv)
  if args.batch_size is None:
    args.batch_size = 20 if args.model == "cifar100_resnet18" else 10
  for name in ("batch_size", "sequence_length", "steps", "repeats"):
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be >= 1")
  if args.vmap_clients < 0:
    parser.error("--vmap-clients must be >= 0")
  try:
    unrolls = [int(u) for u in args.unrolls.split(",")]
  except ValueError:
    parser.error(f"--unrolls must be comma-separated ints, got {args.unrolls!r}")
  if not unrolls or min(unrolls) < 1:
    parser.error("--unrolls must be positive ints")

  model_kwargs = {}
  if args.model == "cifar100_resnet18":
    unrolls = [1]  # no time loop
  if args.quick:
    args.batch_size, args.sequence_length, args.steps, args.repeats = 2, 8, 3, 2
    model_kwargs = ({"initial_filters": 4} if args.model == "cifar100_resnet18" else
                    {"vocab_size": 6, "embedding_size": 4, "lstm_sizes": (8, 8)})

  report = {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "cpu": platform.processor() or platform.machine(),
      "quick": args.quick,
      "model": args.model,
      "workload": {"batch_size": args.batch_size, "sequence_length": args.sequence_length, "steps": args.steps,
                   "vmap_clients": args.vmap_clients, "repeats": args.repeats},
      "unrolls": {},
  }
  for unroll in unrolls:
    if args.model == "cifar100_resnet18":
      model = cifar100_resnet18(**model_kwargs)
      params = jax.jit(model.init)(jax.random.key(1))
      client = packed_images(args.steps, args.batch_size, seed=0)
    else:
      model = shakespeare_lstm(sequence_length=args.sequence_length, unroll=unroll, **model_kwargs)
      params = jax.jit(model.init)(jax.random.key(1))
      client = packed_client(args.steps, args.batch_size, args.sequence_length, params["embedding"].shape[0], seed=0)
    report["num_params"] = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
    log(f"unroll={unroll}: compiling")
    variants, max_abs_difference = build_variants(model, params, client, args.learning_rate, args.vmap_clients)
    first_s = {}
    for name, (run, _) in variants.items():
      start = time.perf_counter()
      run()
      first_s[name] = time.perf_counter() - start
    times = {name: [] for name in variants}
    names = list(variants)
    for repeat in range(args.repeats):
      for name in names[repeat % len(names):] + names[: repeat % len(names)]:
        run, _ = variants[name]
        start = time.perf_counter()
        run()
        times[name].append(time.perf_counter() - start)
    result = {}
    for name, (_, count) in variants.items():
      result[name] = {"ms_per_step": 1e3 * statistics.median(times[name]) / count,
                      "best_ms_per_step": 1e3 * min(times[name]) / count, "first_call_s": first_s[name]}
    result["ratio_in_loop_vs_alone"] = result["in_loop"]["ms_per_step"] / result["alone"]["ms_per_step"]
    if "vmap_in_loop" in result:
      result["ratio_vmap_in_loop_vs_alone"] = result["vmap_in_loop"]["ms_per_step"] / result["alone"]["ms_per_step"]
    result["max_abs_param_diff_in_loop_vs_alone"] = max_abs_difference()
    log(f"unroll={unroll}: " + json.dumps(result))
    report["unrolls"][str(unroll)] = result
  line = json.dumps(report)
  print(line, flush=True)
  if args.output:
    with open(args.output, "a") as f:
      f.write(line + "\n")
  return report


if __name__ == "__main__":
  main()
