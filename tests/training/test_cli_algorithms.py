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


@pytest.mark.parametrize("algorithm, knobs", [
    ("fednova", ["--client-momentum", "0.5"]),
    ("qffl", ["--qffl-q", "2", "--qffl-lipschitz", "20"]),
])
def test_fednova_and_qffl_train_from_the_command_line(algorithm, knobs, tmp_path, capsys):
  code = cli.main(TINY + ["--algorithm", algorithm, "--output-dir", str(tmp_path)] + knobs)
  assert code == 0, capsys.readouterr().err
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["algorithm"] == algorithm and summary["rounds"] == 2
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  measurement = {"fednova": "finalizer/tau_eff", "qffl": "finalizer/mean_h"}[algorithm]
  assert all(record[measurement] > 0 for record in records)


def test_systems_flags_run_rounds_on_the_simulated_clock(tmp_path, capsys):
  code = cli.main(TINY + ["--algorithm", "fednova", "--output-dir", str(tmp_path), "--systems", "lognormal",
                          "--dropout", "0.2", "--over-selection", "1.5", "--deadline", "0.5", "--partial-work"])
  assert code == 0, capsys.readouterr().err
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert all(record["systems/num_selected"] == 5 for record in records)  # ceil(1.5 x 3)
  assert all(record["systems/num_counted"] <= 3 for record in records)
  assert summary["simulated_hours"] == records[-1]["systems/elapsed_hours"] > 0


def test_a_systems_trace_file(tmp_path, capsys):
  trace = tmp_path / "trace.csv"
  rows = [f"client_{i},0.01,5000000,,0-1e9" for i in range(6)]
  trace.write_text("client_id,seconds_per_example,download_bits_per_second,upload_bits_per_second,availability\n"
                   + "\n".join(rows) + "\n")
  code = cli.main(TINY + ["--output-dir", str(tmp_path / "run"), "--systems", str(trace)])
  assert code == 0, capsys.readouterr().err
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["simulated_hours"] > 0


@pytest.mark.parametrize("flags, named", [
    (["--algorithm", "fedavg", "--client-momentum", "0.5"], "--client-momentum applies only with --algorithm fednova"),
    (["--algorithm", "fednova", "--qffl-q", "2"], "--qffl-q applies only with --algorithm qffl"),
    (["--algorithm", "fedavg", "--qffl-lipschitz", "2"], "--qffl-lipschitz applies only"),
    (["--algorithm", "qffl", "--weighting", "uniform"], "--weighting applies only"),
    (["--algorithm", "qffl", "--aggregator", "median"], "--aggregator mean"),
    (["--dropout", "0.1"], "--dropout applies only with --systems lognormal or constant"),
    (["--deadline", "10"], "--deadline applies only with --systems"),
    (["--over-selection", "1.3"], "--over-selection applies only with --systems"),
    (["--systems", "lognormal", "--partial-work"], "--partial-work applies only with --systems and --deadline"),
    (["--systems", "lognormal", "--rounds-per-dispatch", "2"], "--rounds-per-dispatch"),
    (["--systems", "nowhere.csv"], "--systems"),
    (["--systems", "lognormal", "--over-selection", "0.5"], "--over-selection"),
    (["--systems", "lognormal", "--dropout", "1"], "--dropout"),
])
def test_systems_and_new_algorithm_flags_that_do_not_apply_are_refused(flags, named, tmp_path, capsys):
  code = cli.main(TINY + ["--output-dir", str(tmp_path)] + flags)
  assert code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and named in err[0], err


def test_new_flags_join_the_run_configuration_only_when_set():
  """Runs checkpointed before --systems, FedNova and q-FFL existed still resume: at their defaults these flags are
  not in the configuration compared on resume; set, they are."""
  parser = cli.build_parser()
  plain = cli._run_config(parser.parse_args(["train"]))
  assert not {"--systems", "--dropout", "--over-selection", "--deadline", "--partial-work", "--client-momentum",
              "--qffl-q", "--qffl-lipschitz"} & set(plain)
  assert "--model" in plain
  config = cli._run_config(parser.parse_args(["train", "--systems", "lognormal", "--deadline", "5",
                                              "--algorithm", "fednova", "--client-momentum", "0.5"]))
  assert config["--systems"] == "lognormal" and config["--deadline"] == 5.0 and config["--client-momentum"] == 0.5
