"""Tests for fedjax_lite.core.device_rounds: cohorts drawn and packed on the device, and rounds scanned in one program.

Every example carries a unique id (``uid`` from 1, so a padded zero is never a real id). Without shuffling the
device packing must equal the host's :func:`pack_clients` bit for bit (same layout, padding, counts, step cap);
with shuffling every (client, epoch) group must hold exactly the host's examples, in a permuted order. The scanned
rounds must equal a Python loop over the same sampler, packer and ``process.next``, bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lite.algorithms.fed_avg import fed_avg
from fedjax_lite.core import sampling
from fedjax_lite.core.device_rounds import (
    Cohort,
    DevicePoissonSampler,
    DevicePopulation,
    DeviceShuffledCyclicSampler,
    DeviceUniformSampler,
    build_scanned_rounds,
    device_sampler,
    round_key,
)
from fedjax_lite.core.federated_data import FederatedData
from fedjax_lite.core.packing import ClientSpec, pack_clients

from tests.conftest import make_population

SIZES = [3, 7, 1, 12, 5]


def make_data(sizes=SIZES):
  clients, next_uid = {}, 1
  for k, size in enumerate(sizes):
    uid = np.arange(next_uid, next_uid + size, dtype=np.int32)
    next_uid += size
    clients[f"c{k}"] = {"uid": uid, "x": uid[:, None].astype(np.float32) * np.array([1.0, -2.0], np.float32)}
  return FederatedData.from_clients(clients)


def cohort(indices, capacity):
  indices = np.asarray(indices, np.int32)
  padded = np.zeros(capacity, np.int32)
  padded[:len(indices)] = indices
  return Cohort(jnp.asarray(padded), jnp.arange(capacity) < len(indices), jnp.asarray(len(indices), jnp.int32))


@pytest.mark.parametrize("spec", [ClientSpec(batch_size=4, shuffle=False),
                                  ClientSpec(batch_size=3, num_epochs=3, shuffle=False),
                                  ClientSpec(batch_size=2, num_epochs=2, max_steps=3, shuffle=False)])
def test_unshuffled_packing_equals_the_host_packing_bit_for_bit(spec):
  data = make_data()
  population = DevicePopulation.from_data(data, spec)
  chosen = [3, 2, 0, 3]  # ragged, a repeated client, one padding slot
  packed = jax.device_get(jax.jit(population.pack)(cohort(chosen, 5), jax.random.key(0)))
  host = pack_clients(data, chosen, batch_size=spec.batch_size, num_epochs=spec.num_epochs,
                      max_steps=spec.max_steps, num_steps=population.num_steps, cohort_size=5, shuffle=False)
  assert set(packed) == set(host)
  for key in host:
    assert packed[key].dtype == host[key].dtype and packed[key].shape == host[key].shape, key
    np.testing.assert_array_equal(packed[key], host[key], err_msg=key)


def test_shuffled_packing_permutes_each_epoch_of_each_client():
  data = make_data()
  spec = ClientSpec(batch_size=3, num_epochs=3)
  population = DevicePopulation.from_data(data, spec)
  chosen = [3, 1, 2, 4]
  pack = jax.jit(population.pack)
  packed = jax.device_get(pack(cohort(chosen, 6), jax.random.key(7)))
  host = pack_clients(data, chosen, batch_size=3, num_epochs=3, num_steps=population.num_steps, cohort_size=6,
                      shuffle=False)
  np.testing.assert_array_equal(packed["mask"], host["mask"])
  np.testing.assert_array_equal(packed["num_examples"], host["num_examples"])
  moved = False
  for slot, client in enumerate(chosen):
    size = len(data.client(client)["uid"])
    real = packed["uid"][slot][packed["mask"][slot]]
    for epoch in range(3):
      group = real[epoch * size:(epoch + 1) * size]
      np.testing.assert_array_equal(np.sort(group), data.client(client)["uid"])  # each epoch: all, once
      moved |= not np.array_equal(group, data.client(client)["uid"])
    np.testing.assert_array_equal(packed["x"][slot][packed["mask"][slot]], real[:, None] * np.float32([1, -2]))
  assert moved
  assert not packed["uid"][~packed["mask"]].any() and not packed["x"][~packed["mask"]].any()  # padding is zero
  again = jax.device_get(pack(cohort(chosen, 6), jax.random.key(7)))
  np.testing.assert_array_equal(again["uid"], packed["uid"])  # reproducible from the key


def test_step_cap_takes_a_shuffled_subset_of_the_epoch():
  data = make_data([40])
  population = DevicePopulation.from_data(data, ClientSpec(batch_size=4, max_steps=2))
  seen = set()
  pack = jax.jit(population.pack)
  for seed in range(4):
    packed = jax.device_get(pack(cohort([0], 1), jax.random.key(seed)))
    real = packed["uid"][0][packed["mask"][0]]
    assert len(real) == 8 and len(set(real)) == 8 and int(packed["num_examples"][0]) == 8
    seen.update(real.tolist())
  assert len(seen) > 8  # not always the first 8 examples


def test_round_data_is_reproducible_from_seed_and_round():
  data = make_population(num_clients=12, min_size=2, max_size=20, seed=1)
  population = DevicePopulation.from_data(data, ClientSpec(batch_size=4, num_epochs=2))
  sampler = DeviceUniformSampler(12, 4)
  base = jax.random.key(3)
  round_data = jax.jit(lambda round_num: population.round_data(sampler, base, round_num))
  first, cohort_a = round_data(5)
  second, cohort_b = round_data(jnp.int32(5))
  other, cohort_c = round_data(6)
  np.testing.assert_array_equal(cohort_a.indices, cohort_b.indices)
  np.testing.assert_array_equal(first["x"], second["x"])
  assert not np.array_equal(cohort_a.indices, cohort_c.indices) or not np.array_equal(first["x"], other["x"])


def draw_rounds(sampler, seed, num_rounds):
  """The sampler's cohorts of rounds 0 .. num_rounds - 1, stacked (one compiled program)."""
  return jax.device_get(jax.jit(jax.vmap(lambda round_num: sampler(jax.random.key(seed), round_num)))(
      jnp.arange(num_rounds)))


