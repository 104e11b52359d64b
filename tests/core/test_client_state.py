"""ClientStateStore: the population's per-client state on the host, gathered for a cohort and scattered back."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lite.core.client_state import ClientStateStore

NUM_CLIENTS = 5


def initial_state():
  return {"c": np.full((2, 3), 0.5, np.float32), "count": np.array(7, np.int32)}


def distinct_states(num_slots, offset=0.0):
  """Slot ``k`` holds ``c = offset + k`` everywhere and ``count = 100 + k``."""
  return {"c": offset + np.arange(num_slots, dtype=np.float32)[:, None, None] * np.ones((1, 2, 3), np.float32),
          "count": 100 + np.arange(num_slots, dtype=np.int32)}


def row(store, client):
  return {key: np.asarray(value[client]) for key, value in store.arrays.items()}


def test_every_client_starts_from_the_initial_state():
  store = ClientStateStore(initial_state(), NUM_CLIENTS)
  assert store.num_clients == NUM_CLIENTS
  assert store.arrays["c"].shape == (NUM_CLIENTS, 2, 3) and store.arrays["c"].dtype == np.float32
  assert store.arrays["count"].shape == (NUM_CLIENTS,) and store.arrays["count"].dtype == np.int32
  for client in range(NUM_CLIENTS):
    chex.assert_trees_all_equal(row(store, client), initial_state())


def test_initial_state_may_be_jax_arrays():
  store = ClientStateStore({"c": jnp.ones((3,), jnp.float32)}, 2)
  assert isinstance(store.arrays["c"], np.ndarray)
  np.testing.assert_array_equal(store.arrays["c"], np.ones((2, 3), np.float32))


def test_gather_returns_the_cohort_rows_in_order():
  store = ClientStateStore(initial_state(), NUM_CLIENTS)
  store.load(distinct_states(NUM_CLIENTS))
  gathered = store.gather(np.array([3, 0, 4]))
  expected = {key: value[[3, 0, 4]] for key, value in distinct_states(NUM_CLIENTS).items()}
  chex.assert_trees_all_equal(gathered, expected)
  gathered["c"][...] = -1.0  # a gather is a copy: writing to it does not touch the store
  chex.assert_trees_all_equal(row(store, 3), {key: value[3] for key, value in distinct_states(NUM_CLIENTS).items()})


def test_gather_pads_to_num_slots_with_client_zero():
  store = ClientStateStore(initial_state(), NUM_CLIENTS)
  store.load(distinct_states(NUM_CLIENTS))
  gathered = store.gather([2, 4], num_slots=4)
  np.testing.assert_array_equal(gathered["count"], [102, 104, 100, 100])
  assert gathered["c"].shape == (4, 2, 3)
  empty = store.gather(np.array([], np.int64), num_slots=2)  # an empty cohort (e.g. a Poisson round)
  np.testing.assert_array_equal(empty["count"], [100, 100])


def test_scatter_writes_only_the_real_clients():
  store = ClientStateStore(initial_state(), NUM_CLIENTS)
  cohort = np.array([1, 3])
  new = distinct_states(4, offset=10.0)  # 2 real slots + 2 padding slots
  store.scatter(cohort, new, num_examples=np.array([5, 2, 0, 0]))
  for slot, client in enumerate(cohort):
    chex.assert_trees_all_equal(row(store, client), {key: value[slot] for key, value in new.items()})
  for client in (0, 2, 4):  # never sampled, and client 0 whose state filled the padding slots
    chex.assert_trees_all_equal(row(store, client), initial_state())


def test_scatter_skips_a_client_with_no_examples():
  store = ClientStateStore(initial_state(), NUM_CLIENTS)
  store.scatter([2, 4], distinct_states(2, offset=10.0), num_examples=[0, 3])
  chex.assert_trees_all_equal(row(store, 2), initial_state())
  np.testing.assert_array_equal(row(store, 4)["count"], 101)


def test_scatter_without_num_examples_writes_every_listed_client():
  store = ClientStateStore(initial_state(), NUM_CLIENTS)
  store.scatter([4, 0], distinct_states(3, offset=10.0))  # 3 slots, 2 listed clients: slot 2 is not written
  np.testing.assert_array_equal(store.arrays["count"], [101, 7, 7, 7, 100])


def test_repeated_clients_are_refused_unless_allowed():
  store = ClientStateStore(initial_state(), NUM_CLIENTS)
  with pytest.raises(ValueError, match=r"repeat clients \[2\]"):
    store.gather([2, 1, 2])
  with pytest.raises(ValueError, match="sample without replacement"):
    store.scatter([2, 1, 2], distinct_states(3, offset=10.0))


def test_scatter_with_replacement_keeps_the_later_slot():
  """Sampling with replacement, allowed: client 2 fills slots 0 and 2; the later slot's state is kept."""
  store = ClientStateStore(initial_state(), NUM_CLIENTS)
  store.scatter([2, 1, 2], distinct_states(3, offset=10.0), num_examples=[4, 4, 4], allow_repeats=True)
  np.testing.assert_array_equal(store.arrays["count"], [7, 101, 102, 7, 7])
  np.testing.assert_array_equal(store.arrays["c"][2], np.full((2, 3), 12.0, np.float32))


