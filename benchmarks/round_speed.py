"""Round-speed benchmark: the library's FedAvg round against hand-written pure-JAX rounds of the same math.

Where this sits: ``benchmarks/`` re-measures, on the machine at hand, the facts that shaped the client runner
(``docs/xla_cpu.md``, "Measured facts that shaped the client runner"). Run it from the repository root::

  python benchmarks/round_speed.py                  # full run, ~15 min on a 2-core CPU
  python benchmarks/round_speed.py --quick          # tiny sizes, a smoke test (< 60 s)
  python benchmarks/round_speed.py --only library_equal,scan_canonical --skip recompilation,memory,single_step

Standard workload: EMNIST-shaped random data (28x28x1 float32, 62 classes, seeded numpy), the original FedAvg CNN
(``fedjax_lite.models.original_fedavg_cnn(num_classes=62)``), 10 clients x 200 examples, batch 20, 1 epoch,
client SGD 0.02, server SGD 1.0. The ragged variant draws client sizes uniformly from [20, 400] and rescales them
so the cohort holds the same 2,000 examples.

Variants (each advances its own model, round after round; all start from the same parameters):

* ``library_equal`` / ``library_ragged``: ``jax.jit(fed_avg(...).next)`` with the default runner (a sequential
  ``lax.scan`` over clients on CPU), data packed by ``fedjax_lite.core.pack_clients``.
  The script calls :func:`fedjax_lite.configure_cpu` first, as the CLI and the README's research example do (one
  host device per usable core, single-threaded Eigen), so the default runner shards the client axis over those
  devices; ``--jax-defaults`` skips it (one CPU device, multi-threaded Eigen, one sequential scan).
* ``library_equal_sharded`` / ``library_ragged_sharded`` (only when the process sees several devices and the default
  runner does not already shard over them, or when named in ``--only``): the same with
  ``Runner(mesh=client_mesh())``, i.e. the client axis split over the host's CPU "devices", each running its share
  of the clients as a sequential scan.
* hand-written rounds written here with jax/optax/flax only (no fedjax_lite runner or algorithm):

  - ``vmap``: one jit, ``vmap`` over clients of a rolled ``lax.scan`` over batches, canonical-conv model;
  - ``python_loop``: a Python loop over clients, each one jitted client update whose batches are unrolled in
    Python, plain ``nn.Conv`` + ``nn.max_pool`` (the classic JAX way); ``python_loop_canonical`` the same with the
    zoo (canonical-conv) model;
  - ``unrolled``: one jit, clients and batches both unrolled in Python, plain flax conv; ``unrolled_canonical``
    with the zoo model;
  - ``scan_canonical``: one jit, ``lax.scan`` over clients around a ``lax.scan`` over batches, zoo model;
  - ``scan_sharded`` (when the process has several devices that divide the clients): ``scan_canonical`` with the
    client axis split over the devices by ``shard_map``, the delta sums joined by one ``psum``;
  - ``scan_plain`` (not run unless named in ``--only``): ``scan_canonical`` with plain flax convolutions, the
    rolled-loop slowdown of jax-ml/jax#12868.

Timing: every variant first runs one round alone (compile + run: ``first_round_s``, with the XLA compile time
from ``jax.monitoring``), then ``--rounds`` rounds are timed with the variants interleaved round-robin (the start
rotates each repetition) so that machine noise hits all of them alike; ``steady_s`` is the median.

Sections beside the variants (skip any with ``--skip``):

* ``single_step``: one SGD step jitted alone (plain and canonical conv), and per step inside a rolled 10-step scan;
* ``recompilation``: ``fedjax_lite.training.loop.run_training`` over random cohorts from a ragged population,
  counting XLA compilations with a ``jax.monitoring`` listener on ``/jax/core/compile/backend_compile_duration``;
* ``memory``: one library round of many one-step clients, in a subprocess so that its peak RSS is its own;
* ``fp32_peak``: the share of the machine's FP32 peak each variant reaches: FLOPs per round (XLA's cost analysis
  of one jitted SGD step, times the round's local steps) / steady seconds per round / the peak measured with a
  large float32 matmul on every device at once (the same devices and threads the rounds use).

Output: ONE JSON line on stdout (progress goes to stderr); ``--output PATH`` also appends it to a file.
``--compare-xla-flags FLAGS`` additionally runs the library variants in fresh subprocesses with and without
``XLA_FLAGS=FLAGS`` (alternating) and reports both.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax

import fedjax_lite
from fedjax_lite.algorithms import fed_avg
from fedjax_lite.core import ClientSpec, FederatedData, Runner, client_mesh, pack_clients
from fedjax_lite.core.tree import PyTree
from fedjax_lite.training.loop import run_training
from fedjax_lite.models import OriginalFedAvgCNN, original_fedavg_cnn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: the repository root, for ``benchmarks.cpu_setup``
  sys.path.insert(0, ROOT)
from benchmarks import cpu_setup  # noqa: E402
from benchmarks.report import cpu_model  # noqa: E402

# jax.monitoring duration events of this jax version (jax/_src/dispatch.py). backend_compile fires once per XLA
# compilation (cache hits of jit's in-memory cache do not compile and do not fire).
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
COMPILE_EVENTS = (BACKEND_COMPILE_EVENT, TRACE_EVENT, LOWERING_EVENT)

LIBRARY_VARIANTS = ("library_equal", "library_ragged")
# The library with the client axis sharded over the host's CPU devices (Runner(mesh=client_mesh())); listed only
# when the process has several devices, i.e. was started with XLA_FLAGS=--xla_force_host_platform_device_count=N.
SHARDED_VARIANTS = ("library_equal_sharded", "library_ragged_sharded")
HANDWRITTEN_VARIANTS = (
    "vmap", "python_loop", "python_loop_canonical", "unrolled", "unrolled_canonical", "scan_canonical",
    "scan_sharded", "scan_plain",
)
# Hand-written variants that split the clients over several devices: listed when the process has several.
MULTI_DEVICE_VARIANTS = ("scan_sharded",)
ALL_VARIANTS = LIBRARY_VARIANTS + SHARDED_VARIANTS + HANDWRITTEN_VARIANTS
OPT_IN_VARIANTS = ("scan_plain",)  # ~10x slower per step; run only when named in --only
SECTIONS = ("single_step", "recompilation", "memory", "fp32_peak")

LIBRARY_EQUAL_TARGET = 1.10
LIBRARY_RAGGED_TARGET = 1.25
MEMORY_TARGET_BYTES = 3 * 10**9


def log(message: str) -> None:
  print(f"[round_speed {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# Workload ------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Workload:
  """Sizes of every part of the benchmark (the standard workload, or the tiny ``--quick`` one)."""

  num_clients: int = 10
  examples_per_client: int = 200
  batch_size: int = 20
  num_classes: int = 62
  image_shape: tuple[int, int, int] = (28, 28, 1)
  client_learning_rate: float = 0.02
  server_learning_rate: float = 1.0
  seed: int = 0
  single_step_calls: int = 20
  recompilation_population: int = 100
  recompilation_cohort: int = 10
  recompilation_rounds: int = 30
  memory_clients: int = 1000
  memory_rounds: int = 2
  memory_examples_per_client: int = 20
  memory_num_classes: int = 10

  @property
  def ragged_low(self) -> int:
    """Smallest ragged client size: a tenth of the equal size (20 for 200)."""
    return max(1, self.examples_per_client // 10)

  @property
  def ragged_high(self) -> int:
    """Largest ragged client size: twice the equal size (400 for 200)."""
    return 2 * self.examples_per_client


STANDARD = Workload()
QUICK = Workload(
    num_clients=2, examples_per_client=40, single_step_calls=3, recompilation_population=10,
    recompilation_cohort=2, recompilation_rounds=3, memory_clients=20, memory_rounds=1,
)


def ragged_sizes(num_clients: int, total: int, low: int, high: int, seed: int) -> np.ndarray:
  """Client sizes drawn uniformly from ``[low, high]``, rescaled and adjusted to sum exactly to ``total``.

  The draw is scaled by ``total / sum`` and rounded, clipped back into ``[low, high]``, then the remaining
  difference is spread one example at a time over the clients that still have room (largest-first for removals,
  smallest-first for additions), so the sizes stay inside the range.
  """
  if not num_clients * low <= total <= num_clients * high:
    raise ValueError(f"total {total} cannot be split into {num_clients} sizes in [{low}, {high}].")
  rng = np.random.default_rng(seed)
  raw = rng.integers(low, high + 1, num_clients).astype(np.float64)
  sizes = np.clip(np.round(raw * total / raw.sum()), low, high).astype(np.int64)
  while sizes.sum() != total:
    if sizes.sum() < total:
      room = np.flatnonzero(sizes < high)
      sizes[room[np.argmin(sizes[room])]] += 1
    else:
      room = np.flatnonzero(sizes > low)
      sizes[room[np.argmax(sizes[room])]] -= 1
  return sizes


def make_federated_data(sizes: Sequence[int], num_classes: int, image_shape: tuple[int, ...], seed: int
                        ) -> FederatedData:
  """Random EMNIST-shaped clients: ``x`` float32 in [0, 1) of ``image_shape``, ``y`` int32 labels."""
  sizes = np.asarray(sizes, np.int64)
  rng = np.random.default_rng(seed)
  total = int(sizes.sum())
  examples = {
      "x": rng.random((total,) + tuple(image_shape), dtype=np.float32),
      "y": rng.integers(0, num_classes, total).astype(np.int32),
  }
  client_ids = tuple(f"client_{k:05d}" for k in range(len(sizes)))
  return FederatedData(client_ids, examples, np.concatenate([[0], np.cumsum(sizes)]))


# Compile accounting -------------------------------------------------------------------------------------------------


class CompileLog:
  """Records ``jax.monitoring`` compile-duration events as ``(event, fun_name, seconds)``."""

  def __init__(self):
    self.events: list[tuple[str, str, float]] = []

  def __call__(self, event: str, duration: float, **kwargs) -> None:
    if event in COMPILE_EVENTS:
      self.events.append((event, str(kwargs.get("fun_name", "?")), float(duration)))

  def mark(self) -> int:
    return len(self.events)

  def compiles(self, start: int = 0, stop: int | None = None) -> list[tuple[str, float]]:
    """``(fun_name, seconds)`` of the XLA compilations recorded between two marks."""
    return [(name, seconds) for event, name, seconds in self.events[start:stop] if event == BACKEND_COMPILE_EVENT]

  def seconds(self, event: str, start: int = 0, stop: int | None = None) -> float:
    """Total seconds of ``event`` between two marks."""
    return float(sum(seconds for kind, _, seconds in self.events[start:stop] if kind == event))


COMPILE_LOG = CompileLog()
jax.monitoring.register_event_duration_secs_listener(COMPILE_LOG)


def compile_summary(start: int, stop: int | None = None) -> dict:
  """Compile figures between two marks of :data:`COMPILE_LOG`."""
  compiles = COMPILE_LOG.compiles(start, stop)
  return {
      "compilations": len(compiles),
      "compile_s": round(sum(seconds for _, seconds in compiles), 3),
      "largest_compile_s": round(max((seconds for _, seconds in compiles), default=0.0), 3),
      "trace_s": round(COMPILE_LOG.seconds(TRACE_EVENT, start, stop), 3),
      "lowering_s": round(COMPILE_LOG.seconds(LOWERING_EVENT, start, stop), 3),
  }


# Models and the hand-written math ----------------------------------------------------------------------------------


class PlainCNN(nn.Module):
  """The original FedAvg CNN written the classic way: ``nn.Conv`` (plain autodiff) and ``nn.max_pool``.

  Same layers, parameter names and shapes as ``fedjax_lite.models.OriginalFedAvgCNN``, so both load the same
  parameters and compute the same logits.
  """

  num_classes: int = 62

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    hidden = images
    for features in (32, 64):
      hidden = nn.Conv(features, (5, 5), padding="SAME")(hidden)
      hidden = nn.max_pool(nn.relu(hidden), (2, 2), strides=(2, 2), padding="VALID")
    hidden = hidden.reshape(hidden.shape[0], -1)
    hidden = nn.relu(nn.Dense(512)(hidden))
    return nn.Dense(self.num_classes)(hidden)


def build_modules(num_classes: int) -> dict[str, nn.Module]:
  return {"plain": PlainCNN(num_classes=num_classes), "canonical": OriginalFedAvgCNN(num_classes=num_classes)}


def make_sgd_step(module: nn.Module, learning_rate: float) -> Callable:
  """``step(params, images, labels) -> params``: one SGD step on the batch's mean softmax cross-entropy."""
  optimizer = optax.sgd(learning_rate)

  def loss_fn(params, images, labels):
    logits = module.apply({"params": params}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def step(params, images, labels):
    grads = jax.grad(loss_fn)(params, images, labels)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    return optax.apply_updates(params, updates)

  return step


def local_epoch_scan(step: Callable, params: PyTree, images: jax.Array, labels: jax.Array) -> PyTree:
  """One client's epoch as a rolled ``lax.scan`` over its batches ``[steps, batch, ...]``."""
  final_params, _ = jax.lax.scan(lambda p, batch: (step(p, *batch), None), params, (images, labels))
  return final_params


def local_epoch_unrolled(step: Callable, params: PyTree, images: jax.Array, labels: jax.Array) -> PyTree:
  """One client's epoch with its batches unrolled in Python (one copy of the step per batch)."""
  for index in range(images.shape[0]):
    params = step(params, images[index], labels[index])
  return params


def add_weighted_delta(total: PyTree, params: PyTree, final_params: PyTree, weight: jax.Array) -> PyTree:
  """``total + weight * (params - final_params)``: a client's contribution to the weighted delta sum."""
  return jax.tree.map(lambda t, p, f: t + weight * (p - f), total, params, final_params)


def server_update(server_optimizer, params, opt_state, delta_sum, weight_sum):
  """FedAvg's server step: the weighted mean delta, fed to the server optimizer as a gradient."""
  mean_delta = jax.tree.map(lambda d: d / weight_sum, delta_sum)
  updates, opt_state = server_optimizer.update(mean_delta, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


# Variants ------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Variant:
  """One way to run the round. ``run_round()`` runs one round, advancing the variant's own model, and blocks."""

  name: str
  description: str
  local_steps: int
  run_round: Callable[[], None]
  current_params: Callable[[], PyTree]


class LibraryRound:
  """``jax.jit(fed_avg(...).next)`` on fixed packed round data."""

  def __init__(self, process, initial_params: PyTree, round_data: dict, seed: int):
    self._next = jax.jit(process.next)
    self._state = process.init(initial_params)
    self._round_data = jax.device_put(round_data)
    self._keys = jax.random.split(jax.random.key(seed), 1024)
    self._round = 0

  def __call__(self) -> None:
    key = self._keys[self._round % self._keys.shape[0]]
    self._state, metrics, _ = self._next(self._state, self._round_data, key)
    jax.block_until_ready((self._state, metrics))
    self._round += 1

  def params(self) -> PyTree:
    return self._state.params


class HandwrittenRound:
  """A jitted ``round_fn(params, opt_state, images, labels, weights) -> (params, opt_state)`` of pure JAX."""

  def __init__(self, round_fn: Callable, server_optimizer, initial_params, images, labels, weights,
               state_sharding=None):
    self._round = jax.jit(round_fn)
    # A round whose output is replicated over several devices gets its state placed so from the start (else
    # round 2 recompiles for the new input sharding).
    self._params = jax.device_put(initial_params, state_sharding)
    self._opt_state = jax.device_put(server_optimizer.init(initial_params), state_sharding)
    self._inputs = jax.device_put((images, labels, weights))

  def __call__(self) -> None:
    self._params, self._opt_state = self._round(self._params, self._opt_state, *self._inputs)
    jax.block_until_ready(self._params)

  def params(self) -> PyTree:
    return self._params


class PythonLoopRound:
  """A Python loop over clients, each one call of a jitted client update (batches unrolled inside the jit).

  The weighted delta sum stays on the device: the client update returns ``total + n_k * delta_k``.
  """

  def __init__(self, step: Callable, server_optimizer, initial_params, images, labels, weights):

    def client_update(params, total, client_images, client_labels, weight):
      final_params = local_epoch_unrolled(step, params, client_images, client_labels)
      return add_weighted_delta(total, params, final_params, weight)

    self._client_update = jax.jit(client_update)
    self._server_update = jax.jit(functools.partial(server_update, server_optimizer))
    self._params = initial_params
    self._opt_state = server_optimizer.init(initial_params)
    self._zeros = jax.tree.map(jnp.zeros_like, initial_params)
    self._clients = [jax.device_put((images[k], labels[k], weights[k])) for k in range(images.shape[0])]
    self._weight_sum = jax.device_put(np.float32(weights.sum()))

  def __call__(self) -> None:
    total = self._zeros
    for client_images, client_labels, weight in self._clients:
      total = self._client_update(self._params, total, client_images, client_labels, weight)
    self._params, self._opt_state = self._server_update(self._params, self._opt_state, total, self._weight_sum)
    jax.block_until_ready(self._params)

  def params(self) -> PyTree:
    return self._params


def vmap_round_fn(step, server_optimizer):
  def round_fn(params, opt_state, images, labels, weights):
    finals = jax.vmap(functools.partial(local_epoch_scan, step), in_axes=(None, 0, 0))(params, images, labels)
    delta_sum = jax.tree.map(lambda p, f: jnp.tensordot(weights, p[None] - f, axes=1), params, finals)
    return server_update(server_optimizer, params, opt_state, delta_sum, weights.sum())
  return round_fn


def scanned_delta_sum(step, params, images, labels, weights):
  """The clients' weighted delta sum, one client after another in a ``lax.scan``, each client's epoch rolled."""
  def one_client(total, client):
    client_images, client_labels, weight = client
    final_params = local_epoch_scan(step, params, client_images, client_labels)
    return add_weighted_delta(total, params, final_params, weight), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  delta_sum, _ = jax.lax.scan(one_client, zeros, (images, labels, weights))
  return delta_sum


def scan_round_fn(step, server_optimizer):
  def round_fn(params, opt_state, images, labels, weights):
    delta_sum = scanned_delta_sum(step, params, images, labels, weights)
    return server_update(server_optimizer, params, opt_state, delta_sum, weights.sum())
  return round_fn


def scan_sharded_round_fn(step, server_optimizer):
  """``scan_round_fn`` with the client axis split over every local device (``shard_map``): each device scans its
  share of the clients, and the weighted delta sums meet in one ``psum``."""
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ("clients",))
  spec = jax.sharding.PartitionSpec

  def round_fn(params, opt_state, images, labels, weights):
    def device_part(params, images, labels, weights):
      return jax.lax.psum(scanned_delta_sum(step, params, images, labels, weights), "clients")

    delta_sum = jax.shard_map(device_part, mesh=mesh, in_specs=(spec(), spec("clients"), spec("clients"),
                                                                spec("clients")), out_specs=spec(),
                             check_vma=False)(  # models.Conv's custom_vjp does not carry the varying-axis types
        params, images, labels, weights)
    return server_update(server_optimizer, params, opt_state, delta_sum, weights.sum())
  return round_fn


def unrolled_round_fn(step, server_optimizer):
  def round_fn(params, opt_state, images, labels, weights):
    delta_sum = jax.tree.map(jnp.zeros_like, params)
    for client in range(images.shape[0]):
      final_params = local_epoch_unrolled(step, params, images[client], labels[client])
      delta_sum = add_weighted_delta(delta_sum, params, final_params, weights[client])
    return server_update(server_optimizer, params, opt_state, delta_sum, weights.sum())
  return round_fn


def dense_equal_round(round_data: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The packed equal round without padding steps: ``images [C, S, B, ...]``, ``labels [C, S, B]``, weights."""
  mask = round_data["mask"]
  real_steps = int(mask.any(axis=-1).sum(axis=-1).max())
  if not mask[:, :real_steps].all():
    raise ValueError("the equal round must consist of full batches only.")
  return (round_data["x"][:, :real_steps], round_data["y"][:, :real_steps],
          round_data["num_examples"].astype(np.float32))


def build_variants(names: Sequence[str], workload: Workload, initial_params: PyTree, equal: dict, ragged: dict
                   ) -> list[Variant]:
  """The selected variants, each with its own copy of the starting parameters."""
  model = original_fedavg_cnn(num_classes=workload.num_classes, input_shape=workload.image_shape)
  modules = build_modules(workload.num_classes)
  steps = {kind: make_sgd_step(module, workload.client_learning_rate) for kind, module in modules.items()}
  server_optimizer = optax.sgd(workload.server_learning_rate)
  images, labels, weights = dense_equal_round(equal)
  equal_steps = int(images.shape[0] * images.shape[1])
  ragged_steps = int(ragged["mask"].any(axis=-1).sum())

  def library(round_data, runner=None):
    process = fed_avg(model, client_optimizer=optax.sgd, client_learning_rate=workload.client_learning_rate,
                      server_optimizer=optax.sgd(workload.server_learning_rate), runner=runner)
    return LibraryRound(process, initial_params, round_data, workload.seed)

  def sharded():
    return Runner(mesh=client_mesh())

  def handwritten(round_fn_builder, kind, state_sharding=None):
    return HandwrittenRound(round_fn_builder(steps[kind], server_optimizer), server_optimizer, initial_params,
                            images, labels, weights, state_sharding)

  def all_devices_replicated():
    return jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(jax.local_devices()), ("clients",)),
                                      jax.sharding.PartitionSpec())

  builders = {
      "library_equal": (lambda: library(equal), equal_steps,
                        "fedjax_lite fed_avg, jit(process.next), default runner, pack_clients, equal sizes"),
      "library_ragged": (lambda: library(ragged), ragged_steps,
                         "fedjax_lite fed_avg, jit(process.next), default runner, pack_clients, ragged sizes"),
      "library_equal_sharded": (lambda: library(equal, sharded()), equal_steps,
                                "library_equal with the client axis sharded over the host CPU devices"),
      "library_ragged_sharded": (lambda: library(ragged, sharded()), ragged_steps,
                                 "library_ragged with the client axis sharded over the host CPU devices"),
      "vmap": (lambda: handwritten(vmap_round_fn, "canonical"), equal_steps,
               "jit(vmap over clients of a rolled lax.scan over batches), canonical conv"),
      "python_loop": (lambda: PythonLoopRound(steps["plain"], server_optimizer, initial_params, images, labels,
                                              weights), equal_steps,
                      "Python loop over clients, jitted client update with unrolled batches, plain flax conv"),
      "python_loop_canonical": (lambda: PythonLoopRound(steps["canonical"], server_optimizer, initial_params,
                                                        images, labels, weights), equal_steps,
                                "python_loop with the canonical (zoo) conv"),
      "unrolled": (lambda: handwritten(unrolled_round_fn, "plain"), equal_steps,
                   "one jit, clients and batches unrolled in Python, plain flax conv"),
      "unrolled_canonical": (lambda: handwritten(unrolled_round_fn, "canonical"), equal_steps,
                             "unrolled with the canonical (zoo) conv"),
      "scan_canonical": (lambda: handwritten(scan_round_fn, "canonical"), equal_steps,
                         "one jit, lax.scan over clients and over batches, canonical (zoo) conv"),
      "scan_sharded": (lambda: handwritten(scan_sharded_round_fn, "canonical", all_devices_replicated()), equal_steps,
                       "scan_canonical with the client axis split over the host's CPU devices (shard_map, psum)"),
      "scan_plain": (lambda: handwritten(scan_round_fn, "plain"), equal_steps,
                     "scan_canonical with plain flax conv (rolled-loop slowdown, jax#12868)"),
  }
  variants = []
  for name in names:
    build, local_steps, description = builders[name]
    runner = build()
    variants.append(Variant(name, description, local_steps, runner, runner.params))
  return variants


def max_abs_difference(tree_a: PyTree, tree_b: PyTree) -> float:
  return float(max(jnp.max(jnp.abs(a - b)) for a, b in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b))))


def system_busy_seconds() -> float:
  """CPU-seconds every process on the machine has spent busy since boot (``/proc/stat``), or NaN elsewhere."""
  try:
    with open("/proc/stat") as stat:
      fields = [int(value) for value in stat.readline().split()[1:]]
  except (OSError, ValueError):
    return float("nan")
  idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
  guest = sum(fields[8:10])  # already counted in user/nice
  return (sum(fields) - idle - guest) / os.sysconf("SC_CLK_TCK")


QUIET_OTHERS_FRACTION = 0.10  # a round is "quiet" when other processes used < 10% of the machine's CPU meanwhile


def time_variants(variants: list[Variant], rounds: int) -> dict[str, dict]:
  """First round of each variant alone (compile + run), then ``rounds`` rounds interleaved round-robin."""
  results: dict[str, dict] = {}
  first_params = {}
  for variant in variants:
    gc.collect()
    mark = COMPILE_LOG.mark()
    start = time.perf_counter()
    variant.run_round()
    first_round = time.perf_counter() - start
    first_params[variant.name] = variant.current_params()
    results[variant.name] = {
        "description": variant.description,
        "local_steps": variant.local_steps,
        "first_round_s": round(first_round, 3),
        **compile_summary(mark),
    }
    log(f"{variant.name}: first round {first_round:.2f} s (compile {results[variant.name]['compile_s']:.2f} s)")

  # Same starting parameters and the same (unshuffled) data: after one round every equal-size variant must agree
  # with the library's equal round up to float32 rounding (plain nn.max_pool routes gradients of tied maxima
  # differently, which on this data moves nothing measurable).
  if "library_equal" in first_params:
    for variant in variants:
      if "ragged" not in variant.name:
        results[variant.name]["max_abs_param_diff_vs_library_after_round_1"] = max_abs_difference(
            first_params[variant.name], first_params["library_equal"])

  times: dict[str, list[float]] = {variant.name: [] for variant in variants}
  cpu_times: dict[str, list[float]] = {variant.name: [] for variant in variants}
  others: dict[str, list[float]] = {variant.name: [] for variant in variants}
  timed_compiles: dict[str, int] = {variant.name: 0 for variant in variants}
  num_cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  for repetition in range(rounds):
    shift = repetition % len(variants)
    for variant in variants[shift:] + variants[:shift]:
      mark = COMPILE_LOG.mark()
      start, cpu_start, busy_start = time.perf_counter(), time.process_time(), system_busy_seconds()
      variant.run_round()
      wall = time.perf_counter() - start
      own_cpu = time.process_time() - cpu_start
      times[variant.name].append(wall)
      cpu_times[variant.name].append(own_cpu)
      # The share of the machine's CPU that OTHER processes used during this round (0 on a quiet machine).
      others[variant.name].append(max(0.0, (system_busy_seconds() - busy_start - own_cpu) / (wall * num_cpus)))
      timed_compiles[variant.name] += len(COMPILE_LOG.compiles(mark))
    log(f"repetition {repetition + 1}/{rounds}: " + ", ".join(
        f"{n} {t[-1]:.2f} ({100 * others[n][-1]:.0f}%)" for n, t in times.items()))
  for variant in variants:
    samples = times[variant.name]
    steady = statistics.median(samples)
    quiet = [t for t, o in zip(samples, others[variant.name]) if o < QUIET_OTHERS_FRACTION]
    results[variant.name].update({
        "steady_s": round(steady, 4),
        "round_s": [round(t, 4) for t in samples],
        "min_s": round(min(samples), 4),
        "max_s": round(max(samples), 4),
        "ms_per_local_step": round(1000 * steady / variant.local_steps, 2),
        # CPU seconds of this process (all threads) per round.
        "steady_cpu_s": round(statistics.median(cpu_times[variant.name]), 4),
        # Other processes' share of the CPUs during each timed round, and the median over the quiet rounds.
        "others_cpu_fraction": [round(o, 3) for o in others[variant.name]],
        "quiet_rounds": len(quiet),
        "quiet_steady_s": round(statistics.median(quiet), 4) if quiet else None,
        "compilations_during_timed_rounds": timed_compiles[variant.name],
    })
    if timed_compiles[variant.name]:
      log(f"warning: {variant.name} compiled {timed_compiles[variant.name]} time(s) during the timed rounds")
  return results


def ratios(results: dict[str, dict]) -> dict:
  """Library rounds over the fastest hand-written equal round, with the targets."""
  handwritten = {name: r["steady_s"] for name, r in results.items() if name in HANDWRITTEN_VARIANTS}
  out: dict[str, Any] = {"library_equal_target": LIBRARY_EQUAL_TARGET, "library_ragged_target": LIBRARY_RAGGED_TARGET}
  if not handwritten:
    return out
  fastest = min(handwritten, key=handwritten.get)
  out["fastest_handwritten"] = fastest
  out["fastest_handwritten_s"] = handwritten[fastest]
  targets = {"library_equal": LIBRARY_EQUAL_TARGET, "library_ragged": LIBRARY_RAGGED_TARGET,
             "library_equal_sharded": LIBRARY_EQUAL_TARGET, "library_ragged_sharded": LIBRARY_RAGGED_TARGET}
  for name, target in targets.items():
    if name in results:
      ratio = results[name]["steady_s"] / handwritten[fastest]
      out[f"{name}_vs_fastest_handwritten"] = round(ratio, 3)
      out[f"{name}_meets_target"] = bool(ratio <= target)
  # The same ratios from each variant's fastest round: less sensitive to other processes stealing the CPU.
  fastest_min = min((name for name in handwritten), key=lambda name: results[name]["min_s"])
  out["fastest_handwritten_by_min"] = fastest_min
  for name in LIBRARY_VARIANTS + SHARDED_VARIANTS:
    if name in results:
      out[f"{name}_vs_fastest_handwritten_by_min"] = round(results[name]["min_s"] / results[fastest_min]["min_s"], 3)
  # Paired: library round / hand-written round of the SAME repetition (run seconds apart), median over
  # repetitions; slow drifts of the machine's load cancel out.
  for name in LIBRARY_VARIANTS + SHARDED_VARIANTS:
    if name in results:
      for other in (fastest, "scan_canonical"):
        if other in results:
          paired = [a / b for a, b in zip(results[name]["round_s"], results[other]["round_s"])]
          out[f"{name}_vs_{other}_paired_median"] = round(statistics.median(paired), 3)
  quiet = {name: results[name]["quiet_steady_s"] for name in handwritten if results[name]["quiet_steady_s"]}
  if quiet:
    fastest_quiet = min(quiet, key=quiet.get)
    out["fastest_handwritten_quiet"] = fastest_quiet
    for name in LIBRARY_VARIANTS + SHARDED_VARIANTS:
      if name in results and results[name]["quiet_steady_s"]:
        out[f"{name}_vs_fastest_handwritten_quiet"] = round(results[name]["quiet_steady_s"] / quiet[fastest_quiet], 3)
  if "library_equal" in results and "scan_canonical" in results:
    out["library_equal_vs_scan_canonical"] = round(
        results["library_equal"]["steady_s"] / results["scan_canonical"]["steady_s"], 3)
  if "library_equal" in results and "library_ragged" in results:
    out["library_ragged_vs_library_equal"] = round(
        results["library_ragged"]["steady_s"] / results["library_equal"]["steady_s"], 3)
  return out


# Sections ------------------------------------------------------------------------------------------------------------


def single_step_section(workload: Workload, initial_params: PyTree, equal: dict) -> dict:
  """Per-step cost of one SGD step in three programs, for the plain and the canonical conv.

  ``alone``: one jitted step called from Python; ``in_rolled_scan``: one client's epoch (its 10 batches) as a
  rolled ``lax.scan`` in one jit; ``in_unrolled_epoch``: the same epoch unrolled in Python inside one jit. The
  calls of the three programs alternate, so machine noise hits them alike.
  """
  images, labels, _ = dense_equal_round(equal)
  client_images, client_labels = jax.device_put((images[0], labels[0]))
  num_steps = int(client_images.shape[0])
  epoch_calls = max(3, workload.single_step_calls // 4)
  out = {"batch_size": workload.batch_size, "epoch_steps": num_steps, "calls": workload.single_step_calls,
         "epoch_calls": epoch_calls}
  for kind, module in build_modules(workload.num_classes).items():
    step = make_sgd_step(module, workload.client_learning_rate)
    epoch_args = (initial_params, client_images, client_labels)
    programs = {
        "alone": (jax.jit(step), (initial_params, client_images[0], client_labels[0]), 1),
        "in_rolled_scan": (jax.jit(functools.partial(local_epoch_scan, step)), epoch_args, num_steps),
        "in_unrolled_epoch": (jax.jit(functools.partial(local_epoch_unrolled, step)), epoch_args, num_steps),
    }
    samples: dict[str, list[float]] = {setting: [] for setting in programs}
    for setting, (program, args, _) in programs.items():
      mark = COMPILE_LOG.mark()
      jax.block_until_ready(program(*args))
      out[f"{kind}_{setting}_compile_s"] = compile_summary(mark)["compile_s"]
    for call in range(workload.single_step_calls):
      for setting, (program, args, steps) in programs.items():
        if setting != "alone" and call >= epoch_calls:
          continue
        if kind == "plain" and setting == "in_rolled_scan" and call >= 2:
          continue  # ~10x slower per step (jax#12868): two calls show it
        start = time.perf_counter()
        jax.block_until_ready(program(*args))
        samples[setting].append(1000 * (time.perf_counter() - start) / steps)
    for setting, values in samples.items():
      out[f"{kind}_step_{setting}_ms"] = round(statistics.median(values), 2)
    log(f"single step {kind}: " + ", ".join(f"{setting} {out[f'{kind}_step_{setting}_ms']} ms"
                                            for setting in programs))
  return out


def compiled_flops(function: Callable, *args) -> float:
  """XLA's cost-analysis FLOP count of ``jax.jit(function)(*args)`` (a loop-free program: XLA counts a loop's
  body once, so rolled programs are measured one step at a time)."""
  analysis = jax.jit(function).lower(*args).compile().cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax returns one dict per computation
    analysis = analysis[0]
  return float(analysis["flops"])


def matmul_peak(size: int, calls: int) -> dict:
  """FP32 FLOP/s of ``size x size`` matmuls on every device at once (one matmul per device, each with the threads
  its device has), and on one device alone; the best of ``calls`` timed calls after a warm-up. The peak is the
  larger of the two."""
  def best_rate(devices) -> float:
    count = len(devices)
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), ("d",)), jax.sharding.PartitionSpec("d"))
    rng = np.random.default_rng(0)
    a, b = (jax.device_put(rng.standard_normal((count, size, size), dtype=np.float32), sharding) for _ in range(2))
    program = jax.jit(jax.vmap(lambda x, y: jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST)))
    jax.block_until_ready(program(a, b))
    best = float("inf")
    for _ in range(calls):
      start = time.perf_counter()
      jax.block_until_ready(program(a, b))
      best = min(best, time.perf_counter() - start)
    return count * 2.0 * size**3 / best

  devices = jax.local_devices()
  every_device, one_device = best_rate(devices), best_rate(devices[:1])
  # The machine's peak is the larger: XLA:CPU may spread one device's large matmul over several cores.
  return {"matmul_size": size, "devices": len(devices), "every_device_flops": every_device,
          "one_device_flops": one_device, "peak_flops": max(every_device, one_device)}


def fp32_peak_section(workload: Workload, initial_params: PyTree, equal: dict, variants: dict[str, dict],
                      quick: bool) -> dict:
  """FLOPs per round / steady time / measured matmul peak, for every timed variant.

  FLOPs per local step come from XLA's cost analysis of one jitted SGD step of each model (forward, backward and
  update of one batch); a round is its variant's ``local_steps`` of them (the aggregation and the server step add
  a few FLOPs per parameter, under 0.1% here, and are left out).
  """
  images, labels, _ = dense_equal_round(equal)
  batch = jax.device_put((images[0, 0], labels[0, 0]))
  flops_per_step = {kind: compiled_flops(make_sgd_step(module, workload.client_learning_rate), initial_params, *batch)
                    for kind, module in build_modules(workload.num_classes).items()}
  peak = matmul_peak(512 if quick else 2048, 3 if quick else 10)
  out = {"flops_per_local_step": flops_per_step, **peak, "variants": {}}
  for name, result in variants.items():
    kind = "plain" if name in ("python_loop", "unrolled", "scan_plain") else "canonical"
    round_flops = flops_per_step[kind] * result["local_steps"]
    achieved = round_flops / result["steady_s"]
    out["variants"][name] = {"round_gflops": round(round_flops / 1e9, 2), "achieved_gflops_per_s": round(achieved / 1e9, 2),
                             "share_of_peak": round(achieved / peak["peak_flops"], 3)}
  log(f"fp32 peak: {peak['peak_flops'] / 1e9:.1f} GFLOP/s on {peak['devices']} device(s) "
      f"({peak['one_device_flops'] / 1e9:.1f} on one); " + ", ".join(
          f"{n} {v['share_of_peak']:.0%}" for n, v in out["variants"].items()))
  return out


def recompilation_section(workload: Workload, initial_params: PyTree) -> dict:
  """``run_training`` over random cohorts of a ragged population; counts XLA compilations per round."""
  sizes = np.random.default_rng(workload.seed + 2).integers(
      workload.ragged_low, workload.ragged_high + 1, workload.recompilation_population)
  population = make_federated_data(sizes, workload.num_classes, workload.image_shape, workload.seed + 3)
  model = original_fedavg_cnn(num_classes=workload.num_classes, input_shape=workload.image_shape)
  process = fed_avg(model, client_optimizer=optax.sgd, client_learning_rate=workload.client_learning_rate,
                    server_optimizer=optax.sgd(workload.server_learning_rate))
  round_end_marks = []

  def on_round_end(round_num, metrics):
    round_end_marks.append(COMPILE_LOG.mark())

  start_mark = COMPILE_LOG.mark()
  result = run_training(
      process, population, initial_params, client_spec=ClientSpec(batch_size=workload.batch_size),
      clients_per_round=workload.recompilation_cohort, num_rounds=workload.recompilation_rounds,
      seed=workload.seed, progress=False, on_round_end=on_round_end,
  )
  all_compiles = COMPILE_LOG.compiles(start_mark)
  first_round_compiles = COMPILE_LOG.compiles(start_mark, round_end_marks[0])
  later_compiles = COMPILE_LOG.compiles(round_end_marks[0])
  per_round = [len(COMPILE_LOG.compiles(a, b)) for a, b in zip([start_mark] + round_end_marks[:-1], round_end_marks)]
  round_names = {"next_fn", "jit(next_fn)"}  # fed_avg's next, jitted by run_training
  round_times = [entry["round_time_in_seconds"] for entry in result.history]
  out = {
      "population": workload.recompilation_population,
      "population_sizes_min_max": [int(sizes.min()), int(sizes.max())],
      "cohort": workload.recompilation_cohort,
      "rounds": workload.recompilation_rounds,
      "round_compilations": sum(1 for name, _ in all_compiles if name in round_names),
      "round_compile_s": round(sum(s for name, s in all_compiles if name in round_names), 3),
      "compilations_in_round_1": len(first_round_compiles),
      "compilations_after_round_1": len(later_compiles),
      "compilations_per_round": per_round,
      "compiled_functions": sorted({name for name, _ in all_compiles}),
      "first_round_s": round(result.first_round_seconds, 3),
      "steady_round_s": round(statistics.median(round_times[1:]), 4) if len(round_times) > 1 else None,
      "total_s": round(result.seconds, 2),
  }
  log(f"recompilation: {out['round_compilations']} compilation(s) of the round, "
      f"{out['compilations_after_round_1']} compilation(s) after round 1, steady {out['steady_round_s']} s")
  return out


def proc_status_bytes(field: str) -> int:
  """A ``kB`` field of ``/proc/self/status`` (``VmRSS``: resident now; ``VmHWM``: peak resident), in bytes.

  ``VmHWM`` belongs to this process's own address space. ``getrusage(...).ru_maxrss`` does not: Linux carries the
  peak RSS of the pre-exec address space across ``execve``, and with ``vfork``/``posix_spawn`` (Python's
  ``subprocess``) that is the PARENT's, so a child started from a 2 GB benchmark process reports >= 2 GB.
  """
  with open("/proc/self/status") as status:
    for line in status:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise RuntimeError(f"{field} not found in /proc/self/status")


def current_rss_bytes() -> int:
  return proc_status_bytes("VmRSS")


def memory_child(num_clients: int, workload: Workload) -> None:
  """Runs in the subprocess: library rounds of ``num_clients`` one-step clients; prints one JSON line.

  The first round includes the compilation; the second (skipped with ``--quick``) is a steady round.
  """
  rss_at_start = current_rss_bytes()
  model = original_fedavg_cnn(num_classes=workload.memory_num_classes, input_shape=workload.image_shape)
  params = model.init(jax.random.key(workload.seed))
  num_params = int(sum(leaf.size for leaf in jax.tree.leaves(params)))
  data = make_federated_data([workload.memory_examples_per_client] * num_clients, workload.memory_num_classes,
                             workload.image_shape, workload.seed + 4)
  round_data = jax.device_put(pack_clients(data, np.arange(num_clients), batch_size=workload.batch_size,
                                           shuffle=False))
  del data
  process = fed_avg(model, client_optimizer=optax.sgd, client_learning_rate=workload.client_learning_rate,
                    server_optimizer=optax.sgd(workload.server_learning_rate))
  state = process.init(params)
  key = jax.random.key(workload.seed)
  jax.block_until_ready((state, key))
  gc.collect()
  rss_before_round = current_rss_bytes()
  round_seconds = []
  mark = COMPILE_LOG.mark()
  start = time.perf_counter()
  round_program = jax.jit(process.next).lower(state, round_data, key).compile()
  temp_bytes = int(round_program.memory_analysis().temp_size_in_bytes)  # XLA's own scratch-buffer account
  for _ in range(workload.memory_rounds):
    state, metrics, _ = round_program(state, round_data, key)
    jax.block_until_ready((state, metrics))
    round_seconds.append(time.perf_counter() - start)
    start = time.perf_counter()
  print(json.dumps({
      "clients": num_clients,
      "examples_per_client": workload.memory_examples_per_client,
      "local_steps_per_client": int(round_data["mask"].shape[1]),
      "num_params": num_params,
      "packed_round_bytes": int(sum(np.asarray(v).nbytes for v in round_data.values())),
      "rss_at_start_bytes": rss_at_start,
      "rss_before_round_bytes": rss_before_round,
      "vm_hwm_bytes": proc_status_bytes("VmHWM"),
      "temp_buffer_bytes": temp_bytes,
      "first_round_s": round(round_seconds[0], 3),
      "second_round_s": round(round_seconds[1], 3) if len(round_seconds) > 1 else None,
      "compile_s": compile_summary(mark)["compile_s"],
      "num_examples": int(metrics["client_work"]["train"]["num_examples"]),
  }), flush=True)


def poll_peak_rss(pid: int, stop: threading.Event, result: dict) -> None:
  """Polls a process's RSS every 20 ms (psutil); the largest value seen goes to ``result['peak']``."""
  try:
    import psutil
  except ImportError:
    return
  try:
    process = psutil.Process(pid)
    while not stop.is_set():
      result["peak"] = max(result.get("peak", 0), process.memory_info().rss)
      stop.wait(0.02)
  except psutil.Error:
    pass


