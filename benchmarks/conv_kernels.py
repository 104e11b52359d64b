"""Per-layer kernel times of the two peer workloads' CNNs: XLA:CPU (this library's convolutions) against PyTorch.

Where this sits: ``benchmarks/`` explains the round-level ratios of ``pfl_peer.py`` (the library against Apple's
pfl-research, whose clients run eager PyTorch with oneDNN kernels) one kernel at a time. It needs a Python
environment with both jax and torch; ``benchmarks/README.md`` ("pfl-research as a peer") gives the one command
that makes it. Run from the repository root::

  .venv-pfl/bin/python benchmarks/conv_kernels.py                     # both workloads, ~3-6 min
  .venv-pfl/bin/python benchmarks/conv_kernels.py --workload standard --repeats 3 --calls 3   # quick look
  XLA_FLAGS=--xla_cpu_use_onednn=true .venv-pfl/bin/python benchmarks/conv_kernels.py       # another XLA path

What it times, per layer of the model (standard: the McMahan CNN at batch 20 on 28x28x1; cifar10: pfl's
``simple_cnn`` at batch 10 on 32x32x3):

* ``fwd``: the layer's convolution (or matmul) alone; ``dx``: the gradient with respect to its input; ``dw``: the
  gradient with respect to its kernel. JAX: each a jitted function (the library's :func:`conv2d_canonical` and its
  canonical backward convolutions; ``jnp.dot`` for dense layers), called from Python. PyTorch: ``F.conv2d`` in
  NCHW (what pfl's model runs) and ``aten.convolution_backward`` with one output selected; ``F.linear`` and its two
  matmuls.
* ``step``: the whole SGD step of the model (forward, softmax cross-entropy, backward, update). JAX: the library's
  model in a rolled ``lax.scan`` over ``--scan-steps`` batches, per step (the form a client's local epoch runs in).
  PyTorch: ``nn.Sequential`` in NCHW (pfl's benchmark model, its NHWC input permuted first), ``loss.backward()``,
  ``torch.optim.SGD.step()``.
* ``--formulations``: other ways to compute the same JAX kernels (``im2col`` matmuls for the weight gradient and the
  forward pass, bf16 inputs with float32 accumulation), so that each can be judged against the library's.

Every op is called ``--calls`` times in a row per repetition, the ops interleaved round-robin within each
repetition (the start rotating), so that load on a shared machine hits all of them alike; over ``--repeats``
repetitions the script reports the median and the best (minimum) of the mean wall time per call (``median``,
``best``), and the same of the process's CPU time per call (``cpu_median``, ``cpu_best``: on a loaded machine the
CPU time a single-threaded op consumes is far steadier than its wall time, which includes waiting for a core). The process runs on
one core (``--cores 1``: pinned to the first usable core, PyTorch with one thread, XLA:CPU with single-threaded
Eigen), the setting of both systems' fastest configurations (one client stream per core). PyTorch in the same
process is the yardstick: ``ratio`` = JAX time / PyTorch time, which stays meaningful when absolute times do not.

Output: one JSON line on stdout (progress on stderr); ``--output PATH`` appends it to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Sequence


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workload", choices=("standard", "cifar10", "both"), default="both")
  parser.add_argument("--repeats", type=int, default=7, help="interleaved repetitions (median taken)")
  parser.add_argument("--calls", type=int, default=10, help="calls per op per repetition (mean taken)")
  parser.add_argument("--scan-steps", type=int, default=10, help="steps of the JAX step's rolled scan")
  parser.add_argument("--cores", type=int, default=1, help="cores to run on (1: pinned, single-threaded kernels)")
  parser.add_argument("--formulations", action="store_true", help="also time other JAX formulations (im2col, bf16)")
  parser.add_argument("--no-torch", action="store_true", help="JAX only (no PyTorch installed)")
  parser.add_argument("--only", default=None, help="regular expression: time only the ops whose name matches")
  parser.add_argument("--output", default=None)
  return parser.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.cores >= 1:
  cores = sorted(os.sched_getaffinity(0))[:ARGS.cores]
  os.sched_setaffinity(0, cores)
  if ARGS.cores == 1 and "xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from fedjax_lite.models import CNNDropout, OriginalFedAvgCNN  # noqa: E402
from fedjax_lite.models.conv import conv2d_canonical  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: the repository root, for ``benchmarks.report``
  sys.path.insert(0, ROOT)
from benchmarks import report  # noqa: E402


def log(message: str) -> None:
  print(f"[conv_kernels {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# The two workloads' layers: (name, kind, input shape NHWC or [B, K], kernel [kh, kw, C, O] or [K, O], padding).
WORKLOADS = {
    "standard": dict(batch=20, image=(28, 28, 1), classes=62, layers=[
        ("conv1", "conv", (20, 28, 28, 1), (5, 5, 1, 32), "SAME"),
        ("conv2", "conv", (20, 14, 14, 32), (5, 5, 32, 64), "SAME"),
        ("dense1", "dense", (20, 3136), (3136, 512), None),
        ("dense2", "dense", (20, 512), (512, 62), None),
    ]),
    "cifar10": dict(batch=10, image=(32, 32, 3), classes=10, layers=[
        ("conv1", "conv", (10, 32, 32, 3), (3, 3, 3, 32), "VALID"),
        ("conv2", "conv", (10, 30, 30, 32), (3, 3, 32, 64), "VALID"),
        ("dense1", "dense", (10, 12544), (12544, 128), None),
        ("dense2", "dense", (10, 128), (128, 10), None),
    ]),
}


def conv_out_hw(in_shape, kernel_shape, padding):
  h, w = in_shape[1:3]
  kh, kw = kernel_shape[:2]
  return (h, w) if padding == "SAME" else (h - kh + 1, w - kw + 1)


def layer_flops(kind, in_shape, kernel_shape, padding) -> float:
  """Multiply-adds x 2 of the forward op (each gradient op costs the same)."""
  if kind == "dense":
    return 2.0 * in_shape[0] * kernel_shape[0] * kernel_shape[1]
  oh, ow = conv_out_hw(in_shape, kernel_shape, padding)
  kh, kw, c, o = kernel_shape
  return 2.0 * in_shape[0] * oh * ow * kh * kw * c * o


# JAX ops -------------------------------------------------------------------------------------------------------------


def im2col_patches(x, kh, kw, padding):
  if padding == "SAME":
    x = jnp.pad(x, ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)))
  oh, ow = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  cols = jnp.stack([x[:, a:a + oh, b:b + ow, :] for a in range(kh) for b in range(kw)], axis=3)
  return cols.reshape(x.shape[0] * oh * ow, kh * kw * x.shape[3])


def jax_ops(layer, rng, formulations: bool) -> dict[str, tuple[Callable, tuple]]:
  name, kind, in_shape, kernel_shape, padding = layer
  x = jnp.asarray(rng.standard_normal(in_shape, dtype=np.float32))
  w = jnp.asarray(rng.standard_normal(kernel_shape, dtype=np.float32) * 0.05)
  if kind == "dense":
    fwd = lambda x, w: jnp.dot(x, w)
  else:
    fwd = lambda x, w: conv2d_canonical(x, w, padding)
  y = jax.eval_shape(fwd, x, w)
  dy = jnp.asarray(rng.standard_normal(y.shape, dtype=np.float32))
  dx = lambda x, w, dy: jax.vjp(lambda x: fwd(x, w), x)[1](dy)[0]
  dw = lambda x, w, dy: jax.vjp(lambda w: fwd(x, w), w)[1](dy)[0]
  ops = {"fwd": (jax.jit(fwd), (x, w)), "dx": (jax.jit(dx), (x, w, dy)), "dw": (jax.jit(dw), (x, w, dy))}
  if formulations and kind == "conv":
    kh, kw, c, o = kernel_shape

    def dw_im2col(x, w, dy):
      cols = im2col_patches(x, kh, kw, padding)
      return jnp.dot(cols.T, dy.reshape(-1, o)).reshape(kernel_shape)

    def fwd_im2col(x, w):
      cols = im2col_patches(x, kh, kw, padding)
      return jnp.dot(cols, w.reshape(-1, o)).reshape(y.shape)

    def bf16(f):
      def run(x, w, *rest):
        out = f(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), *[r.astype(jnp.bfloat16) for r in rest])
        return out.astype(jnp.float32)
      return run

    def fwd_bf16_f32acc(x, w):
      return jax.lax.conv_general_dilated(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), (1, 1), padding,
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                          preferred_element_type=jnp.float32)

    ops.update({
        "dw_im2col": (jax.jit(dw_im2col), (x, w, dy)),
        "fwd_im2col": (jax.jit(fwd_im2col), (x, w)),
        "fwd_bf16": (jax.jit(bf16(fwd)), (x, w)),
        "fwd_bf16_f32acc": (jax.jit(fwd_bf16_f32acc), (x, w)),
        "dx_bf16": (jax.jit(bf16(dx)), (x, w, dy)),
        "dw_bf16": (jax.jit(bf16(dw)), (x, w, dy)),
    })
  return ops


def jax_step(workload: dict, rng, scan_steps: int):
  """The library model's SGD step in a rolled scan of ``scan_steps`` batches (per-step time = call / steps)."""
  if workload["classes"] == 62:
    module = OriginalFedAvgCNN(num_classes=62)
    lr = 0.02
  else:
    module = CNNDropout(num_classes=10)
    lr = 0.1
  shape = (scan_steps, workload["batch"]) + workload["image"]
  images = jnp.asarray(rng.random(shape, dtype=np.float32))
  labels = jnp.asarray(rng.integers(0, workload["classes"], shape[:2]).astype(np.int32))
  params = module.init({"params": jax.random.key(0)}, images[0])["params"]

  def loss_fn(p, x, y, key):
    logits = module.apply({"params": p}, x, train=True, rngs={"dropout": key})
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def epoch(p, xs, ys, key):
    def body(p, batch):
      x, y, k = batch
      g = jax.grad(loss_fn)(p, x, y, k)
      return jax.tree.map(lambda a, b: a - lr * b, p, g), None
    keys = jax.random.split(key, xs.shape[0])
    return jax.lax.scan(body, p, (xs, ys, keys))[0]

  return jax.jit(epoch), (params, images, labels, jax.random.key(1)), scan_steps