def test_uniform_sampler_draws_distinct_clients_uniformly():
  sampler = DeviceUniformSampler(20, 5)
  base = jax.random.key(0)
  counts = np.zeros(20)
  for drawn in draw_rounds(sampler, 0, 200).indices:
    assert len(set(drawn.tolist())) == 5 and drawn.min() >= 0 and drawn.max() < 20
    counts[drawn] += 1
  # Each client joins 200 * 5 / 20 = 50 times in expectation (binomial sd ~ 6.1): 6 sd either side.
  assert counts.min() > 50 - 37 and counts.max() < 50 + 37
  with_replacement = DeviceUniformSampler(3, 8, replace=True)
  drawn = np.asarray(with_replacement(base, 0).indices)
  assert drawn.shape == (8,) and len(set(drawn.tolist())) < 8


def test_poisson_sampler_pads_to_capacity_and_counts_what_it_drew():
  sampler = DevicePoissonSampler(200, 0.05)
  assert sampler.cohort_capacity == sampling.poisson_cohort_capacity(200, 0.05)
  sizes = []
  rounds = draw_rounds(sampler, 1, 50)
  for indices, valid, num in zip(rounds.indices, rounds.valid, rounds.num_sampled):
    num = int(num)
    sizes.append(num)
    assert valid.sum() == num and valid[:num].all()
    indices = indices[:num]
    assert np.all(np.diff(indices) > 0)
  assert 5 < np.mean(sizes) < 15  # Binomial(200, 0.05): mean 10, sd ~3.1 (3 sd of the mean of 50: +-1.4)


