"""load_emnist on generated files in the reference's formats: SQLite+Example, .lzma, legacy HDF5 (and .tar.bz2)."""

import lzma
import os
import tarfile

import numpy as np
import pytest

from fedjax_lite.datasets import emnist as emnist_lib
from fedjax_lite.datasets import sources
from fedjax_lite.datasets.errors import DatasetFormatError, DatasetNotFoundError
from fedjax_lite.datasets.file_writers import write_tff_hdf5, write_tff_sqlite
from tests.datasets.fake_files import EMNIST_SIZES, emnist_splits, expected_federated


@pytest.fixture(scope="module")
def splits():
  return emnist_splits()


@pytest.fixture(scope="module")
def sqlite_file(tmp_path_factory, splits):
  path = tmp_path_factory.mktemp("emnist_src") / "emnist_all.sqlite"
  write_tff_sqlite(path, splits)
  return path


def _check(data, splits, prefix, num_classes):
  assert data.num_classes == num_classes and data.input_shape == (28, 28, 1)
  for name, federated in (("train", data.train), ("test", data.test)):
    clients = splits[f"{prefix}_{name}"]
    assert federated.client_ids == tuple(sorted(EMNIST_SIZES))
    np.testing.assert_array_equal(federated.client_sizes, [EMNIST_SIZES[c] for c in sorted(EMNIST_SIZES)])
    np.testing.assert_array_equal(federated.examples["x"][..., 0], expected_federated(clients, "pixels"))
    np.testing.assert_array_equal(federated.examples["y"], expected_federated(clients, "label"))
    assert federated.examples["x"].dtype == np.float32 and federated.examples["y"].dtype == np.int32


@pytest.mark.parametrize("only_digits,prefix,num_classes", [(True, "digits_only", 10), (False, "all", 62)])
def test_sqlite_values_exact(sqlite_file, splits, tmp_path, only_digits, prefix, num_classes):
  data = emnist_lib.load_emnist(only_digits, data_dir=sqlite_file.parent, cache_dir=tmp_path)
  _check(data, splits, prefix, num_classes)


def test_cache_built_once_and_memory_mapped(sqlite_file, splits, tmp_path, monkeypatch):
  emnist_lib.load_emnist(data_dir=sqlite_file.parent, cache_dir=tmp_path)
  def no_parsing(*args, **kwargs):
    raise AssertionError("the second load parsed the SQLite file again")
  monkeypatch.setattr(sources, "convert_sql_split", no_parsing)
  data = emnist_lib.load_emnist(data_dir=sqlite_file.parent, cache_dir=tmp_path)
  _check(data, splits, "digits_only", 10)
  assert isinstance(data.train.examples["x"], np.memmap) and not data.train.examples["x"].flags.writeable


def test_changed_source_rebuilds_cache(sqlite_file, splits, tmp_path):
  source_dir = tmp_path / "src"
  source_dir.mkdir()
  copy = source_dir / "emnist_all.sqlite"
  copy.write_bytes(sqlite_file.read_bytes())
  emnist_lib.load_emnist(data_dir=source_dir, cache_dir=tmp_path / "cache")
  changed = dict(splits)
  changed["digits_only_train"] = {cid: {"pixels": c["pixels"] * 0, "label": c["label"]}
                                  for cid, c in splits["digits_only_train"].items()}
  copy.unlink()
  write_tff_sqlite(copy, changed)
  data = emnist_lib.load_emnist(data_dir=source_dir, cache_dir=tmp_path / "cache")
  assert not np.any(data.train.examples["x"])


def test_lzma_decompressed_once(sqlite_file, splits, tmp_path):
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  (data_dir / "emnist_all.sqlite.lzma").write_bytes(lzma.compress(sqlite_file.read_bytes()))
  cache = tmp_path / "cache"
  _check(emnist_lib.load_emnist(data_dir=data_dir, cache_dir=cache), splits, "digits_only", 10)
  assert len(list((cache / "unpacked").glob("*/emnist_all.sqlite"))) == 1  # beside no other archive's copy
  assert not any(p.name.startswith(".") for p in cache.rglob("*"))  # no temporary left


def test_legacy_hdf5_and_archive(splits, tmp_path):
  pytest.importorskip("h5py")
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  for name in ("train", "test"):
    clients = {cid: {"pixels": c["pixels"], "label": c["label"].astype(np.int32)}
               for cid, c in splits[f"digits_only_{name}"].items()}
    write_tff_hdf5(data_dir / f"fed_emnist_digitsonly_{name}.h5", clients)
  _check(emnist_lib.load_emnist(data_dir=data_dir, cache_dir=tmp_path / "c1"), splits, "digits_only", 10)
  archive_dir = tmp_path / "archive"
  archive_dir.mkdir()
  with tarfile.open(archive_dir / "fed_emnist_digitsonly.tar.bz2", "w:bz2") as tar:
    for name in ("train", "test"):
      tar.add(data_dir / f"fed_emnist_digitsonly_{name}.h5", arcname=f"datasets/fed_emnist_digitsonly_{name}.h5")
  _check(emnist_lib.load_emnist(data_dir=archive_dir, cache_dir=tmp_path / "c2"), splits, "digits_only", 10)


