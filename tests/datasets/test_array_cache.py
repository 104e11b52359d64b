"""The converted-array cache: atomic build, memory-mapped read back, incomplete caches ignored."""

import json

import numpy as np
import pytest

from fedjax_lite.datasets.array_cache import RaggedBytes, SplitWriter, open_split


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


def test_incomplete_or_foreign_cache_is_ignored(tmp_path):
  assert open_split(tmp_path / "absent") is None
  _write(tmp_path / "split")
  (tmp_path / "split" / "text.offsets.npy").unlink()
  assert open_split(tmp_path / "split") is None
  _write(tmp_path / "other")
  manifest = json.loads((tmp_path / "other" / "manifest.json").read_text())
  manifest["format_version"] = -1
  (tmp_path / "other" / "manifest.json").write_text(json.dumps(manifest))
  assert open_split(tmp_path / "other") is None
