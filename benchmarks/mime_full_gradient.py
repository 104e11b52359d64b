"""How to compute MimeLite's full-batch gradient at the server weights on XLA:CPU: per batch, or in larger batches?

MimeLite's client computes ``g_i = grad f_i(x)`` over its whole data before its local steps (one more forward and
backward pass per example). Fewer, larger ops are often faster on XLA, so this compares, on the standard workload
(the original FedAvg CNN, 10 clients x 200 examples, batch 20) and inside two independent scans, each over half of
the clients (as two host devices run them under ``fedjax_lite.configure_cpu()``, here in one program):

* ``loop``: the library's ``client_gradient``, one batch per step of a rolled loop (padded steps skipped);
* ``one_batch``: the client's whole packed data as ONE batch (``steps x batch`` examples, padding included);
* ``chunks_2`` / ``chunks_4``: the step axis in 2 or 4 larger batches, a chunk with no real example skipped;
* ``vmap``: ``vmap`` of the per-batch gradient over the step axis, then the sum;
* ``train``: one epoch of local SGD (``train_locally``), for scale.

All compute the same sum up to its order (the script prints the largest difference to ``loop``). Variants are
interleaved; ratios are to ``loop``. Usage: ``python benchmarks/mime_full_gradient.py [--rounds 3]
[--num-steps 10]`` (``--num-steps`` packs exactly that many steps; default the packing's power-of-two bucket, 16).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--num-steps", type=int, default=None)
  args = parser.parse_args(argv)

  from fedjax_lite import models
  from fedjax_lite.algorithms.local_training import client_gradient, split_steps, train_locally
  from fedjax_lite.core import FederatedData, pack_clients
  from fedjax_lite.core.model import masked_loss_and_metric_sums

  num_clients, examples, batch_size = 10, 200, 20
  rng = np.random.default_rng(0)
  data = FederatedData.from_arrays(
      {"x": rng.random((num_clients * examples, 28, 28, 1), dtype=np.float32),
       "y": rng.integers(0, 62, num_clients * examples).astype(np.int32)},
      np.repeat(np.arange(num_clients), examples))
  round_data = jax.device_put(pack_clients(data, np.arange(num_clients), batch_size=batch_size,
                                           num_steps=args.num_steps))
  model = models.original_fedavg_cnn(num_classes=62)
  params = model.init(jax.random.key(0))

  def batch_gradient(p, batch, key):
    """(grad of the batch's summed loss, its number of real examples)."""
    mask = batch["mask"]
    features = {k: v for k, v in batch.items() if k != "mask"}

    def summed(q):
      _, sums = masked_loss_and_metric_sums(model, q, features, mask, key, True)
      return sums["loss"], sums["num_examples"]

    return jax.grad(summed, has_aux=True)(p)

  def chunked(p, client_data, key, chunks):
    steps, _ = split_steps(client_data)
    num_steps = steps["mask"].shape[0]
    grouped = jax.tree.map(lambda x: x.reshape((chunks, num_steps // chunks * x.shape[1]) + x.shape[2:]), steps)

    def body(total, batch):
      grad, count = jax.lax.cond(jnp.any(batch["mask"]), lambda b: batch_gradient(p, b, key),
                                 lambda b: (jax.tree.map(jnp.zeros_like, p), jnp.zeros((), jnp.int32)), batch)
      return (jax.tree.map(jnp.add, total[0], grad), total[1] + count), None

    (grad, count), _ = jax.lax.scan(body, (jax.tree.map(jnp.zeros_like, p), jnp.zeros((), jnp.int32)), grouped)
    return jax.tree.map(lambda g: g / jnp.maximum(count, 1), grad)

  def vmapped(p, client_data, key):
    steps, _ = split_steps(client_data)
    grads, counts = jax.vmap(lambda b: batch_gradient(p, b, key))(steps)
    return jax.tree.map(lambda g: g.sum(0) / jnp.maximum(counts.sum(), 1), grads)

  num_steps = round_data["mask"].shape[1]
  variants = {
      "loop": lambda p, d, k: client_gradient(model, p, d, k)[0],
      "one_batch": lambda p, d, k: chunked(p, d, k, 1),
      "chunks_2": lambda p, d, k: chunked(p, d, k, 2),
      "chunks_4": lambda p, d, k: chunked(p, d, k, 4),
      "vmap": vmapped,
      "train": lambda p, d, k: train_locally(model, optax.sgd(0.02), p, d, k)[0],
  }
  variants = {name: fn for name, fn in variants.items() if not name.startswith("chunks_")
              or num_steps % int(name.split("_")[1]) == 0}

  def over_clients(fn):
    def program(p, data, key):
      def scan_clients(half):
        def body(total, client_data):
          return jax.tree.map(jnp.add, total, fn(p, client_data, key)), None
        return jax.lax.scan(body, jax.tree.map(jnp.zeros_like, p), half)[0]
      halves = [scan_clients(jax.tree.map(lambda x, i=i: x[i::2], data)) for i in range(2)]
      return jax.tree.map(jnp.add, *halves)
    return jax.jit(program)

  programs = {name: over_clients(fn) for name, fn in variants.items()}
  key = jax.random.key(0)
  outputs = {name: jax.block_until_ready(program(params, round_data, key)) for name, program in programs.items()}
  seconds = {name: [] for name in programs}
  for _ in range(args.rounds):
    for name, program in programs.items():
      start = time.perf_counter()
      jax.block_until_ready(program(params, round_data, key))
      seconds[name].append(time.perf_counter() - start)
  median = {name: statistics.median(values) for name, values in seconds.items()}
  print(json.dumps({
      "benchmark": "mime_full_gradient", "num_steps": int(num_steps),
      "seconds": {name: round(value, 3) for name, value in median.items()},
      "ratio_to_loop": {name: round(value / median["loop"], 2) for name, value in median.items()},
      "max_abs_difference_to_loop": {
          name: max(float(jnp.max(jnp.abs(a - b))) for a, b in
                    zip(jax.tree.leaves(outputs[name]), jax.tree.leaves(outputs["loop"])))
          for name in outputs if name != "train"},
      "jax": jax.__version__, "date": time.strftime("%Y-%m-%d")}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