# PyTorch ops ---------------------------------------------------------------------------------------------------------


def torch_ops(layer, rng):
  import torch
  import torch.nn.functional as F

  name, kind, in_shape, kernel_shape, padding = layer
  if kind == "dense":
    x = torch.from_numpy(rng.standard_normal(in_shape, dtype=np.float32))
    w = torch.from_numpy(rng.standard_normal(kernel_shape[::-1], dtype=np.float32) * 0.05)  # [out, in]
    dy = torch.from_numpy(rng.standard_normal((in_shape[0], kernel_shape[1]), dtype=np.float32))
    return {"fwd": (lambda: F.linear(x, w)), "dx": (lambda: dy @ w), "dw": (lambda: dy.t() @ x)}
  kh, kw, c, o = kernel_shape
  x = torch.from_numpy(rng.standard_normal((in_shape[0], c) + in_shape[1:3], dtype=np.float32))  # NCHW
  w = torch.from_numpy(rng.standard_normal((o, c, kh, kw), dtype=np.float32) * 0.05)  # OIHW
  pad = (kh // 2, kw // 2) if padding == "SAME" else (0, 0)
  y = F.conv2d(x, w, padding=pad)
  dy = torch.randn_like(y)
  args = (dy, x, w, None, (1, 1), pad, (1, 1), False, (0, 0), 1)
  backward = torch.ops.aten.convolution_backward
  return {
      "fwd": lambda: F.conv2d(x, w, padding=pad),
      "dx": lambda: backward(*args, (True, False, False))[0],
      "dw": lambda: backward(*args, (False, True, False))[1],
  }


def torch_step(workload: dict, rng):
  """pfl's benchmark model (channels-first after a permute, as its ``Transpose2D`` layer does) and SGD step."""
  import torch
  from torch import nn

  class ToNCHW(nn.Module):
    def forward(self, x):
      return x.permute(0, 3, 1, 2)

  if workload["classes"] == 62:
    model = nn.Sequential(ToNCHW(), nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(3136, 512), nn.ReLU(), nn.Linear(512, 62))
    lr = 0.02
  else:
    model = nn.Sequential(ToNCHW(), nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Dropout(0.25), nn.Flatten(), nn.Linear(12544, 128), nn.ReLU(),
                          nn.Dropout(0.5), nn.Linear(128, 10))
    lr = 0.1
  model.train()
  optimizer = torch.optim.SGD(model.parameters(), lr)
  x = torch.from_numpy(rng.random((workload["batch"],) + workload["image"], dtype=np.float32))
  y = torch.from_numpy(rng.integers(0, workload["classes"], workload["batch"]))
  loss_fn = nn.CrossEntropyLoss()

  def step():
    optimizer.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward()
    optimizer.step()

  return step


# Timing --------------------------------------------------------------------------------------------------------------


def make_timer(kind: str, fn, args=(), steps: int = 1):
  if kind == "jax":
    def run():
      return jax.block_until_ready(fn(*args))
  else:
    import torch

    def run():
      with torch.no_grad() if steps == 0 else _null():
        return fn()
  return run, max(steps, 1)


class _null:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def measure(ops: dict[str, tuple[Callable, int]], repeats: int, calls: int, stat=statistics.median
            ) -> dict[str, dict[str, float]]:
  """Median and minimum over repetitions of the mean ms per call (per step for multi-step programs), the ops
  interleaved round-robin with a rotating start."""
  for run, _ in ops.values():  # compile / warm up
    run()
    run()
  samples = {name: [] for name in ops}
  cpu_samples = {name: [] for name in ops}
  names = list(ops)
  for rep in range(repeats):
    order = names[rep % len(names):] + names[:rep % len(names)]
    for name in order:
      run, steps = ops[name]
      start, cpu_start = time.perf_counter(), time.process_time()
      for _ in range(calls):
        run()
      samples[name].append(1000 * (time.perf_counter() - start) / calls / steps)
      cpu_samples[name].append(1000 * (time.process_time() - cpu_start) / calls / steps)
  return {"median": {name: statistics.median(values) for name, values in samples.items()},
          "best": {name: min(values) for name, values in samples.items()},
          "cpu_median": {name: statistics.median(values) for name, values in cpu_samples.items()},
          "cpu_best": {name: min(values) for name, values in cpu_samples.items()}}




def run_workload(name: str, args) -> dict:
  workload = WORKLOADS[name]
  rng = np.random.default_rng(0)
  ops: dict[str, tuple[Callable, int]] = {}
  flops: dict[str, float] = {}
  for layer in workload["layers"]:
    layer_name, kind, in_shape, kernel_shape, padding = layer
    for op, (fn, op_args) in jax_ops(layer, rng, args.formulations).items():
      ops[f"jax/{layer_name}/{op}"] = make_timer("jax", fn, op_args)
      flops[f"{layer_name}/{op.split('_')[0]}"] = layer_flops(kind, in_shape, kernel_shape, padding)
    if not args.no_torch:
      for op, fn in torch_ops(layer, rng).items():
        ops[f"torch/{layer_name}/{op}"] = make_timer("torch", fn, steps=0)
  fn, step_args, steps = jax_step(workload, rng, args.scan_steps)
  ops["jax/step"] = make_timer("jax", fn, step_args, steps)
  if not args.no_torch:
    ops["torch/step"] = make_timer("torch", torch_step(workload, rng), steps=1)
  if args.only:
    import re
    ops = {k: v for k, v in ops.items() if re.search(args.only, k)}
  log(f"{name}: {len(ops)} ops, {args.repeats} repetitions x {args.calls} calls")
  measured = measure(ops, args.repeats, args.calls)
  out = {stat: summarize(measured[stat], flops, args) for stat in measured}
  return out


def summarize(ms: dict[str, float], flops: dict[str, float], args) -> dict:
  """ms per op, JAX/PyTorch ratios, GFLOP/s, the layer ops' sum and the rest of the step."""
  out = {"ms": {k: round(v, 4) for k, v in ms.items()}, "ratio_jax_to_torch": {}, "gflops_per_s": {}}
  for key, value in ms.items():
    system, rest = key.split("/", 1)
    if rest != "step" and "/".join(rest.split("/")[:2]).split("_")[0] not in flops:
      continue
    if rest != "step":
      base = "/".join(rest.split("/")[:2]).split("_")[0]
      out["gflops_per_s"][key] = round(flops[base] / value / 1e6, 1)
    if system == "jax" and f"torch/{rest.split('_')[0] if rest != 'step' else rest}" in ms:
      ref = ms[f"torch/{rest.split('_')[0]}" if rest != "step" else "torch/step"]
      out["ratio_jax_to_torch"][rest] = round(value / ref, 3)
  # The ops a training step runs: every layer's fwd and dw, and dx of all but the first layer (the input needs none).
  layers_ms = {s: sum(v for k, v in ms.items() if k.startswith(s + "/") and k.count("/") == 2
                      and k.split("/")[2] in ("fwd", "dx", "dw") and not k.endswith("conv1/dx"))
               for s in ("jax", "torch")}
  out["sum_of_layer_ops_ms"] = {k: round(v, 3) for k, v in layers_ms.items()}
  if "jax/step" in ms and "torch/step" in ms:
    out["other_ms"] = {s: round(ms[f"{s}/step"] - layers_ms[s], 3) for s in ("jax", "torch")}
  return out


def main() -> dict:
  args = ARGS or parse_args()
  if not args.no_torch:
    import torch
    torch.set_num_threads(max(1, args.cores))
  result = {
      "benchmark": "conv_kernels", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "cpu": report.cpu_model(),
      "jax": jax.__version__, "python": platform.python_version(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "cores": sorted(os.sched_getaffinity(0)), "load_average": os.getloadavg(),
      "repeats": args.repeats, "calls": args.calls,
  }
  if not args.no_torch:
    import torch
    result["torch"] = torch.__version__
    result["torch_threads"] = torch.get_num_threads()
  for name in (("standard", "cifar10") if args.workload == "both" else (args.workload,)):
    result[name] = run_workload(name, args)
    log(f"{name} (best): " + json.dumps(result[name]["best"]["ratio_jax_to_torch"]))
  result["load_average_end"] = os.getloadavg()
  report.emit(result, args.output)
  return result


if __name__ == "__main__":
  main()
