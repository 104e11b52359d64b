"""``experiments/cross_device.py``: a fast run writes consistent results; devices assigned by label go slowest to the
lowest digits; bad flags exit 2."""

from __future__ import annotations

import csv
import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "cross_device.py"


def load_script():
  spec = importlib.util.spec_from_file_location("cross_device", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # its dataclasses look their module up
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("argv", [["--target", "1.5"], ["--rounds", "0"], ["--dropout", "1"],
                                  ["--configs", "fedbuff_unknown"], ["--assignments", "random"]])
def test_bad_flags_exit_2(argv, capsys):
  with pytest.raises(SystemExit) as error:
    load_script().parse_args(argv)
  assert error.value.code == 2 and "error:" in capsys.readouterr().err


def test_devices_by_label_keep_the_devices_and_give_the_slowest_to_the_lowest_digits():
  from fedjax_lite import core, datasets, systems

  cross_device = load_script()
  data = datasets.load_digits(num_clients=50, seed=0).train
  population = systems.lognormal_systems(50, seed=0)
  spec = core.ClientSpec(batch_size=10, num_epochs=5)
  full = cross_device.full_work_seconds(population, data, spec, (1000, 1000))
  assigned = cross_device.assign_by_label(population, data, full)
  # The same devices (a permutation of the clients' records)...
  assert sorted(assigned.seconds_per_example) == sorted(population.seconds_per_example)
  assert sorted(assigned.download_bits_per_second) == sorted(population.download_bits_per_second)
  # ... the slowest on the clients of the lowest mean digit: full work decreasing along the mean label.
  mean_label = np.add.reduceat(data.examples["y"].astype(float), data.offsets[:-1]) / np.diff(data.offsets)
  after = cross_device.full_work_seconds(assigned, data, spec, (1000, 1000))
  order = np.argsort(mean_label, kind="stable")
  # Clients' work differs slightly (14 or 15 steps), so compare the devices' per-example speeds.
  speeds = assigned.seconds_per_example[order]
  assert np.corrcoef(np.arange(50), speeds)[0, 1] < -0.5
  assert after.shape == (50,)


@pytest.mark.slow
def test_fast_run_writes_consistent_results(tmp_path):
  cross_device = load_script()
  args = cross_device.parse_args(["--fast", "--configs", "fedavg", "fednova_partial", "--assignments", "by_label",
                                  "--output-dir", str(tmp_path)])
  args.rounds = 2  # shorter than --fast's 4: the suite's budget
  summary = cross_device.run(args)
  rows = list(csv.DictReader((tmp_path / "results.csv").open()))
  assert [(row["assignment"], row["config"]) for row in rows] == [("by_label", "fedavg"),
                                                                   ("by_label", "fednova_partial")]
  curves = list(csv.DictReader((tmp_path / "curves.csv").open()))
  assert len(curves) == 2 * (args.rounds + 1)  # round 0 (the initial model) and every round
  for row in rows:
    mine = [c for c in curves if c["config"] == row["config"]]
    assert [int(c["round"]) for c in mine] == list(range(args.rounds + 1))
    assert float(row["final_test_accuracy"]) == float(mine[-1]["test_accuracy"])
    seconds = [float(c["simulated_seconds"]) for c in mine]
    assert seconds[0] == 0.0 and all(b > a for a, b in zip(seconds, seconds[1:]))
    assert float(row["simulated_minutes"]) == pytest.approx(seconds[-1] / 60, abs=1e-3)
  # The deadline bounds every partial-work round; waiting for everyone does not.
  deadline = float(rows[1]["deadline_seconds"])
  nova = [float(c["simulated_seconds"]) for c in curves if c["config"] == "fednova_partial"]
  assert all(b - a <= deadline + 1e-3 for a, b in zip(nova, nova[1:]))
  assert json.loads((tmp_path / "summary.json").read_text())["settings"] == summary["settings"]
  assert (tmp_path / "cross_device.png").stat().st_size > 0


@pytest.mark.slow
def test_fed_buff_entry_runs_asynchronously(tmp_path):
  cross_device = load_script()
  args = cross_device.parse_args(["--fast", "--configs", "fedbuff", "--assignments", "independent",
                                  "--output-dir", str(tmp_path)])
  args.rounds = 1  # as many client updates as one round of 10: two server steps of K = 5
  cross_device.run(args)
  curves = list(csv.DictReader((tmp_path / "curves.csv").open()))
  assert [int(c["round"]) for c in curves] == [0, 1, 2]
  assert all(int(c["num_counted"]) == cross_device.FEDBUFF_BUFFER_SIZE for c in curves[1:])
  seconds = [float(c["simulated_seconds"]) for c in curves]
  assert seconds[0] == 0.0 and seconds == sorted(seconds) and seconds[-1] > 0  # updates may share an instant
