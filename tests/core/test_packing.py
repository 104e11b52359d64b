"""Tests for fedjax_lite.core.packing: a round's clients as dense ``[clients, steps, batch, ...]`` arrays + mask.

Every example carries a unique id (``uid``, starting at 1 so that a padded zero is never a real id), which lets
the tests check what was packed: per-client counts ``min(E * n, max_steps * B)``, every epoch a permutation of
the client's examples, only the last batch partial, zeros and an all-False mask in padding, reproducible
shuffles, power-of-two step bucketing and argument validation.
"""

import collections

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedjax_lite.core.federated_data import FederatedData
from fedjax_lite.core.packing import ClientSpec, bucket_num_steps, max_num_steps, pack_centralized, pack_clients


def make_data(sizes):
  """Clients 'c0', 'c1', ... with ``sizes`` examples; ``uid`` numbers all examples 1.. in storage order."""
  clients = {}
  next_uid = 1
  for k, size in enumerate(sizes):
    uid = np.arange(next_uid, next_uid + size, dtype=np.int64)
    next_uid += size
    clients[f"c{k}"] = {
        "uid": uid,
        "x": uid[:, None].astype(np.float32) * np.array([1.0, 2.0, 3.0], np.float32),
        "label": (uid % 7).astype(np.int32) + 1,
    }
  return FederatedData.from_clients(clients)


def client_uids(data, index):
  return data.client(index)["uid"]


def real_sequence(packed, slot, key="uid"):
  """The slot's real entries in processing order (row-major over steps then batch)."""
  return packed[key][slot][packed["mask"][slot]]


def expected_num_examples(size, batch_size, num_epochs, max_steps):
  processed = size * num_epochs
  return processed if max_steps is None else min(processed, max_steps * batch_size)


# Shapes and counts ---------------------------------------------------------------------------------------------------


def test_shapes_and_dtypes():
  data = make_data([3, 7, 1, 12])
  packed = pack_clients(data, [1, 3], batch_size=4, seed=0, round_num=0)
  # steps needed: ceil(7/4) = 2, ceil(12/4) = 3 -> bucket 4.
  assert set(packed) == {"uid", "x", "label", "mask", "num_examples"}
  assert packed["uid"].shape == (2, 4, 4) and packed["uid"].dtype == np.int64
  assert packed["x"].shape == (2, 4, 4, 3) and packed["x"].dtype == np.float32
  assert packed["label"].shape == (2, 4, 4) and packed["label"].dtype == np.int32
  assert packed["mask"].shape == (2, 4, 4) and packed["mask"].dtype == np.bool_
  assert packed["num_examples"].shape == (2,) and packed["num_examples"].dtype == np.int32
  np.testing.assert_array_equal(packed["num_examples"], [7, 12])


@pytest.mark.parametrize(
    "sizes, batch_size, num_epochs, max_steps",
    [
        ([5, 1, 9], 2, 1, None),
        ([5, 1, 9], 4, 3, None),
        ([5, 1, 9], 3, 2, 2),  # caps: min(10, 6) = 6, min(2, 6) = 2, min(18, 6) = 6
        ([10, 10], 10, 1, 1),
        ([4, 6], 1, 5, 7),
    ],
)
def test_mask_count_equals_num_examples(sizes, batch_size, num_epochs, max_steps):
  data = make_data(sizes)
  indices = list(range(len(sizes)))
  packed = pack_clients(data, indices, batch_size=batch_size, num_epochs=num_epochs, max_steps=max_steps)
  expected = [expected_num_examples(n, batch_size, num_epochs, max_steps) for n in sizes]
  np.testing.assert_array_equal(packed["num_examples"], expected)
  np.testing.assert_array_equal(packed["mask"].sum(axis=(1, 2)), expected)


def test_num_examples_with_cap_exact_values():
  data = make_data([5, 1, 9])
  packed = pack_clients(data, [0, 1, 2], batch_size=3, num_epochs=2, max_steps=2)
  np.testing.assert_array_equal(packed["num_examples"], [6, 2, 6])
  assert packed["mask"].shape[1] == 2  # bucket(2)


