"""Peak memory of the library's LoRA round at 1, 10 and 100 clients under ``vmap``: one shared base, or one per client?

Issue #21's bound: with a frozen base and per-client adapters, the cohort's memory holds ONE copy of the base, not
one per client. What makes or breaks it is where the base lives in the client's training. Both variants are the
library's real rounds (``process.next`` of a :func:`fedjax_lite.algorithms.build_round` process, with
``Runner(strategy='vmap')``: every client of the round in flight at once, as on an accelerator):

* ``shared`` -- :func:`fedjax_lite.algorithms.lora_fine_tuning`: the base is part of the broadcast (unbatched,
  ``in_axes=None``) and each client trains a :func:`fedjax_lite.core.partial_model` whose params are the adapters
  alone; the base is a loop-invariant input of every client's local-training loop, and only the adapters are
  uploaded.
* ``in_params`` -- :func:`fedjax_lite.algorithms.fed_avg` on the whole model with the base frozen by the optax mask
  (:func:`fedjax_lite.core.partition_optimizer`, ``optax.set_to_zero``): exact too, but the base is then carried by
  the local-training ``while_loop``, and ``vmap`` of a while loop whose trip count differs per client batches every
  carried value -- one copy of the base (and its zero update, uploaded) per client.

Memory is XLA's compiled memory analysis (``jax.jit(process.next, donate_argnums=(0,)).lower(...).compile()
.memory_analysis()``, the state donated as ``run_training`` donates it:
arguments, outputs and temporaries of the one program; nothing runs), so it measures the program's buffers on any
backend, CPU included. ``peak`` is arguments + outputs + temporaries - aliased.

Bound (what the figures should show): ``peak(N) ~= |base| + N x (|adapters| x (3 + optimizer slots) + activations
of one client's step + its data)`` for ``shared``, against ``peak(N) ~= (N + 1) x |base| + ...`` for ``in_params``:
the per-client slope of ``shared`` is the adapters, activations and data, never the base.

Usage: ``python benchmarks/lora_memory.py [--clients 1 10 100] [--width 256 --layers 4] [--rank 8] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

import jax
import numpy as np
import optax

VARIANTS = ("shared", "in_params")


def round_process(model, labels, variant: str, learning_rate: float = 0.1):
  """The library's round of ``variant`` (module docstring), every client in flight at once (``vmap``)."""
  from fedjax_lite import algorithms, core

  # One device, every client in one vmap (not sharded over the host's CPU devices when configure_cpu made several:
  # the per-client buffers would then be per device).
  runner = core.Runner(strategy="vmap", shard_host_devices=False)
  if variant == "shared":
    return algorithms.lora_fine_tuning(model, labels, client_learning_rate=learning_rate, runner=runner)
  return algorithms.fed_avg(model, client_optimizer=core.partition_optimizer(labels, optax.sgd(learning_rate)),
                            runner=runner)


def client_data(num_clients: int, num_steps: int, batch_size: int, sequence_length: int, vocab: int, seed=0):
  """Packed client data ``[clients, steps, batch, T]`` with ragged step counts (so the local loop's trip count is
  per client, as in a real cohort)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, vocab, (num_clients, num_steps, batch_size, sequence_length + 1)).astype(np.int32)
  mask = np.ones((num_clients, num_steps, batch_size), bool)
  for client in range(num_clients):
    mask[client, 1 + client % num_steps:] = False
  return {"x": ids[..., :-1], "y": ids[..., 1:], "mask": mask, "num_examples": mask.sum((1, 2)).astype(np.int32)}


def compiled_round_step(num_clients: int, variant: str, *, width: int, layers: int, heads: int, rank: int,
                        sequence_length: int = 20, num_steps: int = 2, batch_size: int = 4, vocab_size: int = 86):
  """``(compiled process.next, base and adapter parts (shapes))`` for the default-layout transformer with LoRA."""
  from fedjax_lite import core, models

  model = models.transformer_lm(vocab_size=vocab_size, sequence_length=sequence_length, num_layers=layers,
                                num_heads=heads, width=width, lora_rank=rank)
  params = jax.eval_shape(model.init, jax.random.key(0))
  labels = models.lora_labels(params)
  parts = core.split_params(params, labels)
  data = client_data(num_clients, num_steps, batch_size, sequence_length, vocab_size + 4)
  process = round_process(model, labels, variant)
  state = jax.eval_shape(process.init, params)
  # The state donated, as run_training's jitted round does: the new params (base included) reuse its buffers.
  return jax.jit(process.next, donate_argnums=(0,)).lower(state, data, jax.random.key(0)).compile(), parts


def per_client_base_buffers(compiled, base, num_clients: int) -> int:
  """How many buffers of the compiled program have a base matrix's shape with a leading client axis
  (``f32[num_clients, d_in, d_out]``): 0 when the cohort shares one base."""
  text = compiled.as_text()
  shapes = {np.shape(leaf) for leaf in jax.tree.leaves(base) if len(np.shape(leaf)) == 2}
  return sum(len(re.findall(re.escape(f"f32[{num_clients},{a},{b}]"), text)) for a, b in shapes)


def measure(num_clients: int, variant: str, **sizes) -> dict:
  """Compiled memory of one round step (bytes), the sizes of the base and adapters, and the count of per-client
  base buffers (:func:`per_client_base_buffers`)."""
  from fedjax_lite import core

  compiled, parts = compiled_round_step(num_clients, variant, **sizes)
  stats = compiled.memory_analysis()
  peak = (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
          - stats.alias_size_in_bytes)
  return {"variant": variant, "clients": num_clients, "peak_bytes": int(peak),
          "temp_bytes": int(stats.temp_size_in_bytes), "argument_bytes": int(stats.argument_size_in_bytes),
          "base_bytes": core.tree_size_bits(parts["frozen"]) // 8,
          "adapter_bytes": core.tree_size_bits(parts["global"]) // 8,
          "per_client_base_buffers": per_client_base_buffers(compiled, parts["frozen"], num_clients)
          if num_clients > 1 else 0}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--clients", type=int, nargs="+", default=[1, 10, 100])
  parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
  parser.add_argument("--width", type=int, default=256)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument("--json", action="store_true", help="one JSON line per measurement")
  args = parser.parse_args(argv)
  if min(args.clients) < 1 or args.rank < 1 or args.width % args.heads:
    parser.error("--clients and --rank must be >= 1, --width divisible by --heads.")
  rows = []
  for num_clients in args.clients:
    for variant in args.variants:
      row = measure(num_clients, variant, width=args.width, layers=args.layers, heads=args.heads, rank=args.rank)
      rows.append(row)
      if args.json:
        print(json.dumps(row), flush=True)
  if not args.json:
    base, adapters = rows[0]["base_bytes"], rows[0]["adapter_bytes"]
    print(f"base {base / 2**20:.2f} MiB, adapters {adapters / 2**20:.3f} MiB per copy")
    print("| clients | variant | peak MiB | temporaries MiB | peak / base | per-client base buffers |")
    print("|---|---|---|---|---|---|")
    for row in rows:
      print(f"| {row['clients']} | {row['variant']} | {row['peak_bytes'] / 2**20:.1f} | "
            f"{row['temp_bytes'] / 2**20:.1f} | {row['peak_bytes'] / base:.2f} | {row['per_client_base_buffers']} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