def test_scatter_casts_to_the_store_dtype():
  store = ClientStateStore(initial_state(), NUM_CLIENTS)
  new = {"c": np.full((1, 2, 3), 0.25, np.float64), "count": np.array([9], np.int64)}
  store.scatter([0], new)
  assert store.arrays["c"].dtype == np.float32 and store.arrays["count"].dtype == np.int32
  np.testing.assert_array_equal(store.arrays["c"][0], np.full((2, 3), 0.25, np.float32))


def test_gather_scatter_round_trip_through_jax():
  store = ClientStateStore(initial_state(), NUM_CLIENTS)
  gathered = store.gather([4, 2], num_slots=3)
  new = {"c": jnp.asarray(gathered["c"]) * 2.0, "count": jnp.asarray(gathered["count"]) + 1}
  store.scatter([4, 2], new, num_examples=np.array([1, 1, 0], np.int32))
  np.testing.assert_array_equal(store.arrays["count"], [7, 7, 8, 7, 8])
  np.testing.assert_array_equal(store.arrays["c"][4], np.ones((2, 3), np.float32))


def test_memory_mapped_store(tmp_path):
  directory = tmp_path / "state"
  store = ClientStateStore(initial_state(), NUM_CLIENTS, directory=directory)
  files = sorted(path.name for path in directory.iterdir())
  assert files == ["leaf_0000.npy", "leaf_0001.npy"]
  assert isinstance(store.arrays["c"], np.memmap)
  store.scatter([3], distinct_states(1, offset=4.0), num_examples=[2])
  chex.assert_trees_all_equal(store.gather([3, 0]), {"c": np.stack([np.full((2, 3), 4.0, np.float32),
                                                                    np.full((2, 3), 0.5, np.float32)]),
                                                     "count": np.array([100, 7], np.int32)})
  store.arrays["c"].flush()
  on_disk = np.load(directory / "leaf_0000.npy")  # the .npy files are the state: readable as plain arrays
  assert on_disk.shape == (NUM_CLIENTS, 2, 3)
  np.testing.assert_array_equal(on_disk[3], np.full((2, 3), 4.0, np.float32))
  np.testing.assert_array_equal(on_disk[1], np.full((2, 3), 0.5, np.float32))
  assert store.nbytes == NUM_CLIENTS * (6 * 4 + 4)


def test_nbytes_grows_with_the_population():
  state = {"a": np.zeros((10, 3), np.float32), "b": np.zeros((4,), np.float64), "n": np.zeros((), np.int8)}
  for num_clients in (1, 1000):
    assert ClientStateStore(state, num_clients).nbytes == num_clients * (10 * 3 * 4 + 4 * 8 + 1)


def test_load_replaces_every_state_and_checks_the_layout():
  store = ClientStateStore(initial_state(), NUM_CLIENTS)
  store.load(distinct_states(NUM_CLIENTS))
  np.testing.assert_array_equal(store.arrays["count"], 100 + np.arange(NUM_CLIENTS))
  with pytest.raises(ValueError, match="structure"):
    store.load({"c": distinct_states(NUM_CLIENTS)["c"]})
  with pytest.raises(ValueError, match="match the store"):
    store.load(distinct_states(NUM_CLIENTS + 1))
  with pytest.raises(ValueError, match="match the store"):
    store.load({"c": distinct_states(NUM_CLIENTS)["c"].astype(np.float64),
                "count": 100 + np.arange(NUM_CLIENTS, dtype=np.int32)})