# Content: epochs, partial batches, padding ---------------------------------------------------------------------------


@pytest.mark.parametrize("shuffle", [True, False])
def test_each_epoch_contains_each_example_exactly_once(shuffle):
  data = make_data([5, 3, 8])
  num_epochs = 3
  packed = pack_clients(data, [0, 1, 2], batch_size=4, num_epochs=num_epochs, shuffle=shuffle, seed=3, round_num=2)
  for slot in range(3):
    sequence = real_sequence(packed, slot)
    size = data.client_sizes[slot]
    assert sequence.shape == (num_epochs * size,)
    for epoch in range(num_epochs):
      np.testing.assert_array_equal(np.sort(sequence[epoch * size:(epoch + 1) * size]), client_uids(data, slot))


def test_epochs_are_shuffled_independently():
  data = make_data([40])
  packed = pack_clients(data, [0], batch_size=8, num_epochs=3, seed=0, round_num=0)
  epochs = real_sequence(packed, 0).reshape(3, 40)
  assert not np.array_equal(epochs[0], epochs[1])
  assert not np.array_equal(epochs[1], epochs[2])
  assert not np.array_equal(epochs[0], client_uids(data, 0))  # shuffled at all


def test_features_stay_aligned_with_their_example():
  data = make_data([6, 9])
  packed = pack_clients(data, [1, 0], batch_size=4, num_epochs=2, seed=5, round_num=1)
  mask = packed["mask"]
  uid = packed["uid"][mask].astype(np.float32)
  np.testing.assert_array_equal(packed["x"][mask], uid[:, None] * np.array([1.0, 2.0, 3.0], np.float32))
  np.testing.assert_array_equal(packed["label"][mask], (packed["uid"][mask] % 7).astype(np.int32) + 1)


def test_only_the_last_batch_of_a_client_is_partial():
  data = make_data([7, 1, 12, 5])
  batch_size = 3
  packed = pack_clients(data, [0, 1, 2, 3], batch_size=batch_size, num_epochs=2, num_steps=16, cohort_size=6)
  for slot in range(6):
    per_step = packed["mask"][slot].sum(axis=1)
    count = int(packed["num_examples"][slot])
    full, rest = divmod(count, batch_size)
    expected = [batch_size] * full + ([rest] if rest else [])
    expected += [0] * (16 - len(expected))
    np.testing.assert_array_equal(per_step, expected)
    # Within the steps the real examples come first: the flattened mask is a prefix of True.
    flat = packed["mask"][slot].reshape(-1)
    np.testing.assert_array_equal(flat, np.arange(flat.size) < count)


def test_padded_entries_are_zero():
  data = make_data([3, 10])
  packed = pack_clients(data, [0, 1], batch_size=4, num_epochs=1, num_steps=8, cohort_size=4)
  padding = ~packed["mask"]
  assert padding.sum() == 4 * 8 * 4 - 13
  np.testing.assert_array_equal(packed["uid"][padding], 0)
  np.testing.assert_array_equal(packed["x"][padding], 0.0)
  np.testing.assert_array_equal(packed["label"][padding], 0)
  assert np.all(packed["label"][packed["mask"]] >= 1)  # real labels are never 0 here


def test_padded_cohort_slots_are_empty():
  data = make_data([3, 10, 2])
  packed = pack_clients(data, [2, 0], batch_size=2, cohort_size=5, seed=1, round_num=1)
  np.testing.assert_array_equal(packed["num_examples"], [2, 3, 0, 0, 0])
  assert packed["mask"].shape == (5, 2, 2)
  assert not packed["mask"][2:].any()
  np.testing.assert_array_equal(packed["x"][2:], 0.0)
  np.testing.assert_array_equal(packed["uid"][2:], 0)


def test_empty_round_padded_to_cohort_size():
  data = make_data([3])
  packed = pack_clients(data, [], batch_size=2, cohort_size=2)
  np.testing.assert_array_equal(packed["num_examples"], [0, 0])
  assert packed["mask"].shape == (2, 1, 2) and not packed["mask"].any()


