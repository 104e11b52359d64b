"""The converted-array cache: atomic build, memory-mapped read back, damage (missing, truncated, flipped bytes) caught."""

import json

import numpy as np
import pytest

from fedjax_lite.datasets import array_cache
from fedjax_lite.datasets.array_cache import CacheDamagedError, RaggedBytes, SplitWriter, open_split
from fedjax_lite.datasets.errors import DatasetFormatError


def _write(directory, fail=False):
  with SplitWriter(directory, client_ids=("a", "b"), client_offsets=np.array([0, 1, 3]),
                   source={"name": "x.sqlite", "size": 1, "mtime_ns": 2}) as writer:
    writer.allocate("pixels", (2, 2), np.float32)[:] = np.arange(12, dtype=np.float32).reshape(3, 2, 2)
    if fail:
      raise RuntimeError("interrupted")
    writer.put_ragged("text", RaggedBytes.from_list([b"ab", b"", b"cde"]))


def test_round_trip_memory_mapped(tmp_path):
  _write(tmp_path / "split")
  split, manifest = open_split(tmp_path / "split")
  assert split.client_ids == ("a", "b") and split.num_examples == 3
  assert isinstance(split.arrays["pixels"], np.memmap) and not split.arrays["pixels"].flags.writeable
  np.testing.assert_array_equal(split.arrays["pixels"].reshape(3, -1), np.arange(12).reshape(3, 4))
  assert [split.ragged["text"][i] for i in range(3)] == [b"ab", b"", b"cde"]
  assert manifest["source"]["name"] == "x.sqlite"
  assert RaggedBytes.from_list([b"ab", b"", b"cde"]).take(np.array([2, 0])).values.tobytes() == b"cdeab"


def test_failure_leaves_nothing_and_keeps_old_cache(tmp_path):
  with pytest.raises(RuntimeError, match="interrupted"):
    _write(tmp_path / "split", fail=True)
  assert list(tmp_path.iterdir()) == []
  _write(tmp_path / "split")
  with pytest.raises(RuntimeError):
    _write(tmp_path / "split", fail=True)
  assert [p.name for p in tmp_path.iterdir()] == ["split"] and open_split(tmp_path / "split") is not None
  _write(tmp_path / "split")  # replacing a complete cache
  assert [p.name for p in tmp_path.iterdir()] == ["split"]


def _flip_byte(path, offset):
  content = bytearray(path.read_bytes())
  content[offset] ^= 0x40
  path.write_bytes(bytes(content))


def _damage(directory, how):
  if how == "missing_file":
    (directory / "text.offsets.npy").unlink()
  elif how == "truncated":
    content = (directory / "pixels.npy").read_bytes()
    (directory / "pixels.npy").write_bytes(content[:-4])
  elif how == "flipped_data_byte":  # the last value: a byte of the data, not of the .npy header
    _flip_byte(directory / "pixels.npy", -1)
  elif how == "flipped_manifest_digit":
    manifest = (directory / "manifest.json").read_text()
    (directory / "manifest.json").write_text(manifest.replace('"num_examples": 3', '"num_examples": 2'))
  elif how == "manifest_garbage":
    (directory / "manifest.json").write_bytes(b"\x00" * 20)
  elif how == "no_manifest":
    (directory / "manifest.json").unlink()
  else:  # another format version
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["format_version"] = -1
    (directory / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("how, detail", [
    ("missing_file", "text.offsets.npy is missing"),
    ("truncated", "pixels.npy has 172 bytes, expected 176"),
    ("flipped_data_byte", "pixels.npy fails its CRC-32 at bytes 0..176"),
    ("flipped_manifest_digit", "manifest.json fails its CRC-32"),
    ("manifest_garbage", "manifest.json is unreadable"),
    ("no_manifest", "manifest.json is missing"),
    ("foreign_version", "format version -1"),
])
def test_damaged_cache_is_reported_never_read(tmp_path, how, detail):
  assert open_split(tmp_path / "absent") is None
  _write(tmp_path / "split")
  _damage(tmp_path / "split", how)
  with pytest.raises(CacheDamagedError, match=detail) as info:
    open_split(tmp_path / "split")
  assert isinstance(info.value, DatasetFormatError) and str(tmp_path / "split") in str(info.value)


def test_every_block_is_checked_in_parallel(tmp_path, monkeypatch):
  """With 16-byte blocks the pixels file has 11 blocks (checked by the thread pool); a flip in any one is caught
  and named by its byte range."""
  monkeypatch.setattr(array_cache, "BLOCK_SIZE", 16)
  _write(tmp_path / "split")
  manifest = json.loads((tmp_path / "split" / "manifest.json").read_text())
  assert manifest["block_size"] == 16 and len(manifest["files"]["pixels.npy"]["crc32"]) == 11
  assert open_split(tmp_path / "split") is not None
  _flip_byte(tmp_path / "split" / "pixels.npy", 150)
  with pytest.raises(CacheDamagedError, match="pixels.npy fails its CRC-32 at bytes 144..160"):
    open_split(tmp_path / "split")
