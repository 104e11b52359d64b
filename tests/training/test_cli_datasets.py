"""The CLI's file-backed datasets: a missing file is one line on stderr and exit code 2; a generated EMNIST runs."""

import json

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