def test_repeated_client_index_packs_the_client_twice():
  data = make_data([4, 6])
  packed = pack_clients(data, [1, 1], batch_size=4, seed=0, round_num=0)
  for slot in (0, 1):
    np.testing.assert_array_equal(np.sort(real_sequence(packed, slot)), client_uids(data, 1))


# Shuffling ------------------------------------------------------------------------------------------------------------


def test_shuffle_reproducible_for_seed_and_round():
  data = make_data([9, 17, 4])
  kwargs = dict(batch_size=4, num_epochs=2, seed=11, round_num=6)
  first = pack_clients(data, [0, 1, 2], **kwargs)
  second = pack_clients(data, [0, 1, 2], **kwargs)
  for key in first:
    np.testing.assert_array_equal(first[key], second[key])


def test_shuffle_differs_across_rounds_and_seeds():
  data = make_data([30])
  base = pack_clients(data, [0], batch_size=5, seed=0, round_num=0)["uid"]
  other_round = pack_clients(data, [0], batch_size=5, seed=0, round_num=1)["uid"]
  other_seed = pack_clients(data, [0], batch_size=5, seed=1, round_num=0)["uid"]
  assert not np.array_equal(base, other_round)
  assert not np.array_equal(base, other_seed)
  np.testing.assert_array_equal(np.sort(base.ravel()), np.sort(other_round.ravel()))


def test_shuffle_false_keeps_storage_order():
  data = make_data([5, 3])
  packed = pack_clients(data, [0, 1], batch_size=4, num_epochs=2, shuffle=False, seed=123, round_num=9)
  np.testing.assert_array_equal(real_sequence(packed, 0), [1, 2, 3, 4, 5, 1, 2, 3, 4, 5])
  np.testing.assert_array_equal(real_sequence(packed, 1), [6, 7, 8, 6, 7, 8])
  np.testing.assert_array_equal(packed["uid"][1], [[6, 7, 8, 6], [7, 8, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])


def test_shuffle_false_ignores_seed_and_round():
  data = make_data([5, 3])
  a = pack_clients(data, [0, 1], batch_size=2, shuffle=False, seed=0, round_num=0)
  b = pack_clients(data, [0, 1], batch_size=2, shuffle=False, seed=9, round_num=4)
  np.testing.assert_array_equal(a["uid"], b["uid"])


def test_max_steps_cuts_the_stream_after_the_cap():
  data = make_data([5])
  packed = pack_clients(data, [0], batch_size=2, num_epochs=3, max_steps=4, shuffle=False)
  np.testing.assert_array_equal(real_sequence(packed, 0), [1, 2, 3, 4, 5, 1, 2, 3])
  assert packed["mask"].shape == (1, 4, 2)


# Step bucketing and num_steps -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_steps, bucket",
    [(-3, 1), (0, 1), (1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (8, 8), (9, 16), (1000, 1024), (1024, 1024),
     (1025, 2048)],
)
def test_bucket_num_steps_values(num_steps, bucket):
  assert bucket_num_steps(num_steps) == bucket


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 2**40))
def test_bucket_is_smallest_power_of_two_at_least_n(n):
  bucket = bucket_num_steps(n)
  assert bucket >= n
  assert bucket & (bucket - 1) == 0
  assert bucket < 2 * n


def test_bucket_num_steps_exact_for_large_values():
  n = 2**49 + 1
  assert bucket_num_steps(n) == 2**50


def test_step_axis_is_bucketed_to_power_of_two():
  data = make_data([10, 2])
  # ceil(10 / 2) = 5 steps -> bucket 8
  assert pack_clients(data, [0, 1], batch_size=2)["mask"].shape == (2, 8, 2)
  # only the small client: 1 step -> 1
  assert pack_clients(data, [1], batch_size=2)["mask"].shape == (1, 1, 2)
  # 4 steps exactly -> 4
  assert pack_clients(data, [0], batch_size=3, num_epochs=1)["mask"].shape == (1, 4, 3)


