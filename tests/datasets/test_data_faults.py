"""Wrong data says so (issue #19, section 2): each fault as a user's files would have it, and the one clear error.

Labels outside the model's classes, a cache from another source, a damaged cache, silent conversions in the
loaders, and raw exceptions from malformed files. Every case asserts the error's type and that its message names
the file, the row or client, and what was expected; where a conversion fails, that no cache is left behind.
"""

from __future__ import annotations

import json
import os
import sqlite3
import warnings

import numpy as np
import pytest

from fedjax_lite.core import ClientSpec, FederatedData
from fedjax_lite.datasets import emnist as emnist_lib
from fedjax_lite.datasets import load_leaf, sources
from fedjax_lite.datasets.errors import DatasetFormatError, DatasetNotFoundError
from fedjax_lite.datasets.example_batch import BatchDecoder
from fedjax_lite.datasets.example_proto import encode_example
from fedjax_lite.datasets.feature_spec import FeatureSpec
from fedjax_lite.datasets.file_writers import write_leaf_json, write_tff_hdf5, write_tff_sqlite
from tests.datasets.fake_files import emnist_splits, expected_federated, with_label


def _files(folder):
  return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def _sqlite(folder, splits):
  folder.mkdir(parents=True, exist_ok=True)
  write_tff_sqlite(folder / "emnist_all.sqlite", splits)
  return folder


def _hdf5(folder, clients, test_clients):
  """The legacy digits-only files: ``clients`` as the train split, ``test_clients`` as the test split."""
  folder.mkdir(parents=True, exist_ok=True)
  for split, content in (("train", clients), ("test", test_clients)):
    (folder / f"fed_emnist_digitsonly_{split}.h5").unlink(missing_ok=True)
    write_tff_hdf5(folder / f"fed_emnist_digitsonly_{split}.h5", content)
  return folder


def _legacy_clients(splits, split="digits_only_train"):
  return {cid: {"pixels": c["pixels"], "label": c["label"].astype(np.int32)} for cid, c in splits[split].items()}


@pytest.fixture(scope="module")
def splits():
  return emnist_splits()


# ---- Labels outside the model's classes ----------------------------------------------------------------------

def test_emnist_label_99_of_62_classes_is_refused_naming_client_label_and_classes(splits, tmp_path):
  data_dir = _sqlite(tmp_path / "data", with_label(splits, "all_train", "f0001_01", 2, 99))
  with pytest.raises(DatasetFormatError) as info:
    emnist_lib.load_emnist(only_digits=False, data_dir=data_dir, cache_dir=tmp_path / "cache")
  message = str(info.value)
  for needed in (str(data_dir / "emnist_all.sqlite"), "'all_train'", "client 'f0001_01'", "'label' value 99",
                 "[0, 62)", "62 classes"):
    assert needed in message, message
  assert not _files(tmp_path / "cache" / "arrays")


def test_negative_and_int32_overflowing_labels_are_refused(splits, tmp_path):
  for label, shown in ((-1, "value -1"), (2**32 + 3, f"value {2**32 + 3}")):  # 2^32 + 3 would wrap to 3 in int32
    data_dir = _sqlite(tmp_path / f"data{label}", with_label(splits, "digits_only_test", "f0000_14", 0, label))
    with pytest.raises(DatasetFormatError, match=rf"client 'f0000_14'\) has 'label' {shown}; expected a class "
                                                 rf"label in \[0, 10\)"):
      emnist_lib.load_emnist(data_dir=data_dir, cache_dir=tmp_path / "cache")