class MemoryProbe:
  """Runs :func:`memory_child` in a subprocess and reports its peak RSS (its ``VmHWM``, and psutil polling).

  ``start()`` launches the child and a polling thread; ``result()`` waits for it. The full benchmark starts it
  after the timed sections, so the child has the machine to itself; ``--quick`` runs it concurrently with them to
  stay under a minute (quick timings are not meaningful anyway).
  """

  def __init__(self, workload: Workload, quick: bool):
    self._command = [sys.executable, os.path.abspath(__file__), "--memory-child", str(workload.memory_clients)]
    if quick:
      self._command.append("--quick")
    self._child = None

  def start(self) -> "MemoryProbe":
    self._child = subprocess.Popen(self._command, stdout=subprocess.PIPE, text=True)
    self._stop, self._polled = threading.Event(), {}
    self._poller = threading.Thread(target=poll_peak_rss, args=(self._child.pid, self._stop, self._polled),
                                    daemon=True)
    self._poller.start()
    return self

  def result(self) -> dict:
    stdout, _ = self._child.communicate()
    self._stop.set()
    self._poller.join()
    if self._child.returncode != 0:
      raise RuntimeError(f"memory subprocess failed with exit code {self._child.returncode}")
    out = json.loads(stdout.strip().splitlines()[-1])
    polled = self._polled.get("peak")
    peak = max(out["vm_hwm_bytes"], polled or 0)
    out["psutil_polled_peak_rss_bytes"] = polled
    out["peak_rss_bytes"] = peak
    out["peak_rss_gb"] = round(peak / 1e9, 3)
    out["target_gb"] = MEMORY_TARGET_BYTES / 1e9
    out["meets_target"] = bool(peak < MEMORY_TARGET_BYTES)
    out["all_updates_at_once_bytes"] = out["clients"] * out["num_params"] * 4
    out["all_updates_at_once_gb"] = round(out["all_updates_at_once_bytes"] / 1e9, 2)
    steady = out["second_round_s"] or out["first_round_s"]
    out["ms_per_client"] = round(1000 * steady / out["clients"], 2)
    log(f"memory: {out['clients']} clients, peak RSS {out['peak_rss_gb']} GB, rounds {out['first_round_s']} s / "
        f"{out['second_round_s']} s")
    return out