def test_explicit_num_steps_is_used_as_given():
  data = make_data([10, 2])
  packed = pack_clients(data, [0, 1], batch_size=2, num_steps=5)
  assert packed["mask"].shape == (2, 5, 2)
  np.testing.assert_array_equal(packed["num_examples"], [10, 2])
  assert pack_clients(data, [0, 1], batch_size=2, num_steps=32)["uid"].shape == (2, 32, 2)


def test_explicit_num_steps_too_small_raises():
  data = make_data([10, 2])
  with pytest.raises(ValueError, match="num_steps \\(4\\) is smaller than the 5 steps"):
    pack_clients(data, [0, 1], batch_size=2, num_steps=4)
  # max_steps makes it fit.
  packed = pack_clients(data, [0, 1], batch_size=2, num_steps=4, max_steps=4)
  np.testing.assert_array_equal(packed["num_examples"], [8, 2])


def test_max_num_steps():
  data = make_data([3, 7, 20, 1])
  assert max_num_steps(data, batch_size=4) == 8  # ceil(20/4) = 5 -> 8
  assert max_num_steps(data, batch_size=4, num_epochs=3) == 16  # 15 -> 16
  assert max_num_steps(data, batch_size=4, num_epochs=3, max_steps=3) == 4
  assert max_num_steps(data, batch_size=20) == 1
  # It fits every client, so any cohort packs to the same shape.
  steps = max_num_steps(data, batch_size=4, num_epochs=2)
  for indices in ([0], [1, 3], [2, 0]):
    assert pack_clients(data, indices, batch_size=4, num_epochs=2, num_steps=steps)["mask"].shape[1] == steps


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=True), "batch_size"),
        (dict(batch_size=2.0), "batch_size"),
        (dict(batch_size=2, num_epochs=0), "num_epochs"),
        (dict(batch_size=2, max_steps=0), "max_steps"),
        (dict(batch_size=2, max_steps=False), "max_steps"),
    ],
)
def test_max_num_steps_validation(kwargs, name):
  with pytest.raises(ValueError, match=name):
    max_num_steps(make_data([3]), **kwargs)


# Validation of pack_clients -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=-1), "batch_size"),
        (dict(batch_size=True), "batch_size"),
        (dict(batch_size=1.5), "batch_size"),
        (dict(batch_size=2, num_epochs=0), "num_epochs"),
        (dict(batch_size=2, num_epochs=True), "num_epochs"),
        (dict(batch_size=2, max_steps=0), "max_steps"),
        (dict(batch_size=2, num_steps=0), "num_steps"),
        (dict(batch_size=2, num_steps=4.0), "num_steps"),
        (dict(batch_size=2, cohort_size=0), "cohort_size"),
        (dict(batch_size=2, cohort_size=1), "cohort_size"),  # fewer slots than the 2 clients given
    ],
)
def test_pack_clients_validation(kwargs, name):
  with pytest.raises(ValueError, match=name):
    pack_clients(make_data([3, 4]), [0, 1], **kwargs)


@pytest.mark.parametrize("indices", [[2], [-1], [0, 5]])
def test_pack_clients_rejects_out_of_range_indices(indices):
  with pytest.raises(ValueError, match="client_indices"):
    pack_clients(make_data([3, 4]), indices, batch_size=2)


def test_pack_clients_rejects_non_federated_data():
  with pytest.raises(TypeError, match="data"):
    pack_clients({"c0": {"x": np.zeros(3)}}, [0], batch_size=2)


def test_pack_clients_rejects_empty_cohort_without_slots():
  with pytest.raises(ValueError, match="cohort_size"):
    pack_clients(make_data([3]), [], batch_size=2)


def test_pack_clients_does_not_modify_data():
  data = make_data([3, 4])
  before = {key: value.copy() for key, value in data.examples.items()}
  packed = pack_clients(data, [0, 1], batch_size=4, cohort_size=3)
  packed["uid"][...] = -1  # the output is a fresh, writable array
  for key, value in data.examples.items():
    np.testing.assert_array_equal(value, before[key])


# pack_centralized and ClientSpec --------------------------------------------------------------------------------------