def test_cyclic_sampler_visits_every_client_once_per_epoch():
  sampler = DeviceShuffledCyclicSampler(10, 3)
  rounds = draw_rounds(sampler, 2, 6).indices
  for epoch in range(2):
    seen = np.concatenate(rounds[epoch * 3:(epoch + 1) * 3])
    assert len(set(seen.tolist())) == 9


def test_device_sampler_maps_the_host_samplers_and_refuses_others():
  assert device_sampler(sampling.UniformSampler(9, 3, seed=4, replace=True)) == DeviceUniformSampler(9, 3, True)
  assert device_sampler(sampling.PoissonSampler(9, 0.2)) == DevicePoissonSampler(9, 0.2)
  assert device_sampler(sampling.ShuffledCyclicSampler(9, 3)) == DeviceShuffledCyclicSampler(9, 3)
  same = DeviceUniformSampler(9, 3)
  assert device_sampler(same) is same

  def host_only(round_num):
    return np.arange(3)

  host_only.cohort_capacity = 3
  with pytest.raises(TypeError, match="host only"):
    device_sampler(host_only)


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


def _assert_trees_equal(actual, desired):
  assert jax.tree.structure(actual) == jax.tree.structure(desired)
  for a, d in zip(jax.tree.leaves(actual), jax.tree.leaves(desired)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(d))


def test_scanned_rounds_equal_a_python_loop_of_rounds_bit_for_bit(tiny_model, tiny_params):
  data = make_population(num_clients=9, min_size=2, max_size=23, seed=3)  # ragged clients
  population = DevicePopulation.from_data(data, ClientSpec(batch_size=4, num_epochs=2, max_steps=9))
  process = fed_avg(tiny_model, client_learning_rate=0.1)
  sampler = DeviceUniformSampler(9, 3)
  run = build_scanned_rounds(process, population, sampler, seed=5)
  scanned_state, outputs = run(_copy(process.init(tiny_params)), 2, 3)  # rounds 2, 3, 4

  base = jax.random.key(5)
  next_fn = jax.jit(process.next)
  round_data = jax.jit(lambda round_num: population.round_data(sampler, base, round_num))
  state, per_round = _copy(process.init(tiny_params)), []
  for round_num in (2, 3, 4):
    data_r, _ = round_data(round_num)
    state, metrics, _ = next_fn(state, data_r, round_key(base, round_num))
    per_round.append(metrics)
    if round_num == 3:
      two_state = _copy(state)
  _assert_trees_equal(scanned_state, state)
  _assert_trees_equal(outputs.metrics, jax.tree.map(lambda *leaves: np.stack(leaves), *per_round))
  np.testing.assert_array_equal(outputs.num_real_clients, [3, 3, 3])

  # Skipped rounds (num_active) leave the state alone: 2 active rounds of 3 = the first two rounds.
  partial_state, partial = run(_copy(process.init(tiny_params)), 2, 3, 2)
  _assert_trees_equal(partial_state, two_state)
  np.testing.assert_array_equal(partial.num_real_clients, [3, 3, 0])
  assert float(partial.metrics["client_work"]["train"]["num_examples"][2]) == 0


def test_build_scanned_rounds_refuses_what_it_cannot_run(tiny_model):
  data = make_population(num_clients=4)
  population = DevicePopulation.from_data(data, ClientSpec(batch_size=4))
  process = fed_avg(tiny_model, client_learning_rate=0.1)
  stateful = process._replace(client_state=lambda params: params)
  with pytest.raises(ValueError, match="per-client state"):
    build_scanned_rounds(stateful, population, DeviceUniformSampler(4, 2), seed=0)
  with pytest.raises(ValueError, match="draws from 5 clients"):
    build_scanned_rounds(process, population, DeviceUniformSampler(5, 2), seed=0)
  with pytest.raises(ValueError, match="num_steps"):
    DevicePopulation.from_data(data, ClientSpec(batch_size=1), num_steps=1)