COMPARED_KEYS = ("first_round_s", "compile_s", "steady_s", "min_s")


def compare_xla_flags(flags: str, rounds: int, quick: bool, repeats: int, jax_defaults: bool) -> dict:
  """The library variants in fresh subprocesses, alternating without and with ``XLA_FLAGS=flags``."""
  runs: dict[str, list[dict]] = {"baseline": [], "flagged": []}
  for _ in range(repeats):
    for label in ("baseline", "flagged"):
      env = dict(os.environ)
      env.pop("XLA_FLAGS", None)
      if label == "flagged":
        env["XLA_FLAGS"] = flags
      command = [sys.executable, os.path.abspath(__file__), "--rounds", str(rounds),
                 "--only", "library_equal,library_ragged,scan_canonical", "--skip", ",".join(SECTIONS)]
      command += ["--quick"] * quick + ["--jax-defaults"] * jax_defaults
      log(f"xla flags comparison: {label} child ({flags if label == 'flagged' else 'no XLA_FLAGS'})")
      child = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env, check=True)
      variants = json.loads(child.stdout.strip().splitlines()[-1])["variants"]
      runs[label].append({name: {key: r[key] for key in COMPARED_KEYS} for name, r in variants.items()})
  summary = {}
  for label, label_runs in runs.items():
    summary[label] = {
        name: {key: round(statistics.median(run[name][key] for run in label_runs), 3) for key in COMPARED_KEYS}
        for name in label_runs[0]
    }
  return {"xla_flags": flags, "median_over_runs": summary, "runs": runs}