def test_pack_centralized_keeps_order():
  examples = {"uid": np.arange(1, 8), "x": np.arange(7, dtype=np.float32)}
  packed = pack_centralized(examples, batch_size=3)
  assert packed["uid"].shape == (1, 4, 3)  # ceil(7/3) = 3 -> 4
  np.testing.assert_array_equal(packed["uid"][0], [[1, 2, 3], [4, 5, 6], [7, 0, 0], [0, 0, 0]])
  np.testing.assert_array_equal(packed["num_examples"], [7])
  assert pack_centralized(examples, batch_size=3, num_steps=3)["uid"].shape == (1, 3, 3)


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(batch_size=True), ValueError, "batch_size"),
        (dict(batch_size=4, num_epochs=0), ValueError, "num_epochs"),
        (dict(batch_size=4, num_epochs=1.0), ValueError, "num_epochs"),
        (dict(batch_size=4, max_steps=0), ValueError, "max_steps"),
        (dict(batch_size=4, shuffle=1), TypeError, "shuffle"),
        (dict(batch_size=4, shuffle="yes"), TypeError, "shuffle"),
    ],
)
def test_client_spec_validation(kwargs, error, name):
  with pytest.raises(error, match=name):
    ClientSpec(**kwargs)


def test_client_spec_is_frozen():
  spec = ClientSpec(batch_size=4)
  with pytest.raises(AttributeError):
    spec.batch_size = 8


@pytest.mark.parametrize("shuffle", [True, False])
def test_client_spec_pack_equals_pack_clients(shuffle):
  data = make_data([5, 11, 2, 8])
  spec = ClientSpec(batch_size=3, num_epochs=2, max_steps=5, shuffle=shuffle)
  from_spec = spec.pack(data, [3, 0, 1], seed=4, round_num=7, cohort_size=4, num_steps=8)
  direct = pack_clients(
      data, [3, 0, 1], batch_size=3, num_epochs=2, max_steps=5, shuffle=shuffle, seed=4, round_num=7,
      cohort_size=4, num_steps=8,
  )
  assert set(from_spec) == set(direct)
  for key in direct:
    np.testing.assert_array_equal(from_spec[key], direct[key])
  assert spec.max_num_steps(data) == max_num_steps(data, batch_size=3, num_epochs=2, max_steps=5) == 8


