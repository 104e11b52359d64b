"""``fedjax-lite train --algorithm ...``: every algorithm runs from the command line with its knobs; knobs of other
algorithms are refused with one line and exit code 2."""

from __future__ import annotations

import json

import pytest

from fedjax_lite.training import cli

TINY = ["train", "--dataset", "synthetic", "--num-clients", "6", "--model", "dense", "--rounds", "2",
        "--clients-per-round", "3", "--local-epochs", "1", "--eval-every", "2", "--no-progress", "--json",
        "--log-format", "jsonl"]


@pytest.mark.parametrize("algorithm, knobs", [
    ("fedprox", ["--proximal-strength", "0.5"]),
    ("scaffold", []),
    ("mimelite", ["--base-momentum", "0.5"]),
    ("mime", []),
    ("fedadam", ["--adaptivity", "0.01"]),
    ("fedyogi", []),
    ("fedadagrad", []),
    ("fedavgm", ["--server-momentum", "0.8"]),
])
def test_every_algorithm_trains_from_the_command_line(algorithm, knobs, tmp_path, capsys):
  code = cli.main(TINY + ["--algorithm", algorithm, "--output-dir", str(tmp_path)] + knobs)
  assert code == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["algorithm"] == algorithm and summary["rounds"] == 2
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert all(record["client_work/train/num_examples"] > 0 for record in records)


@pytest.mark.parametrize("flags, named", [
    (["--algorithm", "fedavg", "--proximal-strength", "0.1"], "--proximal-strength"),
    (["--algorithm", "fedprox", "--server-momentum", "0.5"], "--server-momentum"),
    (["--algorithm", "fedadam", "--server-optimizer", "adam"], "--server-optimizer"),
    (["--algorithm", "scaffold", "--base-momentum", "0.5"], "--base-momentum"),
    (["--algorithm", "fedsgd", "--client-lr", "0.1"], "--client-lr"),
    (["--algorithm", "scaffold", "--aggregator", "dp"], "--aggregator dp"),
])
def test_knobs_of_other_algorithms_are_refused(flags, named, tmp_path, capsys):
  code = cli.main(TINY + ["--output-dir", str(tmp_path)] + flags)
  assert code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and named in err[0]


@pytest.mark.parametrize("aggregator", ["krum", "multi-krum"])
def test_krum_aggregators_from_the_command_line(aggregator, tmp_path, capsys):
  code = cli.main(TINY + ["--aggregator", aggregator, "--num-byzantine", "0", "--output-dir", str(tmp_path)])
  assert code == 0, capsys.readouterr().err
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["aggregator"] == aggregator


def test_krum_needs_enough_clients(tmp_path, capsys):
  code = cli.main(TINY + ["--aggregator", "krum", "--num-byzantine", "1", "--output-dir", str(tmp_path)])
  assert code == 2
  assert "needs --clients-per-round > 4" in capsys.readouterr().err
