"""The CLI's file-backed datasets: a missing file is one line on stderr and exit code 2, naming flags (``--download``,
``--data-dir``) where the library names Python arguments; ``--download`` fetches; a generated EMNIST runs."""

import importlib.metadata
import importlib.util
import json
import re

import pytest

from fedjax_lite.datasets.file_writers import write_tff_sqlite
from fedjax_lite.training.cli import main
from tests.datasets.fake_files import emnist_splits


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("FEDJAX_LITE_DATA", str(tmp_path / "cache"))


def _one_error_line(capsys):
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("fedjax-lite: error: "), err
  return err


def test_missing_dataset_file_is_one_line_exit_2(tmp_path, capsys):
  assert main(["train", "--dataset", "emnist", "--data-dir", str(tmp_path)]) == 2
  err = _one_error_line(capsys)
  assert "emnist_all.sqlite.lzma" in err and str(tmp_path) in err and "https://" in err


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "emnist2"], "invalid choice"),
    (["--dataset", "tfds:"], "invalid choice"),
    (["--data-dir", "x"], "--data-dir applies only with"),
    (["--dataset", "cifar100", "--num-clients", "5"], "--num-clients applies only with"),
])
def test_bad_dataset_flags(argv, message, capsys):
  assert main(["train", *argv]) == 2
  assert message in _one_error_line(capsys)


def test_text_dataset_needs_sequence_model(tmp_path, capsys):
  snippets = {"A": {"snippets": [b"hello there"]}, "B": {"snippets": [b"o!"]}}
  write_tff_sqlite(tmp_path / "shakespeare.sqlite", {"train": snippets, "test": snippets})
  assert main(["train", "--dataset", "shakespeare", "--data-dir", str(tmp_path), "--clients-per-round", "2"]) == 2
  assert "--dataset shakespeare needs --model lstm" in _one_error_line(capsys)


def test_emnist_from_generated_sqlite_trains(tmp_path, capsys):
  write_tff_sqlite(tmp_path / "emnist_all.sqlite", emnist_splits())
  code = main(["train", "--dataset", "emnist", "--data-dir", str(tmp_path), "--model", "dense", "--rounds", "1",
               "--clients-per-round", "2", "--batch-size", "4", "--output-dir", str(tmp_path / "run"), "--json"])
  assert code == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["dataset"] == "emnist" and summary["rounds"] == 1


def test_shakespeare_lstm_reports_token_accuracy(tmp_path, capsys):
  """Regression: the sequence models report token ratios as two sums, and the summary's accuracy was null."""
  snippets = {"A": {"snippets": [b"to be or not"]}, "B": {"snippets": [b"all the world"]}}
  write_tff_sqlite(tmp_path / "shakespeare.sqlite", {"train": snippets, "test": snippets})
  code = main(["train", "--dataset", "shakespeare", "--data-dir", str(tmp_path), "--model", "lstm", "--rounds", "1",
               "--clients-per-round", "2", "--local-epochs", "1", "--batch-size", "2", "--output-dir",
               str(tmp_path / "run"), "--json", "--quiet", "--log-format", "jsonl"])
  assert code == 0, capsys.readouterr().err
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert 0.0 <= summary["final_test_accuracy"] <= 1.0


# Python-argument syntax that a command-line user cannot act on.
_PYTHON_ARGUMENTS = re.compile(r"(?<![\w-])(download|data_dir|vocabulary|cache_dir)\s*=|=True\b|(?<![\w-])data_dir\b")


def _library_messages(tmp_path) -> dict[str, str]:
  """The dataset loaders' own messages (Python context) for the faults a newcomer meets first."""
  from fedjax_lite import datasets

  empty = tmp_path / "empty"
  empty.mkdir()
  calls = {
      "emnist not on disk": lambda: datasets.load_emnist(data_dir=empty, cache_dir=tmp_path / "cache"),
      "data dir not a folder": lambda: datasets.load_emnist(data_dir=tmp_path / "missing"),
      "stackoverflow vocabulary": lambda: datasets.load_stackoverflow_vocabulary(data_dir=empty,
                                                                              cache_dir=tmp_path / "cache"),
  }
  if importlib.util.find_spec("tensorflow_datasets") is not None:
    calls["tfds not prepared"] = lambda: datasets.from_tfds("mnist", split="train", data_dir=empty)
  messages = {}
  for name, call in calls.items():
    with pytest.raises(datasets.DatasetNotFoundError) as raised:
      call()
    messages[name] = str(raised.value)
  return messages


def test_library_messages_name_python_arguments_and_the_cli_restates_them_as_flags(tmp_path):
  """Regression: `fedjax-lite train --dataset emnist` said "pass download=True", a Python argument."""
  from fedjax_lite.training.cli import dataset_message

  for name, message in _library_messages(tmp_path).items():
    restated = dataset_message(message)
    assert not _PYTHON_ARGUMENTS.search(restated), (name, restated)
    if "download=True" in message:
      assert "--download" not in message, (name, message)  # Python context: no flags
      assert "add --download" in restated, (name, restated)
    if name == "data dir not a folder":
      assert restated.startswith("--data-dir "), restated
    if name == "tfds not prepared":  # the tfds command's own --data_dir flag is kept
      assert f"--data_dir {tmp_path / 'empty'} --file_format=array_record" in restated


def test_missing_emnist_says_add_download(tmp_path, capsys):
  assert main(["train", "--dataset", "emnist", "--data-dir", str(tmp_path)]) == 2
  err = _one_error_line(capsys)
  assert "or add --download to fetch it" in err and not _PYTHON_ARGUMENTS.search(err), err


def test_download_flag_fetches_the_file_and_trains(tmp_path, capsys, monkeypatch):
  import lzma

  from fedjax_lite.datasets import download as download_lib
  from fedjax_lite.datasets import emnist as emnist_lib
  from fedjax_lite.datasets.sources import RemoteFile

  served = tmp_path / "served"
  served.mkdir()
  write_tff_sqlite(served / "emnist_all.sqlite", emnist_splits())
  (served / "emnist_all.sqlite.lzma").write_bytes(lzma.compress((served / "emnist_all.sqlite").read_bytes()))
  remote = (served / "emnist_all.sqlite.lzma").as_uri()
  digest = download_lib.sha256_of(served / "emnist_all.sqlite.lzma")
  monkeypatch.setattr(emnist_lib, "EMNIST_SQLITE", RemoteFile("emnist_all.sqlite.lzma", remote, digest))
  argv = ["train", "--dataset", "emnist", "--model", "dense", "--rounds", "1", "--clients-per-round", "2",
          "--batch-size", "4", "--output-dir", str(tmp_path / "run"), "--json", "--quiet"]
  assert main(argv) == 2  # not on disk: the message names --download
  assert "--download" in _one_error_line(capsys)
  assert main(argv + ["--download"]) == 0
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["dataset"] == "emnist"
  assert (tmp_path / "cache" / "emnist_all.sqlite.lzma").is_file()


def test_download_applies_only_to_datasets_read_from_files(capsys):
  assert main(["train", "--download"]) == 2
  assert "--download applies only with --dataset emnist" in _one_error_line(capsys)


def test_version_flag(capsys):
  import fedjax_lite

  assert main(["--version"]) == 0
  out = capsys.readouterr().out.strip()
  assert re.fullmatch(r"fedjax-lite \S+ \(jax \S+, jaxlib \S+, Python \S+\)", out), out
  assert out.startswith(f"fedjax-lite {fedjax_lite.__version__} (jax {importlib.metadata.version('jax')},")
