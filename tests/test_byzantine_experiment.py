"""``experiments/byzantine.py``: its fast mode end to end writes consistent results; bad flags exit 2."""

from __future__ import annotations

import csv
import importlib.util
import json
import pathlib

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "byzantine.py"


def load_script():
  spec = importlib.util.spec_from_file_location("byzantine", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("argv", [["--fraction", "0.5"], ["--rounds", "0"], ["--attacks", "poison"], ["--attack-seed", "-1"],
                                  ["--aggregators", "krum", "--fraction", "0.4", "--clients-per-round", "6"]])
def test_bad_flags_exit_2(argv, capsys):
  byzantine = load_script()
  with pytest.raises(SystemExit) as error:
    byzantine.parse_args(argv)
  assert error.value.code == 2
  assert "error:" in capsys.readouterr().err


def test_every_attack_and_aggregator_can_be_built():
  byzantine = load_script()
  args = byzantine.parse_args([])
  assert args.aggregators == list(byzantine.AGGREGATORS) and args.attacks == list(byzantine.ATTACKS)
  for name in byzantine.AGGREGATORS:
    assert byzantine.make_aggregator(name, args).init is not None
  for name in set(byzantine.ATTACKS) - {"none", "label-flip"}:
    assert byzantine.make_update_attack(name).apply is not None


@pytest.mark.slow
def test_fast_run_writes_consistent_results(tmp_path, capsys):
  byzantine = load_script()
  args = byzantine.parse_args(["--fast", "--output-dir", str(tmp_path)])
  assert args.seeds == [0] and args.rounds == 2
  summary = byzantine.run(args)

  rows = list(csv.DictReader((tmp_path / "results.csv").open()))
  assert [(row["aggregator"], row["attack"]) for row in rows] == [("krum", "label-flip"), ("krum", "alie")]
  for row, setting in zip(rows, summary["settings"]):
    assert float(row["final_test_accuracy"]) == setting["accuracy_mean"]
    assert 0.0 <= setting["accuracy_mean"] <= 1.0
  assert summary["num_byzantine_per_round"] == 2
  assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(summary))
  assert (tmp_path / "byzantine.png").stat().st_size > 1000
  assert "| krum | " in capsys.readouterr().out
