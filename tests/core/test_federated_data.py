"""Tests for fedjax_lite.core.federated_data: the host-side CSR store of clients' examples.

Covers the two constructors (round trips, client order, example order), access by index and by id, ``subset``
and ``preprocess``, the ``num_steps`` formula, immutability, ``element_spec``, and every validation error (each
naming the offending argument).
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedjax_lite.core.federated_data import FederatedData


def three_clients():
  """Clients 'b' (2 examples), 'a' (3), 'c' (1), in that insertion order; ids are unique per example."""
  return {
      "b": {"x": np.array([[10.0, 11.0], [12.0, 13.0]], np.float32), "y": np.array([1, 0], np.int32)},
      "a": {"x": np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]], np.float32), "y": np.array([0, 1, 2], np.int32)},
      "c": {"x": np.array([[20.0, 21.0]], np.float32), "y": np.array([2], np.int32)},
  }


# Construction -------------------------------------------------------------------------------------------------------


def test_from_clients_round_trip_keeps_insertion_order():
  clients = three_clients()
  data = FederatedData.from_clients(clients)
  assert data.client_ids == ("b", "a", "c")
  assert data.num_clients == 3
  assert len(data) == 3
  assert list(data) == ["b", "a", "c"]
  np.testing.assert_array_equal(data.client_sizes, [2, 3, 1])
  np.testing.assert_array_equal(data.offsets, [0, 2, 5, 6])
  assert data.offsets.dtype == np.int64
  assert data.num_examples == 6
  for cid, examples in clients.items():
    got = data[cid]
    assert sorted(got) == ["x", "y"]
    for key in examples:
      np.testing.assert_array_equal(got[key], examples[key])
      assert got[key].dtype == examples[key].dtype


def test_from_clients_stringifies_ids():
  data = FederatedData.from_clients({3: {"x": np.arange(2)}, 1: {"x": np.arange(4)}})
  assert data.client_ids == ("3", "1")
  assert 3 in data and "3" in data and "2" not in data
  np.testing.assert_array_equal(data["1"]["x"], np.arange(4))
  np.testing.assert_array_equal(data.client("3")["x"], np.arange(2))


def test_from_arrays_orders_clients_by_sorted_id_and_keeps_example_order():
  # Example ids 0..7 as a feature; client ids deliberately interleaved and unsorted.
  client_ids = np.array(["z", "a", "m", "a", "z", "m", "a", "z"])
  arrays = {"example_id": np.arange(8), "x": np.arange(8, dtype=np.float32) * 10}
  data = FederatedData.from_arrays(arrays, client_ids)
  assert data.client_ids == ("a", "m", "z")
  np.testing.assert_array_equal(data["a"]["example_id"], [1, 3, 6])
  np.testing.assert_array_equal(data["m"]["example_id"], [2, 5])
  np.testing.assert_array_equal(data["z"]["example_id"], [0, 4, 7])
  np.testing.assert_array_equal(data["z"]["x"], [0.0, 40.0, 70.0])
  np.testing.assert_array_equal(data.offsets, [0, 3, 5, 8])


def test_from_arrays_sorts_integer_ids_numerically():
  data = FederatedData.from_arrays({"x": np.arange(4)}, [10, 2, 10, 2])
  assert data.client_ids == ("2", "10")
  np.testing.assert_array_equal(data["10"]["x"], [0, 2])
  np.testing.assert_array_equal(data["2"]["x"], [1, 3])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=40))
def test_from_arrays_then_all_examples_is_a_stable_sort_by_client(client_of_example):
  client_ids = np.array(client_of_example)
  example_ids = np.arange(len(client_ids))
  data = FederatedData.from_arrays({"example_id": example_ids}, client_ids)
  expected_order = np.argsort(client_ids, kind="stable")
  np.testing.assert_array_equal(data.all_examples()["example_id"], example_ids[expected_order])
  assert data.client_ids == tuple(str(c) for c in sorted(set(client_of_example)))
  for cid in data.client_ids:
    np.testing.assert_array_equal(data[cid]["example_id"], np.flatnonzero(client_ids == int(cid)))


def test_constructor_directly():
  data = FederatedData(("p", "q"), {"x": np.arange(5)}, [0, 2, 5])
  np.testing.assert_array_equal(data["q"]["x"], [2, 3, 4])
  np.testing.assert_array_equal(data.client(0)["x"], [0, 1])


# Access -------------------------------------------------------------------------------------------------------------


def test_client_by_index_and_by_id_agree():
  data = FederatedData.from_clients(three_clients())
  for index, cid in enumerate(data.client_ids):
    by_index = data.client(index)
    by_id = data.client(cid)
    by_item = data[cid]
    assert data.index_of(cid) == index
    for key in ("x", "y"):
      np.testing.assert_array_equal(by_index[key], by_id[key])
      np.testing.assert_array_equal(by_index[key], by_item[key])
  np.testing.assert_array_equal(data.client(np.int64(1))["y"], [0, 1, 2])


@pytest.mark.parametrize("index", [-1, 3, 100])
def test_client_index_out_of_range(index):
  data = FederatedData.from_clients(three_clients())
  with pytest.raises(IndexError, match="client index"):
    data.client(index)


def test_unknown_client_id_raises_key_error():
  data = FederatedData.from_clients(three_clients())
  with pytest.raises(KeyError, match="unknown client id 'nope'"):
    data["nope"]
  with pytest.raises(KeyError, match="unknown client id"):
    data.client("nope")
  with pytest.raises(KeyError, match="unknown client id"):
    data.index_of("nope")
  with pytest.raises(KeyError, match="unknown client id"):
    data.subset(["a", "nope"])


def test_element_spec():
  data = FederatedData.from_clients(
      {"a": {"image": np.zeros((2, 4, 3, 1), np.float32), "label": np.zeros(2, np.int64)},
       "b": {"image": np.ones((1, 4, 3, 1), np.float32), "label": np.ones(1, np.int64)}}
  )
  assert data.element_spec == {"image": ((4, 3, 1), np.dtype(np.float32)), "label": ((), np.dtype(np.int64))}


def test_repr_mentions_counts():
  text = repr(FederatedData.from_clients(three_clients()))
  assert "3 clients" in text and "6 examples" in text and "sizes 1..3" in text


# Transformations ----------------------------------------------------------------------------------------------------


def test_subset_keeps_requested_order_and_content():
  data = FederatedData.from_clients(three_clients())
  sub = data.subset(["c", "b"])
  assert sub.client_ids == ("c", "b")
  np.testing.assert_array_equal(sub.client_sizes, [1, 2])
  np.testing.assert_array_equal(sub["b"]["x"], data["b"]["x"])
  np.testing.assert_array_equal(sub["c"]["y"], [2])
  assert data.client_ids == ("b", "a", "c")  # the original is untouched


def test_subset_with_repeated_id_is_rejected():
  data = FederatedData.from_clients(three_clients())
  with pytest.raises(ValueError, match="client_ids"):
    data.subset(["a", "a"])


def test_preprocess_changes_shapes_dtypes_features_and_counts():
  data = FederatedData.from_clients(three_clients())

  def keep_first_two_and_flatten(examples):
    x = examples["x"][:2]
    return {"flat": x.reshape(len(x), 1, 2).astype(np.float16), "y2": examples["y"][:2] * 2}

  out = data.preprocess(keep_first_two_and_flatten)
  assert out.client_ids == data.client_ids
  np.testing.assert_array_equal(out.client_sizes, [2, 2, 1])
  assert out.element_spec == {"flat": ((1, 2), np.dtype(np.float16)), "y2": ((), np.dtype(np.int32))}
  np.testing.assert_array_equal(out["a"]["flat"], [[[0.0, 1.0]], [[2.0, 3.0]]])
  np.testing.assert_array_equal(out["a"]["y2"], [0, 2])
  np.testing.assert_array_equal(out["c"]["y2"], [4])
  assert set(data["a"]) == {"x", "y"}  # the original is untouched


def test_preprocess_can_grow_clients():
  data = FederatedData.from_clients(three_clients())
  out = data.preprocess(lambda ex: {key: np.concatenate([value, value]) for key, value in ex.items()})
  np.testing.assert_array_equal(out.client_sizes, 2 * data.client_sizes)
  np.testing.assert_array_equal(out["b"]["y"], [1, 0, 1, 0])


def test_preprocess_sees_each_client_once_in_order():
  data = FederatedData.from_clients(three_clients())
  seen = []

  def record(examples):
    seen.append(examples["y"].tolist())
    return examples

  data.preprocess(record)
  assert seen == [[1, 0], [0, 1, 2], [2]]


def test_preprocess_that_empties_a_client_is_rejected():
  data = FederatedData.from_clients(three_clients())
  with pytest.raises(ValueError, match="empty clients: \\['c'\\]"):
    data.preprocess(lambda ex: {key: value[1:] for key, value in ex.items()})


@pytest.mark.parametrize("fn", [None, 3, "upper"])
def test_preprocess_rejects_non_callable(fn):
  data = FederatedData.from_clients(three_clients())
  with pytest.raises(TypeError, match="fn"):
    data.preprocess(fn)


def test_num_steps_formula():
  data = FederatedData.from_clients({cid: {"x": np.zeros(n)} for cid, n in zip("abcd", [1, 5, 10, 11])})
  # ceil(E * n / B)
  np.testing.assert_array_equal(data.num_steps(batch_size=5), [1, 1, 2, 3])
  np.testing.assert_array_equal(data.num_steps(batch_size=5, num_epochs=3), [1, 3, 6, 7])
  np.testing.assert_array_equal(data.num_steps(batch_size=4, num_epochs=2, max_steps=4), [1, 3, 4, 4])
  np.testing.assert_array_equal(data.num_steps(batch_size=1), [1, 5, 10, 11])


@settings(max_examples=50, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 30), min_size=1, max_size=6),
    batch_size=st.integers(1, 12),
    num_epochs=st.integers(1, 4),
    max_steps=st.none() | st.integers(1, 10),
)
def test_num_steps_matches_ceil(sizes, batch_size, num_epochs, max_steps):
  data = FederatedData.from_clients({str(k): {"x": np.zeros(n)} for k, n in enumerate(sizes)})
  expected = [int(np.ceil(num_epochs * n / batch_size)) for n in sizes]
  if max_steps is not None:
    expected = [min(s, max_steps) for s in expected]
  np.testing.assert_array_equal(data.num_steps(batch_size, num_epochs, max_steps), expected)


# Immutability -------------------------------------------------------------------------------------------------------


def test_arrays_are_read_only():
  data = FederatedData.from_clients(three_clients())
  with pytest.raises(ValueError, match="read-only"):
    data.examples["x"][0, 0] = 1.0
  with pytest.raises(ValueError, match="read-only"):
    data.offsets[1] = 0
  with pytest.raises(ValueError, match="read-only"):
    data["a"]["y"][0] = 5
  with pytest.raises(ValueError, match="read-only"):
    data.client(0)["x"][...] = 0.0
  with pytest.raises(ValueError, match="read-only"):
    data.all_examples()["y"][0] = 5


def test_fields_cannot_be_reassigned():
  data = FederatedData.from_clients(three_clients())
  with pytest.raises(AttributeError):
    data.client_ids = ("q",)
  with pytest.raises(AttributeError):
    data.offsets = np.array([0, 6])


def test_from_clients_copies_inputs():
  clients = three_clients()
  data = FederatedData.from_clients(clients)
  clients["a"]["x"][0, 0] = -100.0
  assert clients["a"]["x"].flags.writeable  # the caller's array is not frozen
  np.testing.assert_array_equal(data["a"]["x"][0], [0.0, 1.0])


def test_from_arrays_copies_inputs():
  x = np.arange(4.0)
  data = FederatedData.from_arrays({"x": x}, ["a", "a", "b", "b"])
  x[0] = 99.0
  assert x.flags.writeable
  np.testing.assert_array_equal(data["a"]["x"], [0.0, 1.0])


def test_constructor_does_not_alias_caller_arrays():
  buffer = np.arange(4.0)
  data = FederatedData(("a",), {"x": buffer[:]}, np.array([0, 4]))
  buffer[0] = 99.0
  np.testing.assert_array_equal(data["a"]["x"], [0.0, 1.0, 2.0, 3.0])


# Validation errors --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("clients", [{}, [], None, [("a", {"x": [1]})]])
def test_from_clients_rejects_empty_or_non_mapping(clients):
  with pytest.raises(TypeError, match="clients"):
    FederatedData.from_clients(clients)


def test_from_clients_rejects_client_without_examples():
  with pytest.raises(ValueError, match="empty clients: \\['b'\\]"):
    FederatedData.from_clients({"a": {"x": np.arange(2)}, "b": {"x": np.zeros(0)}})


def test_from_clients_rejects_client_with_empty_feature_dict():
  with pytest.raises(TypeError, match="clients\\['a'\\]"):
    FederatedData.from_clients({"a": {}})


def test_constructor_rejects_no_clients():
  with pytest.raises(ValueError, match="at least one client"):
    FederatedData((), {"x": np.arange(2)}, [0])


def test_from_clients_rejects_mismatched_feature_lengths():
  with pytest.raises(ValueError, match="clients\\['a'\\].*same number of examples"):
    FederatedData.from_clients({"a": {"x": np.zeros(3), "y": np.zeros(2)}})


def test_from_clients_rejects_mismatched_feature_names():
  with pytest.raises(ValueError, match="client 'b' has features"):
    FederatedData.from_clients({"a": {"x": np.zeros(1)}, "b": {"z": np.zeros(1)}})


def test_from_clients_rejects_scalar_feature():
  with pytest.raises(ValueError, match="clients\\['a'\\]\\['x'\\].*leading example axis"):
    FederatedData.from_clients({"a": {"x": np.float32(1.0)}})


def test_from_clients_rejects_ids_that_collide_as_strings():
  with pytest.raises(ValueError, match="client_ids must be unique"):
    FederatedData.from_clients({1: {"x": np.zeros(1)}, "1": {"x": np.zeros(1)}})


def test_constructor_rejects_duplicate_ids():
  with pytest.raises(ValueError, match="client_ids must be unique"):
    FederatedData(("a", "a"), {"x": np.arange(2)}, [0, 1, 2])


def test_from_arrays_rejects_mismatched_lengths():
  with pytest.raises(ValueError, match="arrays.*same number of examples"):
    FederatedData.from_arrays({"x": np.zeros(3), "y": np.zeros(4)}, [0, 0, 0])
  with pytest.raises(ValueError, match="client_ids must have one entry per example \\(3\\)"):
    FederatedData.from_arrays({"x": np.zeros(3)}, [0, 0])
  with pytest.raises(ValueError, match="client_ids"):
    FederatedData.from_arrays({"x": np.zeros(3)}, [[0, 0, 0]])


def test_from_arrays_rejects_empty_arrays():
  with pytest.raises(TypeError, match="arrays"):
    FederatedData.from_arrays({}, [])


def test_from_arrays_with_no_examples_is_rejected():
  with pytest.raises(ValueError, match="at least one client"):
    FederatedData.from_arrays({"x": np.zeros(0)}, np.zeros(0, np.int64))


@pytest.mark.parametrize(
    "offsets, match",
    [
        ([0, 2], "offsets must have shape \\(3,\\)"),
        ([0, 1, 2, 4], "offsets must have shape \\(3,\\)"),
        ([[0, 2, 4]], "offsets must have shape"),
        ([1, 2, 4], "offsets must start at 0"),
        ([0, 2, 3], "offsets must start at 0 and end at the number of examples \\(4\\)"),
        ([0, 2, 5], "offsets"),
    ],
)
def test_constructor_rejects_bad_offsets(offsets, match):
  with pytest.raises(ValueError, match=match):
    FederatedData(("a", "b"), {"x": np.arange(4)}, offsets)


def test_constructor_rejects_empty_client_from_offsets():
  with pytest.raises(ValueError, match="empty clients: \\['b'\\]"):
    FederatedData(("a", "b", "c"), {"x": np.arange(4)}, [0, 2, 2, 4])


def test_decreasing_offsets_error_names_offsets():
  with pytest.raises(ValueError, match="offsets"):
    FederatedData(("a", "b", "c"), {"x": np.arange(4)}, [0, 3, 2, 4])


def test_constructor_rejects_fractional_offsets():
  with pytest.raises((ValueError, TypeError), match="offsets"):
    FederatedData(("a", "b"), {"x": np.arange(3)}, [0, 1.5, 3])


def test_constructor_rejects_mismatched_lengths():
  with pytest.raises(ValueError, match="examples.*same number of examples"):
    FederatedData(("a",), {"x": np.arange(3), "y": np.arange(2)}, [0, 3])


def test_constructor_rejects_non_mapping_examples():
  with pytest.raises(TypeError, match="examples"):
    FederatedData(("a",), [np.arange(3)], [0, 3])


def test_from_arrays_keeps_read_only_memory_maps_of_grouped_data(tmp_path):
  """Data already grouped by client (as on-disk datasets are) is not reordered, so a memory map stays a map."""
  x = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=(6, 2))
  x[...] = np.arange(12, dtype=np.float32).reshape(6, 2)
  x.flush()
  mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
  data = FederatedData.from_arrays({"x": mapped}, [0, 0, 1, 1, 1, 2])
  assert isinstance(data.examples["x"], np.memmap) and np.shares_memory(data.examples["x"], mapped)
  np.testing.assert_array_equal(data["1"]["x"], mapped[2:5])
  shuffled = FederatedData.from_arrays({"x": np.asarray(mapped)}, [1, 0, 1, 0, 2, 1])  # reordered: a copy
  np.testing.assert_array_equal(shuffled["0"]["x"], np.asarray(mapped)[[1, 3]])