def test_integer_values_outside_the_cached_dtype_are_refused_in_both_decoder_paths():
  """CIFAR-100's pixels are int64 in the file and uint8 in the cache: 300 must not wrap to 44, by the template
  path (many rows of one layout) or by the exact parser (the first row of a layout)."""
  spec = {"image": FeatureSpec("int64", (2,), np.uint8), "label": FeatureSpec("int64", (), np.int32, num_classes=5)}
  rows = [encode_example({"image": np.array([1, 2]), "label": np.array([1])}) for _ in range(6)]
  rows[4] = encode_example({"image": np.array([3, 300]), "label": np.array([1])})  # same length: template path
  with pytest.raises(DatasetFormatError, match=r"f.sqlite: row 14 \(client 'e'\) has 'image' value 300; expected "
                                               r"an integer in \[0, 255\] \(stored as uint8\)"):
    BatchDecoder(spec, where="f.sqlite").decode(rows, first_row=10, clients=list("abcdef"))
  with pytest.raises(DatasetFormatError, match=r"row 0 \(client 'a'\) has 'label' value 7; expected a class label "
                                               r"in \[0, 5\)"):
    BatchDecoder(spec, where="f.sqlite").decode([encode_example({"image": np.array([1, 2]), "label": [7]})],
                                                clients=["a"])


def test_run_training_refuses_labels_outside_the_classes_naming_the_client(tiny_model, tiny_params):
  from fedjax_lite.algorithms import fed_avg
  from fedjax_lite.training.loop import run_training
  import optax

  rng = np.random.default_rng(0)
  clients = {f"c{k}": {"x": rng.normal(size=(3, 8)).astype(np.float32), "y": np.array([0, 1, 2], np.int32)}
             for k in range(4)}
  clients["c2"]["y"] = np.array([1, 42, 0], np.int32)
  with pytest.raises(ValueError, match=r"outside the model's 4 classes \[0, 4\): client 'c2' has label 42 \(its "
                                       r"example 1\)"):
    run_training(fed_avg(tiny_model, client_learning_rate=0.1, server_optimizer=optax.sgd(1.0)),
                 FederatedData.from_clients(clients), tiny_params, client_spec=ClientSpec(batch_size=2),
                 clients_per_round=2, num_rounds=1, progress=False, num_classes=4)


def _one_error_line(capsys):
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("fedjax-lite: error: "), err
  return err


def test_cli_refuses_an_emnist_file_with_label_99_in_one_line(splits, tmp_path, monkeypatch, capsys):
  from fedjax_lite.training.cli import main

  monkeypatch.setenv("FEDJAX_LITE_DATA", str(tmp_path / "cache"))
  data_dir = _sqlite(tmp_path / "data", with_label(splits, "all_train", "f0001_01", 2, 99))
  code = main(["train", "--dataset", "emnist", "--data-dir", str(data_dir), "--model", "dense", "--rounds", "1",
               "--clients-per-round", "2", "--output-dir", str(tmp_path / "run")])
  err = _one_error_line(capsys)
  assert code == 2 and "client 'f0001_01'" in err and "value 99" in err and "62 classes" in err
  assert not (tmp_path / "run" / "summary.json").exists()


def test_cli_checks_every_dataset_against_the_models_classes(tmp_path, monkeypatch, capsys):
  """Whatever the loader (TFDS's labels are not checked by a spec), the CLI refuses labels outside the model's
  classes before training, naming the client, the label and the class count."""
  from fedjax_lite.training import cli

  rng = np.random.default_rng(0)
  clients = {f"w{k}": {"x": rng.random((4, 8, 8, 1)).astype(np.float32), "y": np.array([0, 1, 2, 3], np.int32)}
             for k in range(3)}
  clients["w1"]["y"] = np.array([3, 2, 42, 1], np.int32)
  train = FederatedData.from_clients(clients)
  monkeypatch.setattr(cli, "_load_data", lambda args: (train, {"x": clients["w0"]["x"], "y": clients["w0"]["y"]},
                                                       10, (8, 8, 1)))
  code = cli.main(["train", "--model", "dense", "--rounds", "1", "--clients-per-round", "2", "--output-dir",
                   str(tmp_path / "run")])
  err = _one_error_line(capsys)
  assert code == 2 and "client 'w1' has label 42" in err and "10 classes" in err, err


# ---- A cache is used only for the source it was made from ---------------------------------------------------

