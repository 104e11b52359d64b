"""The research scripts in ``experiments/``: a fast run end to end writes consistent results; bad flags exit 2."""

from __future__ import annotations

import csv
import importlib.util
import json
import pathlib

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "noniid_digits.py"


def load_script():
  spec = importlib.util.spec_from_file_location("noniid_digits", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_rounds_to_target_is_the_first_round_at_or_above():
  noniid_digits = load_script()
  assert noniid_digits.rounds_to_target([0.5, 0.9, 0.95], 0.9) == 2  # inclusive: 0.9 reaches 0.9
  assert noniid_digits.rounds_to_target([0.91, 0.5], 0.9) == 1
  assert noniid_digits.rounds_to_target([0.5, 0.89], 0.9) is None


@pytest.mark.parametrize("argv", [["--target", "1.5"], ["--rounds", "0"], ["--local-epochs", "0"],
                                  ["--partitions", "random"]])
def test_bad_flags_exit_2(argv, capsys):
  noniid_digits = load_script()
  with pytest.raises(SystemExit) as error:
    noniid_digits.parse_args(argv)
  assert error.value.code == 2
  assert "error:" in capsys.readouterr().err


@pytest.mark.slow
def test_fast_run_writes_consistent_results(tmp_path, capsys):
  noniid_digits = load_script()
  args = noniid_digits.parse_args(["--fast", "--partitions", "iid", "shards", "--local-epochs", "1", "2",
                                   "--hidden", "32", "--client-lr", "0.1", "--target", "0.3", "--output-dir", str(tmp_path)])
  assert args.seeds == [0] and args.rounds == 5
  summary = noniid_digits.run(args)

  rows = list(csv.DictReader((tmp_path / "results.csv").open()))
  assert [(row["partition"], row["local_epochs"]) for row in rows] == [
      ("iid", "1"), ("iid", "2"), ("shards", "1"), ("shards", "2")]
  curves = list(csv.DictReader((tmp_path / "curves.csv").open()))
  assert len(curves) == 4 * 5
  for row in rows:
    accuracies = [float(c["test_accuracy"]) for c in curves
                  if (c["partition"], c["local_epochs"]) == (row["partition"], row["local_epochs"])]
    assert float(row["final_test_accuracy"]) == accuracies[-1]
    assert float(row["best_test_accuracy"]) == max(accuracies)
    expected = noniid_digits.rounds_to_target(accuracies, 0.3)
    assert row["rounds_to_target"] == ("" if expected is None else str(expected))
  # Five rounds of FedAvg on IID digits learn well beyond chance (0.1).
  assert max(float(row["final_test_accuracy"]) for row in rows if row["partition"] == "iid") > 0.3

  assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(summary))
  assert len(summary["settings"]) == 4
  assert (tmp_path / "noniid_digits.png").stat().st_size > 1000
  table = capsys.readouterr().out
  assert table.count("\n| iid |") + table.startswith("| iid |") >= 1 and "| shards | 2 |" in table


def test_algorithms_synthetic_fast_run_writes_results(tmp_path, capsys):
  spec = importlib.util.spec_from_file_location("algorithms_synthetic", SCRIPT.parent / "algorithms_synthetic.py")
  algorithms_synthetic = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(algorithms_synthetic)
  out = tmp_path / "algos"
  code = algorithms_synthetic.main(["--fast", "--algorithms", "fedavg", "scaffold", "--output-dir", str(out),
                                    "--num-clients", "8", "--clients-per-round", "3", "--max-client-size", "60"])
  assert code == 0
  rows = list(csv.DictReader(open(out / "results.csv")))
  assert [row["algorithm"] for row in rows] == ["fedavg", "scaffold"]
  assert all(0.0 <= float(row["final_test_accuracy"]) <= 1.0 for row in rows)
  assert (out / "algorithms_synthetic.png").stat().st_size > 1000


def test_pretrain_transformer_fast_run_saves_weights_that_load_into_a_lora_model(tmp_path, capsys):
  import jax

  from fedjax_lite import models

  spec = importlib.util.spec_from_file_location("pretrain_transformer", SCRIPT.parent / "pretrain_transformer.py")
  pretrain = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(pretrain)
  with pytest.raises(SystemExit) as error:
    pretrain.parse_args(["--width", "10", "--heads", "4"])
  assert error.value.code == 2
  assert pretrain.main(["--fast", "--output", str(tmp_path / "weights.npz")]) == 0
  summary = json.loads((tmp_path / "weights.npz.json").read_text())
  assert summary["test_after"]["loss"] < summary["test_before"]["loss"]  # 20 steps learn something
  assert "saved" in capsys.readouterr().out
  model = models.transformer_lm(**summary["model"], lora_rank=2)
  params = models.load_params(tmp_path / "weights.npz", model.init(jax.random.key(0)),
                              missing_ok=models.is_lora_path)
  assert sum(leaf.size for leaf in jax.tree.leaves(params)) > summary["num_parameters"]


