"""The ``fedjax-lite`` command line: a short real run writes its files; bad flags give one line and exit 2."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys

import numpy as np
import pytest

from fedjax_lite.training import cli


def test_train_writes_metrics_plot_and_summary(tmp_path, capsys):
  out = tmp_path / "run"
  code = cli.main(["train", "--model", "mlp", "--rounds", "3", "--eval-every", "1", "--output-dir", str(out),
                   "--json", "--no-progress"])
  assert code == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["rounds"] == 3
  assert 0.0 <= summary["final_test_accuracy"] <= 1.0
  assert summary["seconds"] > 0
  records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  assert [r["round"] for r in records] == [0, 1, 2]
  assert all("client_work/train/loss" in r and "evaluation/accuracy" in r for r in records)
  assert (out / "training.png").stat().st_size > 1000
  assert json.loads((out / "summary.json").read_text())["final_test_accuracy"] == summary["final_test_accuracy"]


def test_fedsgd_on_synthetic_runs(tmp_path, capsys):
  code = cli.main(["train", "--dataset", "synthetic", "--num-clients", "12", "--model", "dense", "--algorithm",
                   "fedsgd", "--rounds", "2", "--clients-per-round", "4", "--output-dir", str(tmp_path),
                   "--no-progress"])
  assert code == 0
  line = capsys.readouterr().out.strip().splitlines()[-1]
  assert line.startswith("fedsgd dense on synthetic: 2 rounds")


def test_synthetic_tests_on_each_clients_held_out_examples(tmp_path, capsys):
  """Regression: the synthetic test set was one held-out client, whose own teacher labels its examples, so the
  trained model scored 0.0 on it. Now 20% of every client's examples are pooled into the test set (LEAF's split)."""
  from fedjax_lite.datasets import synthetic_leaf
  from fedjax_lite.training.cli import _split_each_client

  population = synthetic_leaf(num_clients=6, seed=3)
  train, test = _split_each_client(population, 0.2, seed=3)
  assert train.client_ids == population.client_ids
  sizes = population.client_sizes
  expected_test = np.clip(np.round(0.2 * sizes), 1, sizes - 1).astype(int)
  np.testing.assert_array_equal(train.client_sizes, sizes - expected_test)
  assert len(test["y"]) == expected_test.sum()
  # Every example lands on exactly one side.
  everything = np.concatenate([train.all_examples()["x"], test["x"]])
  np.testing.assert_array_equal(np.sort(everything, axis=0), np.sort(population.all_examples()["x"], axis=0))

  code = cli.main(["train", "--dataset", "synthetic", "--model", "dense", "--rounds", "10", "--output-dir",
                   str(tmp_path), "--no-progress", "--json", "--eval-every", "10"])
  assert code == 0
  summary = json.loads((tmp_path / "summary.json").read_text())
  # The global model after ten rounds on ten classes: measured 0.43 (the held-out client gave 0.0). Each client's
  # local steps adapt to its own teacher, so the global model trails the training metrics (~0.9).
  assert summary["final_test_accuracy"] > 0.3, summary["final_test_accuracy"]


@pytest.mark.parametrize("aggregator", ["robust", "dp", "compression", "secure", "median", "trimmed-mean"])
def test_every_aggregator_runs_and_its_measurements_are_recorded(aggregator, tmp_path, capsys):
  code = cli.main(["train", "--model", "dense", "--rounds", "2", "--aggregator", aggregator, "--output-dir",
                   str(tmp_path), "--json", "--no-progress", "--eval-every", "2"])
  assert code == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["aggregator"] == aggregator
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert all(r["aggregated_bits"] > 0 and r["broadcasted_bits"] > 0 for r in records)
  if aggregator == "dp":  # DP-FedAvg: Poisson sampling, adaptive clip, epsilon per round
    assert all(r["privacy/epsilon"] > 0 for r in records) and summary["epsilon"] == records[-1]["privacy/epsilon"]
    assert records[0]["aggregator/dp_query_metrics/clip"] > 0
  if aggregator in ("robust", "compression", "secure"):
    assert "aggregator/zeroing_norm" in records[0] and records[0]["aggregator/zeroing_norm"] == 21.0
  if aggregator == "compression":
    # The digits dense model (650 float32 parameters) is below the 20,000-element threshold, so nothing is
    # quantized: per client 650 * 32 value bits + a 32-bit weight + 2 x (two 32-bit quantile records + a 32-bit
    # count) for zeroing and clipping.
    assert records[0]["aggregated_bits"] == 10 * (650 * 32 + 32 + 2 * 96)
  assert (tmp_path / "training.png").exists()


def test_dp_flags_print_epsilon_per_round_and_at_the_end(tmp_path, capsys):
  code = cli.main(["train", "--model", "dense", "--rounds", "3", "--aggregator", "dp", "--dp-noise-multiplier",
                   "0.9", "--dp-delta", "1e-4", "--dp-accountant", "pld", "--output-dir", str(tmp_path),
                   "--no-progress"])
  assert code == 0
  captured = capsys.readouterr()
  per_round = [line for line in captured.err.splitlines() if line.startswith("round ")]
  assert len(per_round) == 3 and all("at delta 0.0001" in line for line in per_round)
  assert "epsilon" in captured.out.strip().splitlines()[-1]


def test_dp_budget_stops_training_and_says_so(tmp_path, capsys):
  code = cli.main(["train", "--model", "dense", "--rounds", "50", "--aggregator", "dp", "--dp-noise-multiplier",
                   "0.9", "--dp-epsilon-budget", "3", "--output-dir", str(tmp_path), "--no-progress", "--json"])
  assert code == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["rounds"] == 3 and summary["epsilon"] <= 3  # 2.08, 2.58, 2.96, then 3.27 > 3
  assert summary["stopped_early"].startswith("privacy budget")
  assert summary["final_test_accuracy"] is not None


@pytest.mark.parametrize("argv, fragment", [
    (["train", "--rounds", "0"], "--rounds"),
    (["train", "--batch-size", "-3"], "--batch-size"),
    (["train", "--client-lr", "nan"], "--client-lr"),
    (["train", "--client-lr", "inf"], "--client-lr"),
    (["train", "--server-lr", "0"], "--server-lr"),
    (["train", "--model", "resnet"], "--model"),
    (["train", "--dataset", "mnist"], "--dataset"),
    (["train", "--clients-per-round", "500"], "--clients-per-round"),
    (["train", "--dataset", "synthetic", "--model", "cnn"], "--model"),
    (["train", "--frobnicate"], "unrecognized"),
    (["train", "--aggregator", "bulyan"], "--aggregator"),
    (["train", "--quantization-bits", "17"], "--quantization-bits"),
    (["train", "--trim-fraction", "0.5"], "--trim-fraction"),
    (["train", "--aggregator", "dp", "--dp-noise-multiplier", "3"], "--dp-noise-multiplier"),
    (["train", "--aggregator", "dp", "--dp-delta", "1.5"], "--dp-delta"),
    (["train", "--aggregator", "dp", "--dp-noise-multiplier", "0"], "--dp-noise-multiplier"),
    (["train", "--aggregator", "dp", "--dp-epsilon-budget", "0.01"], "exceeded by the very first round"),
    ([], "command"),
])
def test_bad_flags_one_line_exit_2(argv, fragment, capsys):
  assert cli.main(argv) == 2
  captured = capsys.readouterr()
  lines = captured.err.strip().splitlines()
  assert len(lines) == 1, captured.err
  assert lines[0].startswith("fedjax-lite: error:")
  assert fragment in lines[0]
  assert "Traceback" not in captured.err


def test_console_script_bad_flag_has_no_traceback():
  completed = subprocess.run([sys.executable, "-m", "fedjax_lite.training.cli", "train", "--rounds", "-1"],
                             capture_output=True, text=True, timeout=120, env=dict(os.environ))
  assert completed.returncode == 2
  assert completed.stderr.count("\n") == 1 and "Traceback" not in completed.stderr


@pytest.mark.parametrize("argv, fragment", [
    (["train", "--trim-fraction", "0.2"], "--trim-fraction applies only with --aggregator trimmed-mean"),
    (["train", "--aggregator", "mean", "--trim-fraction", "0.1"], "--trim-fraction applies only"),  # a default too
    (["train", "--quantization-bits", "4"], "--quantization-bits applies only with --aggregator compression"),
    (["train", "--dp-noise-multiplier", "1"], "--dp-noise-multiplier applies only with --aggregator dp"),
    (["train", "--aggregator", "robust", "--dp-delta", "1e-5"], "--dp-delta applies only with --aggregator dp"),
    (["train", "--algorithm", "fedsgd", "--local-epochs", "3"], "--local-epochs applies only"),
    (["train", "--algorithm", "fedsgd", "--client-lr", "0.3"], "--client-lr applies only"),
    (["train", "--aggregator", "dp", "--weighting", "uniform"], "--weighting applies only"),
    (["train", "--aggregator", "dp", "--broadcast-quantization-bits", "8"], "--broadcast-quantization-bits"),
    (["train", "--dirichlet-alpha", "0.3"], "--dirichlet-alpha applies only with --dataset digits --partition "
                                            "dirichlet"),
    (["train", "--dataset", "emnist", "--test-fraction", "0.3"], "--test-fraction"),
    (["train", "--resume"], "--resume applies only with --checkpoint-dir"),
    (["train", "--checkpoint-every", "3"], "--checkpoint-every applies only with --checkpoint-dir"),
    (["train", "--chunk-size", "4"], "--chunk-size applies only with --runner chunked"),
    (["train", "--runner", "vmap", "--chunk-size", "4"], "--chunk-size applies only with --runner chunked"),
])
def test_flags_that_do_not_apply_are_errors(argv, fragment, capsys):
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and fragment in err, err


def test_flags_that_apply_are_accepted():
  parser = cli.build_parser()
  for argv in (["train", "--aggregator", "trimmed-mean", "--trim-fraction", "0.2"],
               ["train", "--aggregator", "dp", "--dp-delta", "1e-5", "--dp-accountant", "pld"],
               ["train", "--partition", "dirichlet", "--dirichlet-alpha", "0.3"],
               ["train", "--checkpoint-dir", "x", "--resume", "--checkpoint-every", "2"],
               ["train", "--runner", "chunked", "--chunk-size", "4"]):
    cli.check_flags_apply(parser.parse_args(argv), cli._explicit_flags(argv))


def test_chunk_size_reaches_the_runner():
  args = cli.build_parser().parse_args(["train", "--model", "dense", "--runner", "chunked", "--chunk-size", "3"])
  *_, runner, _ = cli._build_job(args)
  assert runner.resolved_strategy() == "chunked" and runner.chunk_size == 3


@pytest.mark.parametrize("flag", ["--output-dir", "--checkpoint-dir"])
def test_an_output_path_that_is_a_file_is_one_line_and_exit_2(flag, tmp_path, capsys):
  path = tmp_path / "taken"
  path.write_text("not a directory")
  argv = ["train", "--model", "dense", "--rounds", "1", flag, str(path)]
  if flag == "--checkpoint-dir":
    argv += ["--output-dir", str(tmp_path / "out")]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and f"{flag} {path} is a file" in err, err
  assert cli.main(["train", "--model", "dense", "--rounds", "1", "--output-dir", str(path / "below")]) == 2
  assert "cannot create" in capsys.readouterr().err


def test_error_messages_name_flags_not_internal_parameters(capsys):
  for argv in (["train", "--aggregator", "dp", "--dp-noise-multiplier", "3"],
               ["train", "--aggregator", "dp", "--dp-epsilon-budget", "0.01"]):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    internal = [word for word in err.replace("(", " ").replace(")", " ").replace(",", " ").split()
                if "_" in word and not word.startswith("--")]
    assert not internal, err


@pytest.mark.parametrize("argv, fragment", [
    (["train", "--num-clients", "2000"], "allow at most 1438 / 2 clients, not 2000"),
    (["train", "--partition", "dirichlet", "--dirichlet-alpha", "1e-9", "--num-clients", "100"],
     "raise --dirichlet-alpha (got 1e-09) or lower --num-clients (got 100)"),
])
def test_partitioner_errors_name_flags(argv, fragment, capsys):
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip()
  internal = [word for word in re.findall(r"[A-Za-z-]*_[A-Za-z_]*", err) if not word.startswith("--")]
  assert len(err.splitlines()) == 1 and fragment in err and not internal, err