def test_a_wrong_data_dir_never_uses_another_sources_cache(splits, tmp_path, monkeypatch):
  cache = tmp_path / "cache"
  emnist_lib.load_emnist(data_dir=_sqlite(tmp_path / "a", splits), cache_dir=cache)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(DatasetNotFoundError, match=rf"Converted caches of other files exist \({tmp_path / 'a'}/"
                                                 rf"emnist_all.sqlite\).* pass data_dir={tmp_path / 'a'}"):
    emnist_lib.load_emnist(data_dir=empty, cache_dir=cache)
  # Another folder with another EMNIST gets its own cache, and the first folder's stays as it was.
  other = with_label(splits, "digits_only_train", "f0002_07", 0, 9 - int(splits["digits_only_train"]["f0002_07"]
                                                                           ["label"][0]))
  data_b = emnist_lib.load_emnist(data_dir=_sqlite(tmp_path / "b", other), cache_dir=cache)
  np.testing.assert_array_equal(data_b.train.examples["y"], expected_federated(other["digits_only_train"], "label"))
  monkeypatch.setattr(sources, "convert_sql_split", lambda *a, **k: pytest.fail("a cache was rebuilt"))
  data_a = emnist_lib.load_emnist(data_dir=tmp_path / "a", cache_dir=cache)
  np.testing.assert_array_equal(data_a.train.examples["y"], expected_federated(splits["digits_only_train"], "label"))
  # A cache stays usable once its own source is deleted, for that same data_dir.
  (tmp_path / "a" / "emnist_all.sqlite").unlink()
  kept = emnist_lib.load_emnist(data_dir=tmp_path / "a", cache_dir=cache)
  np.testing.assert_array_equal(kept.test.examples["y"], expected_federated(splits["digits_only_test"], "label"))


def test_an_archive_in_another_folder_is_unpacked_for_itself(splits, tmp_path):
  """Two folders each with an emnist_all.sqlite.lzma of different content: the second must not reuse the first's
  decompressed copy."""
  import lzma

  other = with_label(splits, "digits_only_train", "f0000_14", 1, 9 - int(splits["digits_only_train"]["f0000_14"]
                                                                          ["label"][1]))
  for name, content in (("a", splits), ("b", other)):
    _sqlite(tmp_path / f"src_{name}", content)
    (tmp_path / name).mkdir()
    (tmp_path / name / "emnist_all.sqlite.lzma").write_bytes(
        lzma.compress((tmp_path / f"src_{name}" / "emnist_all.sqlite").read_bytes()))
  cache = tmp_path / "cache"
  data_a = emnist_lib.load_emnist(data_dir=tmp_path / "a", cache_dir=cache)
  data_b = emnist_lib.load_emnist(data_dir=tmp_path / "b", cache_dir=cache)
  np.testing.assert_array_equal(data_a.train.examples["y"], expected_federated(splits["digits_only_train"], "label"))
  np.testing.assert_array_equal(data_b.train.examples["y"], expected_federated(other["digits_only_train"], "label"))


def test_a_changed_file_at_the_same_path_rebuilds_and_a_touched_one_does_not(splits, tmp_path, monkeypatch):
  cache = tmp_path / "cache"
  data_dir = _sqlite(tmp_path / "data", splits)
  emnist_lib.load_emnist(data_dir=data_dir, cache_dir=cache)
  source = data_dir / "emnist_all.sqlite"
  os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))  # same bytes, new time
  calls = []
  original = sources.convert_sql_split
  monkeypatch.setattr(sources, "convert_sql_split", lambda *a, **k: calls.append(a) or original(*a, **k))
  emnist_lib.load_emnist(data_dir=data_dir, cache_dir=cache)
  assert calls == []  # the sha256 still matches: the cache is the source's
  [manifest] = (cache / "arrays" / "emnist_digits" / "train").glob("*/manifest.json")
  assert json.loads(manifest.read_text())["source"]["mtime_ns"] == source.stat().st_mtime_ns  # not hashed again
  # Another label at the same path: the sha256 differs, so the cache is rebuilt.
  changed = with_label(splits, "digits_only_train", "f0001_01", 0,
                       (int(splits["digits_only_train"]["f0001_01"]["label"][0]) + 1) % 10)
  source.unlink()
  write_tff_sqlite(source, changed)
  data = emnist_lib.load_emnist(data_dir=data_dir, cache_dir=cache)
  assert len(calls) == 2  # train and test
  np.testing.assert_array_equal(data.train.examples["y"], expected_federated(changed["digits_only_train"], "label"))


