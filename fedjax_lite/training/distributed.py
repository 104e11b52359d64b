"""Many processes, one round: ``jax.distributed`` runs on multi-host GPU/TPU slices and on localhost CPU.

Where this sits: a round is one jitted SPMD program (``Runner(mesh=...)`` shards the client axis over a mesh and adds
the clients' partial sums with ``psum``). With ``jax.distributed`` the mesh spans the devices of every process,
every process runs the same program, and XLA's collectives cross the processes (NCCL on GPU, ICI/DCN on TPU, gloo
over TCP on CPU). This module supplies the three things that change with many processes:

1. :func:`initialize` -- ``jax.distributed.initialize`` from a :class:`DistributedConfig` (CLI flags or the
   ``FEDJAX_LITE_*`` environment variables), with the CPU settings (host devices per process, gloo collectives);
2. :class:`ProcessShard` -- the round's data: the cohort's client slots are split into ``num_processes``
   contiguous blocks of equal length; process ``p`` packs only the clients of block ``p``
   (:func:`fedjax_lite.core.packing.pack_clients` with ``client_slots``, same shuffles as packing the whole cohort)
   and the blocks become one global array (``jax.make_array_from_process_local_data``);
3. :func:`distribute_process` -- the server state is replicated on the mesh and the round's outputs (state and
   metrics) are constrained replicated, so every process can read metrics and parameters; only process 0 writes
   files (:func:`is_writer`).

A client keeps its slot index, so its keys (``fold_in(key, slot)``) and its data are those of the one-process run:
results equal the one-process round up to float32 summation order.

Example (two processes on one machine, two CPU devices each; run the same code with ``process_id=1``)::

  from fedjax_lite.training import distributed
  distributed.initialize(distributed.DistributedConfig("127.0.0.1:12345", num_processes=2, process_id=0,
                                                       local_devices=2))   # before anything else uses JAX
  mesh = distributed.global_client_mesh()
  process = distributed.distribute_process(fed_avg(model, client_learning_rate=0.1,
                                                   runner=Runner(mesh=mesh)), mesh)
  shard = distributed.ProcessShard(mesh)
  result = run_training(process, data, params, client_spec=spec, clients_per_round=10, num_rounds=5,
                        round_packer=shard.packer(spec, data),
                        metrics_path="metrics.jsonl" if distributed.is_writer() else None)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fedjax_lite.core import validation
from fedjax_lite.core.federated_data import FederatedData
from fedjax_lite.core.packing import ClientSpec
from fedjax_lite.core.process import Process
from fedjax_lite.core.round_data import RoundDataChecker
from fedjax_lite.core.runner import client_mesh
from fedjax_lite.core.tree import PyTree

# Environment variables read by DistributedConfig.from_env (the CLI flags take precedence).
__all__ = ["DistributedConfig", "initialize", "shutdown", "is_writer", "global_client_mesh", "ProcessShard",
           "replicate", "distribute_process", "ENV_COORDINATOR_ADDRESS", "ENV_NUM_PROCESSES", "ENV_PROCESS_ID",
           "ENV_LOCAL_DEVICES"]

ENV_COORDINATOR_ADDRESS = "FEDJAX_LITE_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "FEDJAX_LITE_NUM_PROCESSES"
ENV_PROCESS_ID = "FEDJAX_LITE_PROCESS_ID"
ENV_LOCAL_DEVICES = "FEDJAX_LITE_LOCAL_DEVICES"


def _check_address(address: Any) -> str:
  if not isinstance(address, str) or address.count(":") < 1:
    raise ValueError(f"coordinator_address must be 'host:port', got {address!r}.")
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
    raise ValueError(f"coordinator_address must be 'host:port' with a port in 1..65535, got {address!r}.")
  return address


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """Where this process stands in a multi-process run.

  Attributes:
    coordinator_address: ``host:port`` of process 0's coordination service (the same for every process).
    num_processes: processes in the run (>= 1): one per host on a GPU/TPU slice, one per core group on CPU.
    process_id: this process's rank in ``[0, num_processes)``.
    local_devices: CPU only: host devices this process exposes (``jax_num_cpu_devices``); None leaves JAX's
      default (one CPU device, or ``XLA_FLAGS=--xla_force_host_platform_device_count``). GPU/TPU processes use
      their own accelerators and must leave it None.
  """

  coordinator_address: str
  num_processes: int
  process_id: int
  local_devices: int | None = None

  def __post_init__(self):
    _check_address(self.coordinator_address)
    validation.check_int("num_processes", self.num_processes, minimum=1)
    validation.check_int("process_id", self.process_id, minimum=0, maximum=int(self.num_processes) - 1)
    if self.local_devices is not None:
      validation.check_int("local_devices", self.local_devices, minimum=1)

  @classmethod
  def from_env(cls, environ: Mapping[str, str] | None = None) -> "DistributedConfig | None":
    """The config in ``FEDJAX_LITE_COORDINATOR_ADDRESS`` / ``_NUM_PROCESSES`` / ``_PROCESS_ID`` /
    ``_LOCAL_DEVICES``; None when no coordinator address is set (a one-process run)."""
    environ = os.environ if environ is None else environ
    address = environ.get(ENV_COORDINATOR_ADDRESS)
    if not address:
      return None
    values = {}
    for name, variable in (("num_processes", ENV_NUM_PROCESSES), ("process_id", ENV_PROCESS_ID),
                           ("local_devices", ENV_LOCAL_DEVICES)):
      text = environ.get(variable)
      if text is None or text == "":
        if name != "local_devices":
          raise ValueError(f"{ENV_COORDINATOR_ADDRESS} is set, so {variable} must be set too.")
        continue
      try:
        values[name] = int(text)
      except ValueError:
        raise ValueError(f"{variable} must be an integer, got {text!r}.") from None
    return cls(address, **values)


def _backends_initialized() -> bool:
  try:  # private, hence guarded: jax.distributed.initialize raises its own error too
    from jax._src import xla_bridge
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):
    return False


def initialize(config: DistributedConfig) -> None:
  """Joins the multi-process run described by ``config``; call it first, before anything else uses JAX.

  On CPU it also sets the host devices per process (``local_devices``) and the cross-process collectives: gloo
  over TCP (``jax_cpu_collectives_implementation``; already the default in jax 0.10.2, set here when it is
  ``'none'`` and left alone when it names another implementation such as ``'mpi'``). Without cross-process
  collectives a sharded round's ``psum`` cannot leave the process.

  Raises:
    RuntimeError: JAX's backend is already initialized (an array was created or a computation ran), so the
      device settings can no longer apply.
  """
  if not isinstance(config, DistributedConfig):
    raise TypeError(f"config must be a DistributedConfig, got {type(config).__name__}.")
  if _backends_initialized():
    raise RuntimeError("fedjax_lite.training.distributed.initialize must be called before JAX initializes its "
                       "backend (before any array is created or computation runs).")
  if config.local_devices is not None:
    jax.config.update("jax_num_cpu_devices", int(config.local_devices))
  if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(config.coordinator_address, num_processes=int(config.num_processes),
                             process_id=int(config.process_id))


def shutdown() -> None:
  """Leaves the run (``jax.distributed.shutdown``): every process should call it at the end."""
  jax.distributed.shutdown()


def is_writer() -> bool:
  """True on the one process that writes files (process 0); every process computes the same metrics."""
  return jax.process_index() == 0


def global_client_mesh(axis_name: str = "clients") -> Mesh:
  """The 1-D client mesh over every device of every process (:func:`fedjax_lite.core.runner.client_mesh`).

  Every process must expose the same number of devices, and each process's devices must form one contiguous
  block of the mesh (JAX orders devices by process), so that a process's share of the cohort is one contiguous
  range of client slots (:class:`ProcessShard`).
  """
  mesh = client_mesh(axis_name=axis_name)
  owners = [device.process_index for device in mesh.devices.flat]
  per_process = jax.local_device_count()
  expected = [p for p in range(jax.process_count()) for _ in range(per_process)]
  if owners != expected:
    raise ValueError(f"the client mesh's devices are not grouped by process in process order (owners {owners}); "
                     "every process must expose the same number of devices.")
  return mesh


@dataclasses.dataclass(frozen=True)
class ProcessShard:
  """This process's share of every round: a contiguous block of client slots, packed here, placed globally.

  A cohort of ``C`` client slots is padded to ``P * S`` slots, ``S = ceil(C / P)`` rounded up to a multiple of the
  local device count (``P`` processes); process ``p`` holds slots ``[p * S, (p + 1) * S)``. Client ``k`` of the
  cohort keeps slot ``k`` (and its keys and shuffle), the extra slots are padding (``num_examples == 0``).

  Attributes:
    mesh: the global client mesh (:func:`global_client_mesh`); its first axis is the client axis.
  """

  mesh: Mesh

  def __post_init__(self):
    if not isinstance(self.mesh, Mesh):
      raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(self.mesh).__name__}.")

  @property
  def num_processes(self) -> int:
    return jax.process_count()

  @property
  def process_id(self) -> int:
    return jax.process_index()

  def slots_per_process(self, cohort_slots: int) -> int:
    """``S``: ``ceil(cohort_slots / P)`` rounded up to a multiple of this process's devices in the mesh."""
    validation.check_int("cohort_slots", cohort_slots, minimum=1)
    local = sum(1 for d in self.mesh.devices.flat if d.process_index == self.process_id)
    per_process = -(-int(cohort_slots) // self.num_processes)
    return -(-per_process // local) * local

  def slot_range(self, cohort_slots: int) -> tuple[int, int]:
    """``(start, stop)``: the client slots this process packs."""
    size = self.slots_per_process(cohort_slots)
    return self.process_id * size, (self.process_id + 1) * size

  def pack(self, client_spec: ClientSpec, data: FederatedData, cohort, *, seed: int, round_num: int,
           num_steps: int | None, cohort_size: int) -> dict[str, np.ndarray]:
    """This process's slots of the cohort packed with ``client_spec`` (numpy, ``S`` client slots)."""
    size = self.slots_per_process(cohort_size)
    return client_spec.pack(data, cohort, seed=seed, round_num=round_num, num_steps=num_steps,
                            cohort_size=size * self.num_processes, client_slots=self.slot_range(cohort_size))

  def place(self, local_data: PyTree) -> PyTree:
    """Global arrays sharded over the client axis from every process's local block (same shapes everywhere)."""
    sharding = NamedSharding(self.mesh, PartitionSpec(self.mesh.axis_names[0]))
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_data)

  def replicate(self, tree: PyTree) -> PyTree:
    """``tree`` (the same value on every process) as arrays replicated on every device of the mesh."""
    return replicate(tree, self.mesh)

  def packer(self, client_spec: ClientSpec, data: FederatedData) -> Callable[..., tuple[PyTree, int]]:
    """The ``round_packer`` of :func:`fedjax_lite.training.loop.run_training`.

    ``packer(cohort, *, seed, round_num, num_steps, cohort_size) -> (global round data, real clients of the whole
    cohort)``; the count (clients with examples) is computed from the cohort's sizes, the same on every process.
    """
    check_round = RoundDataChecker("round_data")

    def pack_round(cohort, *, seed: int, round_num: int, num_steps: int | None, cohort_size: int):
      local = self.pack(client_spec, data, cohort, seed=seed, round_num=round_num, num_steps=num_steps,
                        cohort_size=cohort_size)
      check_round(local)
      num_real = int(np.count_nonzero(data.client_sizes[np.asarray(cohort, dtype=np.int64)]))
      return self.place(local), num_real

    return pack_round


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """``tree`` replicated on every device of ``mesh``, from each process's own copy (the values must agree)."""
  sharding = NamedSharding(mesh, PartitionSpec())

  def put(x):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    host = np.asarray(jax.device_get(x)) if isinstance(x, jax.Array) else np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(put, tree)


def distribute_process(process: Process, mesh: Mesh) -> Process:
  """``process`` for a multi-process run: the initial state replicated on ``mesh``, the round's outputs replicated.

  ``init`` places the state on every device (so round 2 sees round 1's layout and does not recompile); ``next``
  constrains the new state and the metrics to be replicated (``jax.lax.with_sharding_constraint``), so every
  process can fetch them (a client-sharded output could be read only where its shards live). The runner inside
  ``process`` must use ``mesh`` (``Runner(mesh=mesh)``), or each process would run the whole cohort alone.

  Raises:
    ValueError: the process keeps per-client state (SCAFFOLD): its host-side store is not split across processes.
  """
  if not isinstance(process, Process):
    raise TypeError(f"process must be a fedjax_lite Process, got {type(process).__name__}.")
  if not isinstance(mesh, Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
  if process.client_state is not None:
    raise ValueError("algorithms with per-client state (e.g. SCAFFOLD) do not run across processes yet: their "
                     "client-state store lives on one host.")
  replicated = NamedSharding(mesh, PartitionSpec())

  def init(*args, **kwargs):
    return replicate(process.init(*args, **kwargs), mesh)

  def next_round(state, round_data, rng, client_states=None):
    return jax.lax.with_sharding_constraint(process.next(state, round_data, rng, client_states), replicated)

  return Process(init=init, next=next_round, client_state=None)