# Property: the multiset of packed example ids -------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 12), min_size=1, max_size=5),
    batch_size=st.integers(1, 6),
    num_epochs=st.integers(1, 3),
    max_steps=st.none() | st.integers(1, 8),
    extra_slots=st.integers(0, 2),
    shuffle=st.booleans(),
    seed=st.integers(0, 1000),
    round_num=st.integers(0, 1000),
)
def test_packed_ids_multiset(sizes, batch_size, num_epochs, max_steps, extra_slots, shuffle, seed, round_num):
  data = make_data(sizes)
  indices = list(range(len(sizes)))[::-1]  # reversed: slot order follows client_indices, not storage
  packed = pack_clients(
      data, indices, batch_size=batch_size, num_epochs=num_epochs, max_steps=max_steps,
      cohort_size=len(sizes) + extra_slots, shuffle=shuffle, seed=seed, round_num=round_num,
  )
  steps_needed = [-(-expected_num_examples(n, batch_size, num_epochs, max_steps) // batch_size) for n in sizes]
  assert packed["mask"].shape == (len(sizes) + extra_slots, bucket_num_steps(max(steps_needed)), batch_size)
  for slot, client in enumerate(indices):
    uids = client_uids(data, client)
    size = len(uids)
    count = expected_num_examples(size, batch_size, num_epochs, max_steps)
    sequence = real_sequence(packed, slot)
    assert packed["num_examples"][slot] == count
    assert sequence.shape == (count,)
    full_epochs, rest = divmod(count, size)
    # Complete epochs: each a permutation of the client's ids; the cut epoch: distinct ids of the client.
    for epoch in range(full_epochs):
      np.testing.assert_array_equal(np.sort(sequence[epoch * size:(epoch + 1) * size]), uids)
    tail = sequence[full_epochs * size:]
    assert len(set(tail.tolist())) == rest and set(tail.tolist()) <= set(uids.tolist())
    counts = collections.Counter(sequence.tolist())
    assert set(counts) <= set(uids.tolist())
    assert all(full_epochs <= c <= full_epochs + 1 for c in counts.values())
    if not shuffle:
      expected = np.concatenate([np.tile(uids, full_epochs), uids[:rest]])
      np.testing.assert_array_equal(sequence, expected)
  for slot in range(len(sizes), len(sizes) + extra_slots):
    assert packed["num_examples"][slot] == 0 and not packed["mask"][slot].any()
  np.testing.assert_array_equal(packed["uid"][~packed["mask"]], 0)


# Per-client step budgets (stragglers' partial work, fedjax_lite.systems) ------------------------------------------------


@settings(max_examples=40, deadline=None, derandomize=True)
@given(sizes=st.lists(st.integers(1, 13), min_size=1, max_size=5), batch_size=st.integers(1, 4),
       num_epochs=st.integers(1, 3), data=st.data())
def test_step_budget_keeps_the_first_batches_of_the_same_stream(sizes, batch_size, num_epochs, data):
  """A client with budget k processes exactly its first k batches of the unbudgeted packing (same shuffles), the
  rest masked and zero; num_examples = min(E * n, k * B)."""
  packed_data = make_data(sizes)
  indices = np.arange(len(sizes))
  budget = np.array([data.draw(st.integers(0, -(-size * num_epochs // batch_size) + 1)) for size in sizes])
  full = pack_clients(packed_data, indices, batch_size=batch_size, num_epochs=num_epochs, seed=3, round_num=2)
  cut = pack_clients(packed_data, indices, batch_size=batch_size, num_epochs=num_epochs, seed=3, round_num=2,
                     num_steps=full["mask"].shape[1], step_budget=budget)
  assert cut["mask"].shape == full["mask"].shape
  for slot, size in enumerate(sizes):
    expected = min(size * num_epochs, int(budget[slot]) * batch_size)
    assert cut["num_examples"][slot] == expected
    np.testing.assert_array_equal(real_sequence(cut, slot), real_sequence(full, slot)[:expected])
    assert np.count_nonzero(np.any(cut["mask"][slot], axis=-1)) == -(-expected // batch_size)
    assert not cut["uid"][slot][~cut["mask"][slot]].any()


def test_step_budget_zero_leaves_an_empty_slot_and_max_steps_still_applies():
  data = make_data([6, 6])
  packed = pack_clients(data, [0, 1], batch_size=2, max_steps=2, step_budget=np.array([0, 5]), shuffle=False)
  np.testing.assert_array_equal(packed["num_examples"], [0, 4])  # budget 0: empty; max_steps 2 < budget 5
  assert not packed["mask"][0].any()


@pytest.mark.parametrize("budget, match", [([1], "one per client"), ([1.0, 2.0], "integers"), ([1, -1], ">= 0"),
                                           ([[1, 2]], "one per client")])
def test_step_budget_validation(budget, match):
  with pytest.raises(ValueError, match=match):
    pack_clients(make_data([3, 4]), [0, 1], batch_size=2, step_budget=np.asarray(budget))


def test_client_spec_counts_and_budget_pass_through():
  data = make_data([5, 9, 2])
  spec = ClientSpec(batch_size=2, num_epochs=3, max_steps=10)
  np.testing.assert_array_equal(spec.num_examples(data, [1, 0, 2]), [min(27, 20), 15, 6])
  np.testing.assert_array_equal(spec.num_steps(data, [1, 0, 2]), [10, 8, 3])
  np.testing.assert_array_equal(spec.num_steps(data, [1, 0, 2]), data.num_steps(2, 3, 10)[[1, 0, 2]])
  budget = np.array([3, 1, 2])
  np.testing.assert_array_equal(
      spec.pack(data, [1, 0, 2], seed=0, round_num=1, step_budget=budget)["uid"],
      pack_clients(data, [1, 0, 2], batch_size=2, num_epochs=3, max_steps=10, seed=0, round_num=1,
                   step_budget=budget)["uid"])