def test_a_cache_of_the_unkeyed_format_is_removed_when_its_split_is_converted(splits, tmp_path):
  legacy = tmp_path / "cache" / "arrays" / "emnist_digits" / "train"
  legacy.mkdir(parents=True)
  (legacy / "manifest.json").write_text(json.dumps({"format_version": 1}))
  (legacy / "pixels.npy").write_bytes(b"\x00" * 1000)
  emnist_lib.load_emnist(data_dir=_sqlite(tmp_path / "data", splits), cache_dir=tmp_path / "cache")
  assert not [p for p in legacy.iterdir() if p.is_file()] and len([p for p in legacy.iterdir() if p.is_dir()]) == 1


# ---- A damaged cache is rebuilt from the source, or reported when the source is gone ---------------------------

def _label_file(cache):
  [path] = (cache / "arrays" / "emnist_digits" / "train").rglob("label.npy")
  return path


def _flip_last_byte(path):
  content = bytearray(path.read_bytes())
  content[-1] ^= 0x7F  # the high byte of the last int32 label: v -> v + 0x7F000000
  path.write_bytes(bytes(content))


def test_flipped_bytes_in_a_cached_label_are_rebuilt_from_the_source(splits, tmp_path):
  cache = tmp_path / "cache"
  data_dir = _sqlite(tmp_path / "data", splits)
  emnist_lib.load_emnist(data_dir=data_dir, cache_dir=cache)
  _flip_last_byte(_label_file(cache))
  with pytest.warns(RuntimeWarning, match=r"is damaged \(label.npy fails its CRC-32 at bytes 0\.\.\d+\)\. It is "
                                          r"rebuilt from .*emnist_all.sqlite"):
    data = emnist_lib.load_emnist(data_dir=data_dir, cache_dir=cache)
  np.testing.assert_array_equal(data.train.examples["y"], expected_federated(splits["digits_only_train"], "label"))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    emnist_lib.load_emnist(data_dir=data_dir, cache_dir=cache)  # rebuilt: no warning the next time


def test_a_damaged_cache_whose_source_is_gone_is_reported(splits, tmp_path):
  cache = tmp_path / "cache"
  data_dir = _sqlite(tmp_path / "data", splits)
  emnist_lib.load_emnist(data_dir=data_dir, cache_dir=cache)
  (data_dir / "emnist_all.sqlite").unlink()
  _flip_last_byte(_label_file(cache))
  with pytest.raises(DatasetFormatError, match=r"is damaged \(label.npy fails its CRC-32.*\)\. Its source "
                                               rf"{data_dir}/emnist_all.sqlite is no longer on disk"):
    emnist_lib.load_emnist(data_dir=data_dir, cache_dir=cache)


# ---- No silent conversions in the loaders --------------------------------------------------------------------

