"""One-line CPU setup: one XLA:CPU device per usable core, each running its own stream of clients.

Where this sits: before anything else. JAX reads its device settings when it initializes its backend (the first
array or computation), so :func:`configure_cpu` must run first -- ``fedjax-lite train`` calls it itself; research
code calls it right after the imports::

  import fedjax_lite
  fedjax_lite.configure_cpu()   # before any jnp array is created

Why (measured, ``benchmarks/README.md``, "Every core busy"; ``docs/xla_cpu.md``): within one device, XLA:CPU
runs a round's clients at about ONE core's throughput -- a batch-20 training step gains nothing from a second
intra-op thread. With one host device per core (``jax_num_cpu_devices``) and single-threaded Eigen kernels
(``--xla_cpu_multi_thread_eigen=false``), the default :class:`~fedjax_lite.core.runner.Runner` shards the client
axis over the devices (``Runner.resolved_mesh``), each device running its clients as one sequential stream: the
standard EMNIST-CNN round went from 1.93 s to 1.11 s on a 2-core Intel Xeon (0.58x), with the first round in
3.9 s.

On jaxlib 0.10.x it also turns off XLA:CPU's new fusion emitters (``--xla_cpu_use_fusion_emitters=false``, the
older elemental emitter generates the loop fusions): measured on the standard round (``benchmarks/README.md``,
"pfl-research as a peer"), XLA's compile of the round took 35% less CPU time (1.8-1.9 s against 2.5-3.1 s) and
the rounds ran as fast (2.04-2.18 CPU-s per round either way). Later jaxlibs no longer have the flag (0.12.1 aborts
on it as an unknown flag), so it is set only where it exists. The older emitter does not vectorize transcendental
element-wise code as well: ``jax.random.normal`` of 1.69 M float32 took 2.6x longer (45 against 17 ms on a 2-core
AMD EPYC, ``benchmarks/README.md``, "Example-level DP-SGD"), which matters where every local step draws a noise
vector the size of the model (example-level DP-SGD): ``configure_cpu(fast_compile=False)`` keeps XLA's emitters.

It changes nothing on GPU/TPU (the default backend stays the accelerator; only the CPU backend is configured), and
with one usable core it only sets the CPU flags.
"""

from __future__ import annotations

import os
import re

import jax

from fedjax_lite.core import validation

EIGEN_FLAG = "--xla_cpu_multi_thread_eigen=false"
COMPILE_FLAG = "--xla_cpu_use_fusion_emitters=false"
# The newest jaxlib (major, minor) known to accept COMPILE_FLAG: 0.10.x has it, 0.12.1 rejects it (0.11 unchecked).
COMPILE_FLAG_LAST_JAXLIB = (0, 10)
MAX_CPU_DEVICES = 8


def usable_cores() -> int:
  """The CPU cores this process may run on (its affinity mask), else ``os.cpu_count()``."""
  try:
    return len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    return os.cpu_count() or 1


def backend_initialized() -> bool:
  """True once JAX has created its backend (device settings no longer apply)."""
  try:  # a private module, hence guarded
    from jax._src import xla_bridge

    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):
    return False


def compile_flag_supported(jaxlib_version: str | None = None) -> bool:
  """True where :data:`COMPILE_FLAG` exists: jaxlib up to :data:`COMPILE_FLAG_LAST_JAXLIB` (an unknown XLA flag
  aborts the process, so newer or unparsable versions get False)."""
  if jaxlib_version is None:
    import jaxlib

    jaxlib_version = getattr(jaxlib, "__version__", "")
  numbers = re.match(r"(\d+)\.(\d+)", str(jaxlib_version))
  return bool(numbers) and (int(numbers.group(1)), int(numbers.group(2))) <= COMPILE_FLAG_LAST_JAXLIB


def configure_cpu(num_devices: int | None = None, *, fast_compile: bool = True) -> int:
  """Sets up XLA:CPU with ``num_devices`` host devices (default: the usable cores, at most 8) and single-threaded
  Eigen kernels, so that the default runner keeps every core busy with its own stream of clients; on jaxlib
  0.10.x also, unless ``fast_compile`` is False, the cheaper-to-compile loop-fusion emitter (see the module
  docstring). Flags the user already put in ``XLA_FLAGS`` for the same settings are kept.

  Args:
    num_devices: host CPU devices, ``>= 1``; None for :func:`usable_cores` (capped at 8).
    fast_compile: True (default) turns XLA's new fusion emitters off where the flag exists (jaxlib 0.10.x):
      rounds compile with ~35% less CPU time. False keeps them: Gaussian sampling runs 2.6x faster, worth it when
      noise is drawn at every local step (example-level DP-SGD, ``fedjax-lite train --example-dp-*``).

  Returns:
    The number of CPU devices configured.

  Raises:
    RuntimeError: JAX's backend is already initialized (an array was created or a computation ran): call it
      before anything else uses JAX, or start a new process.
  """
  if num_devices is None:
    num_devices = max(1, min(usable_cores(), MAX_CPU_DEVICES))
  num_devices = validation.check_int("num_devices", num_devices, minimum=1)
  if not isinstance(fast_compile, bool):
    raise TypeError(f"fast_compile must be True or False, got {fast_compile!r}.")
  if backend_initialized():
    raise RuntimeError(
        "fedjax_lite.configure_cpu() must be called before JAX initializes its backend (before any array is "
        "created or any computation runs): call it right after the imports, or in a new process.")
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_cpu_multi_thread_eigen" not in flags:
    flags = f"{flags} {EIGEN_FLAG}".strip()
  if fast_compile and "xla_cpu_use_fusion_emitters" not in flags and compile_flag_supported():
    flags = f"{flags} {COMPILE_FLAG}".strip()
  os.environ["XLA_FLAGS"] = flags
  jax.config.update("jax_num_cpu_devices", int(num_devices))
  return int(num_devices)
