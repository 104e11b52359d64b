"""The EMNIST presets parse as CLI flags, carry the papers' settings, and explain missing data (exit 2)."""

import importlib.util
import pathlib

import pytest

from fedjax_lite.training.cli import build_parser

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "configs" / "emnist_cnn_fedavg.py"


def _presets():
  spec = importlib.util.spec_from_file_location("emnist_cnn_fedavg", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_presets_parse_with_the_papers_settings():
  presets = _presets()
  parser = build_parser()
  for name in presets.PRESETS:
    args = parser.parse_args(presets.preset_argv(name))
    assert (args.dataset, args.model, args.clients_per_round, args.batch_size, args.local_epochs, args.rounds) == (
        "emnist", "cnn-dropout", 10, 20, 1, 1500)
  adam = parser.parse_args(presets.preset_argv("reddi-emnist-cr-fedadam"))
  assert adam.server_optimizer == "adam" and adam.client_lr == pytest.approx(10 ** -1.5, rel=1e-15)
  assert adam.server_lr == pytest.approx(10 ** -2.5, rel=1e-15) and adam.seed == 1
  assert parser.parse_args(presets.preset_argv("reddi-emnist-cr-fedavg", ["--rounds", "3"])).rounds == 3


def test_missing_data_and_bad_preset_exit_2(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("FEDJAX_LITE_DATA", str(tmp_path))
  presets = _presets()
  assert presets.main(["fedjax-emnist-conv", "--data-dir", str(tmp_path)]) == 2
  assert "emnist_all.sqlite.lzma" in capsys.readouterr().err
  assert presets.main(["nope"]) == 2