def test_hdf5_float_labels_are_integers_or_an_error(splits, tmp_path):
  pytest.importorskip("h5py")
  clients = _legacy_clients(splits)
  clients["f0002_07"] = dict(clients["f0002_07"], label=np.array([1.7]))
  _hdf5(tmp_path / "data", clients, _legacy_clients(splits, "digits_only_test"))
  with pytest.raises(DatasetFormatError, match=r"fed_emnist_digitsonly_train.h5: client 'f0002_07' example 0 has "
                                               r"'label' value 1.7 \(float64\); expected a class label in \[0, 10\)"):
    emnist_lib.load_emnist(data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")
  assert not _files(tmp_path / "cache" / "arrays")
  # Whole-number floats are the integers they spell.
  clients["f0002_07"] = dict(clients["f0002_07"], label=np.array([7.0]))
  _hdf5(tmp_path / "whole", clients, _legacy_clients(splits, "digits_only_test"))
  data = emnist_lib.load_emnist(data_dir=tmp_path / "whole", cache_dir=tmp_path / "cache")
  assert data.train["f0002_07"]["y"].tolist() == [7]


def test_hdf5_negative_label_is_an_error(splits, tmp_path):
  pytest.importorskip("h5py")
  clients = _legacy_clients(splits)
  clients["f0000_14"] = dict(clients["f0000_14"], label=np.array([1, -3, 2, 0], np.int32))
  _hdf5(tmp_path / "data", clients, _legacy_clients(splits, "digits_only_test"))
  with pytest.raises(DatasetFormatError, match=r"client 'f0000_14' example 1 has 'label' value -3"):
    emnist_lib.load_emnist(data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("labels, message", [
    ([1.5, 2], r"label 0 is 1.5; expected a whole number in \[0, 2\^31\)"),
    ([0, -1], r"label 1 is -1; expected a whole number in \[0, 2\^31\)"),
    (["cat", "dog"], r"string labels such as 'cat' need label_vocabulary"),
    ([[1, 2], [3]], r"'y' holds labels of different shapes"),
])
def test_leaf_labels_are_integers_in_range_or_an_error(tmp_path, labels, message):
  write_leaf_json(tmp_path / "t.json", {"u7": {"x": [[0.0], [1.0]], "y": labels}})
  with pytest.raises(DatasetFormatError, match=rf"t.json, user 'u7': {message}"):
    load_leaf(tmp_path / "t.json")


def test_leaf_label_vocabulary_and_num_classes(tmp_path):
  write_leaf_json(tmp_path / "t.json", {"u": {"x": [[0.0], [1.0], [2.0]], "y": ["dog", "cat", "dog"]},
                                        "v": {"x": [[3.0]], "y": ["bird"]}})
  with pytest.raises(DatasetFormatError, match=r"user 'v': label 0 is 'bird', which is not in label_vocabulary"):
    load_leaf(tmp_path / "t.json", label_vocabulary=["cat", "dog"])
  data = load_leaf(tmp_path / "t.json", label_vocabulary=["cat", "dog", "bird"])
  assert data["u"]["y"].tolist() == [1, 0, 1] and data["v"]["y"].tolist() == [2] and data["u"]["y"].dtype == np.int32
  write_leaf_json(tmp_path / "n.json", {"u": {"x": [[0.0], [1.0]], "y": [2.0, 61]}})
  assert load_leaf(tmp_path / "n.json", num_classes=62)["u"]["y"].tolist() == [2, 61]
  with pytest.raises(DatasetFormatError, match=r"label 1 is 61; expected a whole number in \[0, 10\)"):
    load_leaf(tmp_path / "n.json", num_classes=10)
  with pytest.raises(TypeError, match="label_vocabulary"):
    load_leaf(tmp_path / "n.json", label_vocabulary="cat")


# ---- Malformed files: one DatasetFormatError naming the file, the row or client, and what was expected ---------

def test_sql_num_examples_stored_as_text(splits, tmp_path):
  data_dir = _sqlite(tmp_path / "data", splits)
  with sqlite3.connect(data_dir / "emnist_all.sqlite") as connection:
    connection.execute("UPDATE client_metadata SET num_examples = 'three' WHERE client_id = 'f0001_01'")
  with pytest.raises(DatasetFormatError, match=r"emnist_all.sqlite: table client_metadata gives client 'f0001_01' "
                                               r"of split 'digits_only_train' num_examples 'three' \(str\); expected "
                                               r"a positive INTEGER"):
    emnist_lib.load_emnist(data_dir=data_dir, cache_dir=tmp_path / "cache")
  assert not _files(tmp_path / "cache" / "arrays")


def test_a_random_proto_blob_names_the_file_row_and_client(splits, tmp_path):
  data_dir = _sqlite(tmp_path / "data", splits)
  with sqlite3.connect(data_dir / "emnist_all.sqlite") as connection:
    rowid, client = connection.execute("SELECT rowid, client_id FROM examples WHERE split_name = "
                                       "'digits_only_train' ORDER BY rowid LIMIT 1 OFFSET 4").fetchone()
    blob = np.random.default_rng(3).integers(0, 256, 300, dtype=np.uint8).tobytes()
    connection.execute("UPDATE examples SET serialized_example_proto = ? WHERE rowid = ?", (blob, rowid))
  with pytest.raises(DatasetFormatError) as info:
    emnist_lib.load_emnist(data_dir=data_dir, cache_dir=tmp_path / "cache")
  message = str(info.value)
  for needed in (str(data_dir / "emnist_all.sqlite"), "'digits_only_train'", "row 4", f"client {client!r}"):
    assert needed in message, message
  assert not _files(tmp_path / "cache" / "arrays")


def test_random_blobs_only_ever_raise_dataset_format_errors():
  """200 random byte strings (fixed seed), alone and after a valid row: each decodes or raises the one error."""
  spec = {"pixels": FeatureSpec("float", (2,), np.float32), "label": FeatureSpec("int64", (), np.int32,
                                                                                  num_classes=10)}
  rng = np.random.default_rng(0)
  valid = encode_example({"pixels": np.array([0.5, 1.0], np.float32), "label": [3]})
  for trial in range(200):
    blob = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
    if trial % 2:  # a valid row's layout with random payload bytes
      blob = valid[:-6] + blob[:6].ljust(6, b"\x00")
    try:
      BatchDecoder(spec, where="f.sqlite").decode([valid, blob], first_row=0, clients=["a", "b"])
    except DatasetFormatError as error:
      assert "f.sqlite: row 1 (client 'b')" in str(error)


def test_hdf5_client_with_zero_examples_leaves_no_cache(splits, tmp_path):
  pytest.importorskip("h5py")
  clients = _legacy_clients(splits)
  clients["f0009_99"] = {"pixels": np.zeros((0, 28, 28), np.float32), "label": np.zeros(0, np.int32)}
  _hdf5(tmp_path / "data", clients, _legacy_clients(splits, "digits_only_test"))
  with pytest.raises(DatasetFormatError, match=r"fed_emnist_digitsonly_train.h5: client 'f0009_99' has no examples "
                                               r".*expected at least one example per client"):
    emnist_lib.load_emnist(data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")
  assert not _files(tmp_path / "cache" / "arrays")
  del clients["f0009_99"]  # the fixed file loads: nothing of the failed conversion stood in the way
  _hdf5(tmp_path / "data", clients, _legacy_clients(splits, "digits_only_test"))
  assert emnist_lib.load_emnist(data_dir=tmp_path / "data", cache_dir=tmp_path / "cache").train.num_clients == 3


@pytest.mark.parametrize("content, message", [
    ({"users": 5, "user_data": {}}, r"'users' is a int \(5\); expected a list of user ids"),
    ({"users": ["a", "b"], "num_samples": [1], "user_data": {"a": {"x": [[1.0]], "y": [0]}}},
     r"'num_samples' has 1 entries but 'users' has 2; expected one count per user"),
    ({"users": ["a"], "num_samples": ["1"], "user_data": {"a": {"x": [[1.0]], "y": [0]}}},
     r"'num_samples' gives user 'a' '1'; expected a non-negative integer"),
    ({"users": ["a"], "user_data": [1]}, r"'user_data' is a list; expected an object"),
    ({"users": [None], "user_data": {}}, r"'users' holds None \(NoneType\); expected string"),
    ({"users": ["a"], "user_data": {"a": {"x": 3, "y": [0]}}}, r"user 'a': 'x' is a int; expected a list"),
    ({"users": ["a"], "user_data": {"b": {"x": [[1.0]], "y": [0]}}}, r"user 'a' has no 'x'/'y' in user_data"),
])
def test_malformed_leaf_files(tmp_path, content, message):
  (tmp_path / "t.json").write_text(json.dumps(content))
  with pytest.raises(DatasetFormatError, match=rf"t.json(, | |: ){message}"):
    load_leaf(tmp_path / "t.json")


def test_leaf_integer_user_ids_find_their_data(tmp_path):
  """JSON object keys are strings: users [1, 2] keep their data under "1" and "2"."""
  (tmp_path / "t.json").write_text(json.dumps({"users": [1, 2], "num_samples": [1, 2], "user_data": {
      "1": {"x": [[1.0]], "y": [0]}, "2": {"x": [[2.0], [3.0]], "y": [1, 1]}}}))
  data = load_leaf(tmp_path / "t.json")
  assert data.client_ids == ("1", "2") and data["2"]["y"].tolist() == [1, 1]