@pytest.mark.parametrize("num_clients", [0, -3, 2.5, "4", True])
def test_num_clients_must_be_a_positive_int(num_clients):
  with pytest.raises((ValueError, TypeError), match="num_clients"):
    ClientStateStore(initial_state(), num_clients)


def test_initial_state_must_hold_an_array():
  with pytest.raises(ValueError, match="initial_state"):
    ClientStateStore({}, NUM_CLIENTS)


@pytest.mark.parametrize("client_ids, message", [
    ([0, 5], r"client_ids must lie in \[0, 5\)"),
    ([-1], r"client_ids must lie in \[0, 5\)"),
    ([[0, 1]], "1-D"),
    ([0.0, 1.0], "integer"),
])
def test_gather_and_scatter_reject_bad_client_ids(client_ids, message):
  store = ClientStateStore(initial_state(), NUM_CLIENTS)
  with pytest.raises(ValueError, match=message):
    store.gather(client_ids)
  with pytest.raises(ValueError, match=message):
    store.scatter(client_ids, distinct_states(3))


def test_more_clients_than_slots_is_an_error():
  store = ClientStateStore(initial_state(), NUM_CLIENTS)
  with pytest.raises(ValueError, match="do not fit in 2 client slots"):
    store.gather([0, 1, 2], num_slots=2)
  with pytest.raises(ValueError, match="do not fit in 2 client slots"):
    store.scatter([0, 1, 2], distinct_states(2))


def test_scatter_rejects_a_wrong_structure_or_shape():
  store = ClientStateStore(initial_state(), NUM_CLIENTS)
  with pytest.raises(ValueError, match="structure"):
    store.scatter([0], {"c": distinct_states(1)["c"]})
  with pytest.raises(ValueError, match=r"\[slots\]"):
    store.scatter([0], {"c": np.zeros((1, 3, 2), np.float32), "count": np.zeros((1,), np.int32)})


def test_a_gathered_state_still_referenced_is_never_overwritten():
  """The store reuses a gather buffer only when nothing references it: a kept result (or a JAX array made from it)
  keeps its values through later gathers and scatters."""
  store = ClientStateStore(initial_state(), NUM_CLIENTS)
  store.load(distinct_states(NUM_CLIENTS))
  first = store.gather([1, 2])
  on_device = jax.device_put(store.gather([3, 4]))
  for cohort in ([0, 4], [2, 3], [4, 1]):
    store.gather(cohort)
  store.scatter([1, 2], distinct_states(2, offset=50.0))
  np.testing.assert_array_equal(first["count"], [101, 102])
  np.testing.assert_array_equal(first["c"][:, 0, 0], [1.0, 2.0])
  np.testing.assert_array_equal(np.asarray(on_device["count"]), [103, 104])
  np.testing.assert_array_equal(np.asarray(on_device["c"])[:, 0, 0], [3.0, 4.0])


def test_gather_reuses_its_aligned_buffer_once_released():
  """Every gathered leaf starts on a 64-byte boundary (XLA:CPU's device_put then aliases it instead of copying),
  and a released buffer is reused: a round's gather allocates nothing new in steady state."""
  store = ClientStateStore({"c": np.zeros((3,), np.float32), "n": np.zeros((), np.int8)}, NUM_CLIENTS)
  gathered = store.gather([0, 1, 2], num_slots=4)
  addresses = [leaf.ctypes.data for leaf in jax.tree.leaves(gathered)]
  assert all(address % 64 == 0 for address in addresses)
  del gathered
  assert [leaf.ctypes.data for leaf in jax.tree.leaves(store.gather([3, 4], num_slots=4))] == addresses


def test_scatter_skips_slots_with_no_examples_in_the_middle():
  store = ClientStateStore(initial_state(), NUM_CLIENTS)
  store.scatter([0, 3, 1, 4], distinct_states(5, offset=10.0), num_examples=[2, 0, 1, 0, 0])
  np.testing.assert_array_equal(store.arrays["count"], [100, 102, 7, 7, 7])
  np.testing.assert_array_equal(store.arrays["c"][1], np.full((2, 3), 12.0, np.float32))
