"""The library's default CPU setup for the benchmarks that time library rounds.

``fedjax-lite train`` and the README's research example call :func:`fedjax_lite.configure_cpu` first (one XLA:CPU
device per usable core, single-threaded Eigen; the default runner then shards the clients over the devices), so
the benchmarks measure that configuration by default; ``--jax-defaults`` measures JAX's own defaults instead (one
CPU device, multi-threaded Eigen, the runner's one sequential scan over the clients). Call :func:`apply` before
anything uses JAX.
"""

from __future__ import annotations

import argparse

import fedjax_lite


def add_argument(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--jax-defaults", action="store_true",
                      help="do not call fedjax_lite.configure_cpu() (JAX's defaults: one CPU device, multi-threaded "
                           "Eigen, the runner's one sequential scan over the clients)")
  parser.add_argument("--keep-fusion-emitters", action="store_true",
                      help="configure_cpu(fast_compile=False): keep XLA's new fusion emitters on jaxlib 0.10.x")


def apply(args: argparse.Namespace) -> dict:
  """Configures the CPU unless ``args.jax_defaults``; returns the setup for the benchmark's report."""
  if args.jax_defaults:
    return {"configure_cpu": False}
  fast_compile = not getattr(args, "keep_fusion_emitters", False)
  return {"configure_cpu": True, "fast_compile": fast_compile,
          "cpu_devices": fedjax_lite.configure_cpu(fast_compile=fast_compile)}