def _dp_ftrl_script():
  spec = importlib.util.spec_from_file_location("dp_ftrl_experiment", SCRIPT.parent / "dp_ftrl.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_dp_ftrl_ordering_verdict():
  """BLT/BandMF above tree 'clearly' only when the gap exceeds the two seed standard deviations added."""
  dp_ftrl = _dp_ftrl_script()

  def setting(name, mean, std):
    return {"mechanism": name, "final_accuracy_mean": mean, "final_accuracy_std": std}

  verdict = dp_ftrl.ordering([setting("tree", 0.6, 0.02), setting("banded", 0.9, 0.01), setting("blt", 0.62, 0.01)])
  assert verdict["holds"] and not verdict["clearly"]
  assert verdict["per_strategy"]["banded"]["clearly_above_tree"]
  assert not dp_ftrl.ordering([setting("tree", 0.6, 0.0), setting("blt", 0.5, 0.0)])["holds"]


@pytest.mark.parametrize("argv", [["--epsilons", "0"], ["--delta", "1"], ["--mechanisms", "laplace"],
                                  ["--rounds", "0"], ["--clients-per-round", "2000"]])
def test_dp_ftrl_bad_flags_exit_2(argv, capsys):
  with pytest.raises(SystemExit) as error:
    _dp_ftrl_script().parse_args(argv)
  assert error.value.code == 2
  assert "error:" in capsys.readouterr().err


@pytest.mark.slow
def test_dp_ftrl_fast_run_writes_results_and_audits(tmp_path, capsys):
  """Tree and BandMF at one epsilon, 8 rounds: both spend the target epsilon; the audit's lower bounds stay below
  the accountant's; the files agree with each other."""
  pytest.importorskip("jax_privacy", reason="the [dp_mf] extra (jax_privacy, Python >= 3.11)")
  dp_ftrl = _dp_ftrl_script()
  args = dp_ftrl.parse_args(["--fast", "--mechanisms", "tree", "banded", "--audit-canaries", "5", "--epsilons", "4",
                             "--output-dir", str(tmp_path)])
  summary = dp_ftrl.run(args)
  rows = list(csv.DictReader((tmp_path / "results.csv").open()))
  assert [row["mechanism"] for row in rows] == ["tree", "banded"]
  assert all(3.9 <= float(row["epsilon"]) <= 4.0 for row in rows)  # calibrated to within 0.1% below the target
  curves = list(csv.DictReader((tmp_path / "curves.csv").open()))
  assert len(curves) == 2 * 8
  for row in rows:
    final = [float(c["test_accuracy"]) for c in curves if c["mechanism"] == row["mechanism"]][-1]
    assert float(row["final_test_accuracy"]) == final
  audits = list(csv.DictReader((tmp_path / "audit.csv").open()))
  assert [a["mechanism"] for a in audits] == ["tree", "banded"]
  assert all(a["lower_bounds_below_accountant"] == "True" for a in audits)
  assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(summary))
  assert summary["min_separation"] == 6 and "4.0" in summary["ordering"]
  assert (tmp_path / "dp_ftrl.png").stat().st_size > 1000
  assert "| 4 | DP-FTRL BandMF |" in capsys.readouterr().out


def test_compression_ef_fast_run_writes_results(tmp_path, capsys):
  """Two rounds of top-k, sign and shared random-k with error feedback through run_training (the residuals in its
  client-state store): results, curves with the exact cumulative bits, and the plot."""
  spec = importlib.util.spec_from_file_location("compression_ef", SCRIPT.parent / "compression_ef.py")
  compression_ef = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(compression_ef)
  args = compression_ef.parse_args(["--fast", "--variants", "topk_ef", "sign_ef", "randk_shared_ef", "--output-dir",
                                     str(tmp_path)])
  args.rounds = 2
  summary = compression_ef.run(args)
  rows = list(csv.DictReader(open(tmp_path / "results.csv")))
  assert [row["variant"] for row in rows] == ["topk_ef", "sign_ef", "randk_shared_ef"]
  curves = list(csv.DictReader(open(tmp_path / "curves.csv")))
  # top-k 1% of the MLP's 9,610 parameters: 97 x (14 + 32) bits and the 32-bit weight per client, 10 per round.
  assert [int(c["cumulative_aggregated_bits"]) for c in curves if c["variant"] == "topk_ef"] == [
      10 * (97 * 46 + 32), 2 * 10 * (97 * 46 + 32)]
  # a shared mask: the 97 float32 values only (the server knows the indices) and the weight
  assert [int(c["cumulative_aggregated_bits"]) for c in curves if c["variant"] == "randk_shared_ef"] == [
      10 * (97 * 32 + 32), 2 * 10 * (97 * 32 + 32)]
  assert len(summary["settings"]) == 3 and (tmp_path / "compression_ef.png").stat().st_size > 1000
  assert "| sign_ef |" in capsys.readouterr().out


def test_lora_finetune_fast_run_compares_full_lora_and_frozen(tmp_path, capsys):
  spec = importlib.util.spec_from_file_location("lora_finetune", SCRIPT.parent / "lora_finetune.py")
  lora_finetune = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(lora_finetune)
  with pytest.raises(SystemExit) as error:
    lora_finetune.parse_args(["--ranks", "0"])
  assert error.value.code == 2
  assert lora_finetune.main(["--fast", "--output-dir", str(tmp_path)]) == 0
  summary = json.loads((tmp_path / "summary.json").read_text())
  settings = {s["method"]: s for s in summary["settings"]}
  assert set(settings) == {"frozen", "full", "lora2"}
  assert settings["frozen"]["upload_bits_per_client"] == 0
  # The exact upload: the adapters (float32) and the mean's weight; full fine-tuning: every parameter.
  assert settings["lora2"]["upload_bits_per_client"] == 32 * settings["lora2"]["trained_parameters"] + 32
  assert settings["full"]["upload_bits_per_client"] == 32 * settings["full"]["trained_parameters"] + 32
  assert 0 < settings["lora2"]["upload_fraction_of_full"] < 0.1
  assert (tmp_path / "lora_finetune.png").stat().st_size > 1000
  assert "| lora2 |" in capsys.readouterr().out