def test_missing_file_names_file_place_and_origin(tmp_path):
  with pytest.raises(DatasetNotFoundError) as info:
    emnist_lib.load_emnist(data_dir=tmp_path, cache_dir=tmp_path / "cache")
  message = str(info.value)
  for needed in ("emnist_all.sqlite.lzma", str(tmp_path), "https://storage.googleapis.com/tff-datasets-public/",
                 "download=True", "fed_emnist_digitsonly_train.h5"):
    assert needed in message
  assert isinstance(info.value, FileNotFoundError)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "bad_proto"])
def test_corrupt_file_clear_error_and_no_cache(sqlite_file, tmp_path, damage):
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  target = data_dir / "emnist_all.sqlite"
  content = sqlite_file.read_bytes()
  if damage == "truncate":
    target.write_bytes(content[:len(content) // 2])
  elif damage == "garbage":
    target.write_bytes(b"\x00" * 100 + content[100:])
  else:
    import sqlite3
    target.write_bytes(content)
    with sqlite3.connect(target) as connection:
      connection.execute("UPDATE examples SET serialized_example_proto = x'0aff' WHERE rowid = 2")
  cache = tmp_path / "cache"
  with pytest.raises(DatasetFormatError, match=str(target) if damage != "bad_proto" else "malformed"):
    emnist_lib.load_emnist(data_dir=data_dir, cache_dir=cache)
  arrays = cache / "arrays"
  leftovers = list(arrays.rglob("*")) if arrays.exists() else []
  assert not [p for p in leftovers if p.is_file()], leftovers


def test_wrong_feature_shape_is_a_format_error(tmp_path):
  clients = {"a": {"pixels": np.zeros((2, 27, 28), np.float32), "label": np.zeros(2, np.int64)}}
  write_tff_sqlite(tmp_path / "emnist_all.sqlite", {"digits_only_train": clients, "digits_only_test": clients})
  with pytest.raises(DatasetFormatError, match="756 values for feature 'pixels'"):
    emnist_lib.load_emnist(data_dir=tmp_path, cache_dir=tmp_path / "cache")


def test_argument_checks(tmp_path):
  with pytest.raises(TypeError, match="only_digits"):
    emnist_lib.load_emnist(1, data_dir=tmp_path)
  with pytest.raises(TypeError, match="download"):
    emnist_lib.load_emnist(data_dir=tmp_path, download="yes")
  with pytest.raises(TypeError, match="data_dir"):
    emnist_lib.load_emnist(data_dir=3)
  with pytest.raises(DatasetNotFoundError, match="not a folder"):
    emnist_lib.load_emnist(data_dir=tmp_path / "nope", cache_dir=tmp_path)


@pytest.mark.parametrize("change", ["drop_metadata", "delete_rows", "extra_rows", "unknown_client"])
def test_client_metadata_paths(sqlite_file, splits, tmp_path, change):
  import sqlite3
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  target = data_dir / "emnist_all.sqlite"
  target.write_bytes(sqlite_file.read_bytes())
  with sqlite3.connect(target) as connection:
    if change == "drop_metadata":  # no table: two passes, same result
      connection.execute("DROP TABLE client_metadata")
    elif change == "delete_rows":  # a truncated split: fewer rows than the table says
      connection.execute("DELETE FROM examples WHERE rowid IN (SELECT rowid FROM examples "
                         "WHERE split_name = 'digits_only_train' LIMIT 2)")
    elif change == "extra_rows":
      connection.execute("INSERT INTO examples SELECT * FROM examples WHERE split_name = 'digits_only_train' LIMIT 1")
    else:
      connection.execute("UPDATE examples SET client_id = 'zz' WHERE rowid = 1")
  if change == "drop_metadata":
    _check(emnist_lib.load_emnist(data_dir=data_dir, cache_dir=tmp_path / "c"), splits, "digits_only", 10)
    with sqlite3.connect(target) as connection:
      connection.execute("DELETE FROM examples WHERE split_name = 'digits_only_test'")
    with pytest.raises(DatasetFormatError, match="no examples in split 'digits_only_test'"):
      emnist_lib.load_emnist(data_dir=data_dir, cache_dir=tmp_path / "c2")
  else:
    with pytest.raises(DatasetFormatError, match="disagree with its client_metadata"):
      emnist_lib.load_emnist(data_dir=data_dir, cache_dir=tmp_path / "c")
    assert not [p for p in (tmp_path / "c").rglob("*") if p.is_file()]


def test_truncated_hdf5_clear_error_and_no_cache(splits, tmp_path):
  pytest.importorskip("h5py")
  source = tmp_path / "full.h5"
  clients = {cid: {"pixels": c["pixels"], "label": c["label"].astype(np.int32)}
             for cid, c in splits["digits_only_train"].items()}
  write_tff_hdf5(source, clients)
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  content = source.read_bytes()
  (data_dir / "fed_emnist_digitsonly_train.h5").write_bytes(content[: len(content) // 2])
  with pytest.raises(DatasetFormatError, match="fed_emnist_digitsonly_train.h5 is not a readable HDF5 file"):
    emnist_lib.load_emnist(data_dir=data_dir, cache_dir=tmp_path / "c")
  assert not [p for p in (tmp_path / "c").rglob("*") if p.is_file()]
