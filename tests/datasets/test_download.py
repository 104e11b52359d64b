"""The download path end to end: a generated .sqlite.lzma served on 127.0.0.1, sha256-checked, cached once."""

import contextlib
import functools
import hashlib
import http.server
import json
import lzma
import threading

import numpy as np
import pytest

from fedjax_lite.datasets import download as download_lib
from fedjax_lite.datasets import emnist as emnist_lib
from fedjax_lite.datasets.errors import DatasetFormatError, DatasetNotFoundError
from fedjax_lite.datasets.file_writers import write_tff_sqlite
from fedjax_lite.datasets.sources import RemoteFile
from tests.datasets.fake_files import emnist_splits, expected_federated


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
  requests = 0

  def do_GET(self):  # noqa: N802 - http.server's name
    type(self).requests += 1
    super().do_GET()

  def log_message(self, *args):
    pass


@contextlib.contextmanager
def _serve(directory):
  """An HTTP server on a free localhost port in a daemon thread, shut down on exit (bounded by timeouts)."""
  handler = functools.partial(_QuietHandler, directory=str(directory))
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  server.timeout = 5
  thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}"
  finally:
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  root = tmp_path_factory.mktemp("served")
  splits = emnist_splits()
  write_tff_sqlite(root / "emnist_all.sqlite", splits)
  compressed = lzma.compress((root / "emnist_all.sqlite").read_bytes())
  (root / "emnist_all.sqlite.lzma").write_bytes(compressed)
  (root / "emnist_all.sqlite").unlink()
  return root, splits, hashlib.sha256(compressed).hexdigest()


def test_download_checksum_extract_and_cache(served, tmp_path, monkeypatch):
  root, splits, digest = served
  monkeypatch.setenv(download_lib.ENV_VAR, str(tmp_path / "cache"))
  _QuietHandler.requests = 0
  with _serve(root) as url:
    monkeypatch.setattr(emnist_lib, "EMNIST_SQLITE", RemoteFile("emnist_all.sqlite.lzma",
                                                                f"{url}/emnist_all.sqlite.lzma", digest))
    data = emnist_lib.load_emnist(download=True)
    again = emnist_lib.load_emnist(download=True)
  assert _QuietHandler.requests == 1  # downloaded once, extracted once, converted once
  np.testing.assert_array_equal(data.train.examples["y"], expected_federated(splits["digits_only_train"], "label"))
  np.testing.assert_array_equal(again.test.examples["x"][..., 0],
                                expected_federated(splits["digits_only_test"], "pixels"))
  cache = tmp_path / "cache"
  assert (cache / "emnist_all.sqlite.lzma").is_file()
  assert len(list((cache / "unpacked").glob("*/emnist_all.sqlite"))) == 1
  assert not [p for p in cache.rglob("*") if p.name.startswith(".")]
  # The cache records the download's published sha256 as the source's identity.
  manifests = list((cache / "arrays" / "emnist_digits" / "train").glob("*/manifest.json"))
  assert len(manifests) == 1 and json.loads(manifests[0].read_text())["source"]["sha256"] == digest


def test_bad_checksum_writes_nothing(served, tmp_path, monkeypatch):
  root, _, _ = served
  with _serve(root) as url:
    monkeypatch.setattr(emnist_lib, "EMNIST_SQLITE", RemoteFile("emnist_all.sqlite.lzma",
                                                                f"{url}/emnist_all.sqlite.lzma", "0" * 64))
    with pytest.raises(DatasetFormatError, match="expected 0000"):
      emnist_lib.load_emnist(download=True, cache_dir=tmp_path)
  assert list(tmp_path.iterdir()) == []


def test_file_url_and_unreachable_url(served, tmp_path, monkeypatch):
  root, _, digest = served
  path = download_lib.download_file((root / "emnist_all.sqlite.lzma").as_uri(), tmp_path / "a.lzma", sha256=digest)
  assert download_lib.sha256_of(path) == digest
  monkeypatch.setattr(emnist_lib, "EMNIST_SQLITE", RemoteFile("emnist_all.sqlite.lzma",
                                                              "http://127.0.0.1:9/emnist_all.sqlite.lzma", None))
  with pytest.raises(DatasetNotFoundError, match="could not download .*emnist_all.sqlite.lzma"):
    emnist_lib.load_emnist(download=True, cache_dir=tmp_path / "c")
  assert not (tmp_path / "c" / "emnist_all.sqlite.lzma").exists()


def test_truncated_lzma_is_a_format_error(served, tmp_path):
  root, _, _ = served
  content = (root / "emnist_all.sqlite.lzma").read_bytes()
  (tmp_path / "emnist_all.sqlite.lzma").write_bytes(content[: len(content) // 2])
  with pytest.raises(DatasetFormatError, match="not a complete LZMA file"):
    emnist_lib.load_emnist(data_dir=tmp_path, cache_dir=tmp_path / "c")
  assert not [p for p in (tmp_path / "c").rglob("*") if p.is_file()]  # no partial copy, no cache


def test_download_argument_checks(tmp_path):
  with pytest.raises(ValueError, match="url"):
    download_lib.download_file("ftp://x/y", tmp_path / "y")
  with pytest.raises(ValueError, match="sha256"):
    download_lib.download_file("http://127.0.0.1/y", tmp_path / "y", sha256="abc")
  monkeypatch = pytest.MonkeyPatch()
  monkeypatch.delenv(download_lib.ENV_VAR, raising=False)
  assert str(download_lib.cache_root()).endswith(".cache/fedjax_lite")
  monkeypatch.undo()


def test_large_transfers_show_a_progress_bar_and_small_ones_do_not(served, tmp_path, monkeypatch, capsys):
  root, _, digest = served
  size = (root / "emnist_all.sqlite.lzma").stat().st_size
  with _serve(root) as url:
    download_lib.download_file(f"{url}/emnist_all.sqlite.lzma", tmp_path / "small.lzma", sha256=digest)
    assert capsys.readouterr().err == ""  # below PROGRESS_MIN_BYTES: quiet
    monkeypatch.setattr(download_lib, "PROGRESS_MIN_BYTES", 1)  # as if the file were large
    path = download_lib.download_file(f"{url}/emnist_all.sqlite.lzma", tmp_path / "large.lzma", sha256=digest)
  bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
  assert "downloading large.lzma" in bar and "100%" in bar, bar
  download_lib.decompress_lzma(path, tmp_path / "large.sqlite")
  bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
  assert "decompressing large.lzma" in bar and "100%" in bar, bar
  assert (tmp_path / "large.sqlite").stat().st_size > size
  download_lib.decompress_lzma(path, tmp_path / "quiet.sqlite", progress=False)
  assert capsys.readouterr().err == ""
  with pytest.raises(TypeError, match="progress"):
    download_lib.download_file(f"{url}/x", tmp_path / "x", progress="yes")
