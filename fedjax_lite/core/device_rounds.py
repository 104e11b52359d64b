"""Rounds drawn on the device: the population stays on the accelerator and many rounds run in one program.

The host path of a round (:mod:`fedjax_lite.core.sampling` draws the cohort with numpy, :func:`pack_clients`
gathers its examples, the result is copied to the device) costs a dispatch, a transfer and host work per round.
For a population that fits on the device, this module moves all of it into the compiled program:

* :class:`DevicePopulation` holds every client's examples as device arrays in the CSR layout of
  :class:`~fedjax_lite.core.FederatedData` (``offsets``) and turns a cohort into the round's data with the SAME
  layout as :func:`~fedjax_lite.core.pack_clients` -- features ``[clients, steps, batch, ...]``, ``mask``,
  ``num_examples``; padded examples zero and masked, padded client slots with ``num_examples == 0`` -- and the same
  semantics: each client's data repeated for ``num_epochs`` epochs, each epoch shuffled independently, cut into
  batches, capped at ``max_steps`` batches (TFF's ``dataset.shuffle().repeat(E).batch(B)``). The step axis is
  sized once for the population's largest client (bucketed), so shapes never change.
* device samplers (:class:`DeviceUniformSampler`, :class:`DevicePoissonSampler`,
  :class:`DeviceShuffledCyclicSampler`) draw the cohort with ``jax.random``; :func:`device_sampler` maps the host
  samplers to them (the same distribution, NOT the same clients: numpy's generator is not reproducible on the
  device).
* :func:`build_scanned_rounds` compiles ``R`` consecutive rounds of a ``Process`` into one ``lax.scan``: cohort,
  packing, shuffles and ``process.next`` per round, metrics stacked ``[R, ...]``.

Randomness, from ``(seed, round)`` alone, so a run does not depend on how its rounds are grouped into dispatches
(a resumed run continues exactly): with ``base = key(seed)`` and ``round_key = fold_in(base, round)`` (the key
``process.next`` receives, as in the per-round loop), the cohort uses ``fold_in(round_key, DEVICE_SAMPLING_STREAM)``
(the cyclic sampler ``fold_in(fold_in(base, DEVICE_CYCLIC_STREAM), epoch)``), the shuffles
``fold_in(round_key, DEVICE_PACKING_STREAM)``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lite.core import sampling, validation
from fedjax_lite.core.federated_data import FederatedData
from fedjax_lite.core.packing import ClientSpec
from fedjax_lite.core.process import Process
from fedjax_lite.core.tree import PyTree

DEVICE_SAMPLING_STREAM = 0x5A3E
DEVICE_PACKING_STREAM = 0x9AC5
DEVICE_CYCLIC_STREAM = 0xC1C2


def round_key(base_key: jax.Array, round_num) -> jax.Array:
  """``fold_in(base_key, round_num)``: the key ``process.next`` receives in round ``round_num``."""
  return jax.random.fold_in(base_key, round_num)


class Cohort(NamedTuple):
  """A round's cohort: ``indices`` int32 ``[capacity]`` storage indices (padding slots hold 0), ``valid`` bool
  ``[capacity]``, ``num_sampled`` int32 scalar (more than ``capacity`` means a Poisson cohort overflowed its
  padding: :func:`build_scanned_rounds` reports it and ``run_training`` refuses it)."""

  indices: jax.Array
  valid: jax.Array
  num_sampled: jax.Array


@dataclasses.dataclass(frozen=True)
class DeviceUniformSampler(sampling.UniformCohorts):
  """``clients_per_round`` clients drawn uniformly on the device (without replacement unless ``replace``)."""

  replace: bool = False

  def __post_init__(self):
    super().__post_init__()
    if not isinstance(self.replace, bool):
      raise TypeError(f"replace must be a bool, got {type(self.replace).__name__}.")

  def __call__(self, base_key: jax.Array, round_num: jax.Array) -> Cohort:
    key = jax.random.fold_in(round_key(base_key, round_num), DEVICE_SAMPLING_STREAM)
    indices = jax.random.choice(key, self.num_clients, (self.clients_per_round,), replace=self.replace)
    return Cohort(indices.astype(jnp.int32), jnp.ones(self.clients_per_round, bool),
                  jnp.asarray(self.clients_per_round, jnp.int32))


@dataclasses.dataclass(frozen=True)
class DevicePoissonSampler(sampling.PoissonCohorts):
  """Every client joins independently with probability ``sampling_probability`` (Poisson sampling, as DP-FedAvg's
  accounting assumes), padded to ``cohort_capacity`` slots (:func:`~fedjax_lite.core.poisson_cohort_capacity`).

  The host sampler pads a rare larger cohort to the next power of two (one more compilation); a program with fixed
  shapes cannot, so such a round (probability ``POISSON_OVERFLOW_PROBABILITY`` per round) is reported through
  ``Cohort.num_sampled`` and refused by ``run_training`` rather than silently dropping clients.
  """

  def __call__(self, base_key: jax.Array, round_num: jax.Array) -> Cohort:
    key = jax.random.fold_in(round_key(base_key, round_num), DEVICE_SAMPLING_STREAM)
    joined = jax.random.uniform(key, (self.num_clients,)) < self.sampling_probability
    capacity = self.cohort_capacity
    (indices,) = jnp.nonzero(joined, size=capacity, fill_value=0)
    num_sampled = jnp.sum(joined, dtype=jnp.int32)
    return Cohort(indices.astype(jnp.int32), jnp.arange(capacity) < num_sampled, num_sampled)


@dataclasses.dataclass(frozen=True)
class DeviceShuffledCyclicSampler(sampling.CyclicCohorts):
  """Each epoch a fresh device permutation of the clients is cut into cohorts of ``clients_per_round``: every
  client takes part at most once per epoch (as :class:`~fedjax_lite.core.ShuffledCyclicSampler`)."""

  def __call__(self, base_key: jax.Array, round_num: jax.Array) -> Cohort:
    epoch, position = jnp.divmod(jnp.asarray(round_num, jnp.int32), self.rounds_per_epoch)
    key = jax.random.fold_in(jax.random.fold_in(base_key, DEVICE_CYCLIC_STREAM), epoch)
    permutation = jax.random.permutation(key, self.num_clients)
    indices = jax.lax.dynamic_slice(permutation, (position * self.clients_per_round,), (self.clients_per_round,))
    return Cohort(indices.astype(jnp.int32), jnp.ones(self.clients_per_round, bool),
                  jnp.asarray(self.clients_per_round, jnp.int32))


DeviceSampler = Union[DeviceUniformSampler, DevicePoissonSampler, DeviceShuffledCyclicSampler]
DEVICE_SAMPLERS = (DeviceUniformSampler, DevicePoissonSampler, DeviceShuffledCyclicSampler)


def device_sampler(sampler: Any) -> DeviceSampler:
  """The device sampler drawing from the same distribution as the host ``sampler`` (a device sampler is returned
  as is). Host samplers other than ``UniformSampler``, ``PoissonSampler`` and ``ShuffledCyclicSampler`` (any
  callable ``round -> indices``) cannot run on the device: ``TypeError``."""
  if isinstance(sampler, DEVICE_SAMPLERS):
    return sampler
  if isinstance(sampler, sampling.UniformSampler):
    return DeviceUniformSampler(sampler.num_clients, sampler.clients_per_round, sampler.replace)
  if isinstance(sampler, sampling.PoissonSampler):
    return DevicePoissonSampler(sampler.num_clients, sampler.sampling_probability)
  if isinstance(sampler, sampling.ShuffledCyclicSampler):
    return DeviceShuffledCyclicSampler(sampler.num_clients, sampler.clients_per_round)
  raise TypeError(
      f"the sampler {type(sampler).__name__} draws cohorts on the host only; rounds drawn on the device need a "
      "UniformSampler, PoissonSampler or ShuffledCyclicSampler (or their Device* counterparts from "
      "fedjax_lite.core.device_rounds).")


@dataclasses.dataclass(frozen=True, eq=False)
class DevicePopulation:
  """A population's examples on the device, and the packing of a cohort into a round's data there.

  Build it with :meth:`from_data`. :meth:`pack` is a pure jittable function of fixed shapes.

  Attributes:
    examples: feature -> device array of every client's examples, client-major (as ``FederatedData.examples``).
    offsets: int32 ``[num_clients]``: the first row of each client.
    sizes: int32 ``[num_clients]``: each client's number of examples.
    client_spec: batch size, epochs, step cap, shuffling.
    num_steps: the step axis, the bucketed step count of the population's largest client.
    max_client_size: the largest client's number of examples (the width of the shuffles).
  """

  examples: Mapping[str, jax.Array]
  offsets: jax.Array
  sizes: jax.Array
  client_spec: ClientSpec
  num_steps: int
  max_client_size: int

  @classmethod
  def from_data(cls, data: FederatedData, client_spec: ClientSpec, *, num_steps: int | None = None,
                device: jax.Device | None = None) -> "DevicePopulation":
    """Copies ``data`` to the device once (``device``: default JAX's default device).

    ``num_steps`` defaults to ``client_spec.max_num_steps(data)``; it must fit every client. Populations of
    2**31 or more examples are refused (int32 row indices).
    """
    if not isinstance(data, FederatedData):
      raise TypeError(f"data must be a FederatedData, got {type(data).__name__}.")
    if not isinstance(client_spec, ClientSpec):
      raise TypeError(f"client_spec must be a ClientSpec, got {type(client_spec).__name__}.")
    needed = client_spec.max_num_steps(data)
    if num_steps is None:
      num_steps = needed
    validation.check_int("num_steps", num_steps, minimum=needed)
    if data.num_examples >= 2**31:
      raise ValueError(f"the population has {data.num_examples} examples; rounds drawn on the device index rows "
                       "with int32 (< 2**31).")
    put = functools.partial(jax.device_put, device=device)
    sizes = data.client_sizes
    return cls(examples={key: put(value) for key, value in data.examples.items()},
               offsets=put(data.offsets[:-1].astype(np.int32)), sizes=put(sizes.astype(np.int32)),
               client_spec=client_spec, num_steps=int(num_steps), max_client_size=int(sizes.max()))

  @property
  def num_clients(self) -> int:
    return int(self.sizes.shape[0])

  @property
  def nbytes(self) -> int:
    """Device bytes held: the examples plus offsets and sizes."""
    return int(sum(value.nbytes for value in self.examples.values()) + self.offsets.nbytes + self.sizes.nbytes)

  def pack(self, cohort: Cohort, key: jax.Array) -> dict[str, jax.Array]:
    """The round's data for ``cohort``, laid out as :func:`~fedjax_lite.core.pack_clients` lays it out.

    For client slot ``c`` of size ``s`` processing ``n_c = min(E s, max_steps B)`` examples, position ``p`` of its
    ``num_steps * B`` slots holds, when ``p < n_c``, example ``pi_{c,e}(p mod s)`` of the client with
    ``e = floor(p / s)`` and ``pi_{c,e}`` a uniform permutation of ``0..s-1`` drawn for each (slot, epoch) from
    ``key`` (the identity without shuffling); other positions are zero and masked. ``num_examples[c] = n_c``,
    0 for padding slots.
    """
    spec = self.client_spec
    batch, epochs = spec.batch_size, spec.num_epochs
    slots = self.num_steps * batch
    indices, valid = cohort.indices, cohort.valid
    sizes = jnp.where(valid, self.sizes[indices], 0)
    processed = sizes * epochs
    if spec.max_steps is not None:
      processed = jnp.minimum(processed, spec.max_steps * batch)
    position = jnp.arange(slots, dtype=jnp.int32)[None, :]
    size = jnp.maximum(sizes, 1)[:, None]
    keep = position < processed[:, None]
    epoch = jnp.minimum(position // size, epochs - 1)
    within = position % size
    if spec.shuffle:
      # One permutation of 0..s-1 per (slot, epoch): sort uniform keys, with the positions past s sorted last.
      width = self.max_client_size
      noise = jax.random.uniform(key, (indices.shape[0], epochs, width))
      noise = jnp.where(jnp.arange(width) < size[:, :, None], noise, jnp.inf)
      permutations = jnp.argsort(noise, axis=-1).astype(jnp.int32)
      slot = jnp.arange(indices.shape[0])[:, None]
      within = permutations[slot, epoch, jnp.minimum(within, width - 1)]
    rows = jnp.where(keep, self.offsets[indices][:, None] + within, 0)
    cohort_size = indices.shape[0]
    packed = {}
    for name, values in self.examples.items():
      gathered = values[rows]
      gathered = jnp.where(keep.reshape(keep.shape + (1,) * (values.ndim - 1)), gathered,
                           jnp.zeros((), values.dtype))
      packed[name] = gathered.reshape((cohort_size, self.num_steps, batch) + values.shape[1:])
    packed["mask"] = keep.reshape(cohort_size, self.num_steps, batch)
    packed["num_examples"] = processed.astype(jnp.int32)
    return packed

  def round_data(self, sampler: DeviceSampler, base_key: jax.Array, round_num) -> tuple[dict, Cohort]:
    """Round ``round_num``'s cohort and data (see the module docstring for the keys)."""
    cohort = sampler(base_key, round_num)
    key = jax.random.fold_in(round_key(base_key, round_num), DEVICE_PACKING_STREAM)
    return self.pack(cohort, key), cohort


class RoundsOutput(NamedTuple):
  """What a dispatch returns besides the state, each stacked over its rounds ``[R, ...]``: the rounds' metrics,
  their number of real clients, and the number of clients each cohort drew (see :class:`Cohort`)."""

  metrics: PyTree
  num_real_clients: jax.Array
  num_sampled: jax.Array


def build_scanned_rounds(process: Process, population: DevicePopulation, sampler: Any, *, seed: int
                         ) -> Callable[..., tuple[PyTree, RoundsOutput]]:
  """``run(state, first_round, num_rounds, num_active=None) -> (state, RoundsOutput)``: the rounds
  ``first_round, first_round + 1, ...`` in ONE jitted program, a ``lax.scan`` over rounds whose body draws the cohort
  (``sampler``, a device sampler or a host one :func:`device_sampler` maps), packs it
  (:meth:`DevicePopulation.pack`) and runs ``process.next(state, round_data, fold_in(key(seed), round))``.

  ``num_rounds`` is the scan's static length (one compilation per distinct length); ``num_active`` (a traced
  int, default ``num_rounds``) runs only the first ``num_active`` of them and skips the rest (state unchanged,
  metrics zero, ``num_real_clients`` and ``num_sampled`` 0), so dispatches of different lengths share one
  compilation. ``state`` is donated: pass a copy you no longer need. The rounds are the ones a Python loop calling
  :meth:`DevicePopulation.round_data` and ``process.next`` would run, whatever the grouping into dispatches.
  Processes with per-client state are refused (their state lives on the host).

  Example::

    population = DevicePopulation.from_data(train_data, ClientSpec(batch_size=10, num_epochs=5))
    run = build_scanned_rounds(process, population, DeviceUniformSampler(train_data.num_clients, 10), seed=0)
    state, outputs = run(process.init(params), 0, 20)   # rounds 0..19; outputs.metrics leaves are [20, ...]
  """
  if not isinstance(process, Process):
    raise TypeError(f"process must be a fedjax_lite Process, got {type(process).__name__}.")
  if process.client_state is not None:
    raise ValueError("rounds drawn on the device need a process without per-client state (this one keeps "
                     "process.client_state, gathered from a host ClientStateStore each round).")
  if not isinstance(population, DevicePopulation):
    raise TypeError(f"population must be a DevicePopulation, got {type(population).__name__}.")
  sampler = device_sampler(sampler)
  if sampler.num_clients != population.num_clients:
    raise ValueError(f"the sampler draws from {sampler.num_clients} clients but the population has "
                     f"{population.num_clients}.")
  validation.check_int("seed", seed, minimum=0)
  base_key = jax.random.key(seed)

  def one_round(state, round_num):
    round_data, cohort = population.round_data(sampler, base_key, round_num)
    output = process.next(state, round_data, round_key(base_key, round_num))  # a RoundOutput, no client states
    num_real = jnp.sum(round_data["num_examples"] > 0, dtype=jnp.int32)
    return output.state, RoundsOutput(output.metrics, num_real, cohort.num_sampled)

  @functools.partial(jax.jit, static_argnums=(2,), donate_argnums=(0,))
  def run(state, first_round, num_rounds, num_active):
    first_round = jnp.asarray(first_round, jnp.int32)
    rounds = first_round + jnp.arange(num_rounds, dtype=jnp.int32)
    if num_active is None:
      return jax.lax.scan(one_round, state, rounds)
    skipped = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype),
                           jax.eval_shape(one_round, state, first_round)[1])

    def maybe_round(state, round_num):
      return jax.lax.cond(round_num < first_round + num_active, one_round, lambda s, _: (s, skipped),
                          state, round_num)

    return jax.lax.scan(maybe_round, state, rounds)

  def run_checked(state: PyTree, first_round: int, num_rounds: int, num_active: int | None = None):
    validation.check_int("first_round", first_round, minimum=0)
    validation.check_int("num_rounds", num_rounds, minimum=1)
    if num_active is not None:
      validation.check_int("num_active", num_active, minimum=1, maximum=num_rounds)
    return run(state, first_round, num_rounds, num_active)

  return run_checked