# Main ----------------------------------------------------------------------------------------------------------------



def parse_names(text: str | None, allowed: Sequence[str], flag: str) -> list[str]:
  names = [name.strip() for name in (text or "").split(",") if name.strip()]
  unknown = sorted(set(names) - set(allowed))
  if unknown:
    raise SystemExit(f"{flag}: unknown name(s) {unknown}; choose from {list(allowed)}.")
  return names


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rounds", type=int, default=None,
                      help="timed rounds per variant after warm-up (default 5; 2 with --quick)")
  parser.add_argument("--skip", default="", help=f"comma list of variants/sections to skip: {ALL_VARIANTS + SECTIONS}")
  parser.add_argument("--only", default="", help="comma list of variants to run (default all but scan_plain)")
  parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test (< 60 s)")
  parser.add_argument("--output", default=None, help="also append the JSON line to this file")
  parser.add_argument("--compare-xla-flags", default=None, metavar="FLAGS",
                      help="also run the library variants in subprocesses with and without XLA_FLAGS=FLAGS")
  parser.add_argument("--compare-repeats", type=int, default=2, help="alternations for --compare-xla-flags")
  cpu_setup.add_argument(parser)
  parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.rounds is None:
    args.rounds = 2 if args.quick else 5
  if args.rounds < 1:
    parser.error("--rounds must be >= 1.")
  return args


def main(argv: Sequence[str] | None = None) -> dict:
  args = parse_args(argv)
  workload = QUICK if args.quick else STANDARD
  cpu_setup.apply(args)  # before any array: the library's default CPU setup (the CLI's too)
  if args.memory_child is not None:
    memory_child(args.memory_child, workload)
    return {}

  skip = parse_names(args.skip, ALL_VARIANTS + SECTIONS, "--skip")
  only = parse_names(args.only, ALL_VARIANTS, "--only")
  default = [name for name in ALL_VARIANTS if name not in OPT_IN_VARIANTS]
  default_mesh = Runner().resolved_mesh()
  if jax.device_count() == 1 or default_mesh is not None:  # nothing to shard over, or the default already shards
    default = [name for name in default if name not in SHARDED_VARIANTS]
  if jax.device_count() == 1 or workload.num_clients % jax.device_count():
    default = [name for name in default if name not in MULTI_DEVICE_VARIANTS]
  selected = [name for name in (only or default) if name not in skip]
  started = time.perf_counter()

  equal_sizes = np.full(workload.num_clients, workload.examples_per_client)
  total = int(equal_sizes.sum())
  sizes_ragged = ragged_sizes(workload.num_clients, total, workload.ragged_low, workload.ragged_high,
                              workload.seed + 1)
  # Same data for both cases (the examples of the equal and of the ragged clients are the same rows).
  equal_data = make_federated_data(equal_sizes, workload.num_classes, workload.image_shape, workload.seed)
  ragged_data = FederatedData(equal_data.client_ids, equal_data.examples, np.concatenate([[0], np.cumsum(sizes_ragged)]))
  pack = functools.partial(pack_clients, batch_size=workload.batch_size, shuffle=False)
  equal_round = pack(equal_data, np.arange(workload.num_clients))
  ragged_round = pack(ragged_data, np.arange(workload.num_clients))

  model = original_fedavg_cnn(num_classes=workload.num_classes, input_shape=workload.image_shape)
  initial_params = model.init(jax.random.key(workload.seed))
  plain_shapes = jax.eval_shape(lambda: PlainCNN(workload.num_classes).init(
      jax.random.key(0), jnp.zeros((1,) + workload.image_shape))["params"])
  if jax.tree.structure(plain_shapes) != jax.tree.structure(initial_params):
    raise RuntimeError("PlainCNN and OriginalFedAvgCNN must have the same parameter tree.")
  num_params = int(sum(leaf.size for leaf in jax.tree.leaves(initial_params)))

  report: dict[str, Any] = {
      "benchmark": "round_speed",
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "quick": bool(args.quick),
      "rounds": args.rounds,
      "jax": jax.__version__,
      "jaxlib": jaxlib.__version__,
      "flax": flax.__version__,
      "optax": optax.__version__,
      "fedjax_lite": fedjax_lite.__version__,
      "python": platform.python_version(),
      "cpu_model": cpu_model(),
      "cpu_count": os.cpu_count(),
      "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
      "backend": jax.default_backend(),
      "device_count": jax.device_count(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "configure_cpu": not args.jax_defaults,
      "default_runner_mesh_devices": 0 if default_mesh is None else int(default_mesh.devices.size),
      "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
      "workload": {
          "clients": workload.num_clients,
          "examples_per_client": workload.examples_per_client,
          "batch_size": workload.batch_size,
          "num_classes": workload.num_classes,
          "client_learning_rate": workload.client_learning_rate,
          "server_learning_rate": workload.server_learning_rate,
          "num_params": num_params,
          "ragged_sizes": sizes_ragged.tolist(),
          "equal_packed_steps": int(equal_round["mask"].shape[1]),
          "ragged_packed_steps": int(ragged_round["mask"].shape[1]),
      },
  }

  memory_probe = MemoryProbe(workload, args.quick) if "memory" not in skip else None
  if memory_probe is not None and args.quick:
    memory_probe.start()
  if selected:
    log(f"variants: {selected}")
    variants = build_variants(selected, workload, initial_params, equal_round, ragged_round)
    results = time_variants(variants, args.rounds)
    report["variants"] = results
    report["ratios"] = ratios(results)
    if "fp32_peak" not in skip:
      report["fp32_peak"] = fp32_peak_section(workload, initial_params, equal_round, results, args.quick)
    del variants
    gc.collect()
  if "single_step" not in skip:
    report["single_step"] = single_step_section(workload, initial_params, equal_round)
  if "recompilation" not in skip:
    report["recompilation"] = recompilation_section(workload, initial_params)
  if memory_probe is not None:
    if not args.quick:
      memory_probe.start()
    report["memory"] = memory_probe.result()
  if args.compare_xla_flags:
    report["xla_flags_comparison"] = compare_xla_flags(args.compare_xla_flags, args.rounds, args.quick,
                                                       args.compare_repeats, args.jax_defaults)
  report["total_compilations"] = len(COMPILE_LOG.compiles())
  report["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
  report["benchmark_s"] = round(time.perf_counter() - started, 1)

  line = json.dumps(report)
  print(line, flush=True)
  if args.output:
    with open(args.output, "a") as sink:
      sink.write(line + "\n")
  return report


if __name__ == "__main__":
  main()
