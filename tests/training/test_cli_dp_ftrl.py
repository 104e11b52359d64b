"""``fedjax-lite train --aggregator dp --dp-strategy ...``: DP-FTRL with each strategy from the command line, its
epsilon per round; ``--audit-canaries N``: the audit's epsilons beside the accountant's in summary.json and on
stdout; flags that do not apply are refused with one line and exit code 2."""

from __future__ import annotations

import importlib
import json

import jax
import numpy as np
import pytest

from fedjax_lite import privacy
from fedjax_lite.training import cli

recipes = importlib.import_module("fedjax_lite.algorithms.dp_fed_avg")

TINY = ["train", "--dataset", "synthetic", "--num-clients", "12", "--model", "dense", "--rounds", "5",
        "--clients-per-round", "3", "--local-epochs", "1", "--eval-every", "5", "--no-progress", "--log-format",
        "jsonl", "--aggregator", "dp", "--dp-noise-multiplier", "1.5", "--dp-delta", "1e-3"]
BLT_PARAMETERS = ([0.9842298634927619, 0.7270931425682697], [0.1706081571013166, 0.3102560932438474])


@pytest.fixture
def fixed_plans(monkeypatch):
  """dp_ftrl's strategy plans replaced by fixed ones of the same kind (jax_privacy's optimizers take tens of
  seconds to compile); the calls are recorded."""
  pytest.importorskip("jax_privacy", reason="the [dp_mf] extra (jax_privacy, Python >= 3.11)")
  calls = []

  def fixed(strategy, *, num_rounds, min_separation):
    calls.append((strategy, num_rounds, min_separation))
    options = {"blt": {"blt_parameters": BLT_PARAMETERS}, "banded": {"coefficients": [0.8, 0.4, 0.2][:min_separation]},
               "toeplitz": {"num_bands": 3}}[strategy]
    return privacy.matrix_factorization(strategy, num_rounds=num_rounds, min_separation=min_separation, **options)

  monkeypatch.setattr(recipes, "matrix_factorization", fixed)
  return calls


def _records(out):
  return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("strategy", ["blt", "banded"])  # toeplitz: tests/algorithms/test_dp_ftrl.py
def test_matrix_factorization_strategies_train_with_their_ledger(strategy, fixed_plans, tmp_path, capsys):
  """12 clients, 3 a round: 4 fixed groups, the strategy planned for --rounds 5; the epsilon of every round is the
  ledger's for that strategy and separation."""
  code = cli.main(TINY + ["--dp-strategy", strategy, "--dp-clip", "0.5", "--output-dir", str(tmp_path), "--json"])
  assert code == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["dp_strategy"] == strategy and summary["rounds"] == 5 and summary["audit"] is None
  assert fixed_plans == [(strategy, 5, 4)]
  mechanism = recipes.matrix_factorization(strategy, num_rounds=5, min_separation=4)
  ledger = privacy.PrivacyLedger(privacy.matrix_factorization_run_events(mechanism, 1.5, min_separation=4), 1e-3)
  epsilons = [record["privacy/epsilon"] for record in _records(tmp_path)]
  assert epsilons == [ledger.epsilon_after(rounds) for rounds in range(1, 6)]
  assert all(b >= a for a, b in zip(epsilons, epsilons[1:])) and epsilons[4] > epsilons[3]  # 2nd participation


def test_tree_strategy_trains_with_tree_events(tmp_path, capsys):
  code = cli.main(TINY + ["--dp-strategy", "tree", "--dp-clip", "0.5", "--output-dir", str(tmp_path), "--json"])
  assert code == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  ledger = privacy.PrivacyLedger(privacy.tree_run_events(1.5, 4), 1e-3)
  assert summary["dp_strategy"] == "tree" and summary["epsilon"] == ledger.epsilon_after(5)


@pytest.mark.parametrize("strategy", ["gaussian", "blt"])
def test_audit_writes_the_empirical_epsilons_beside_the_accountants(strategy, fixed_plans, tmp_path, capsys):
  code = cli.main(TINY + ["--dp-strategy", strategy, "--dp-clip", "0.5", "--audit-canaries", "20",
                          "--output-dir", str(tmp_path)])
  assert code == 0
  lines = capsys.readouterr().out.strip().splitlines()
  summary = json.loads((tmp_path / "summary.json").read_text())
  audit = summary["audit"]
  assert audit["canaries"] == 20 and audit["confidence"] == 0.95
  # The empirical lower bounds never exceed the accountant's upper bound (a bug if they did).
  assert 0 <= audit["epsilon_lower_bound"] <= summary["epsilon"]
  assert 0 <= audit["epsilon_lower_bound_clopper_pearson"] <= summary["epsilon"]
  assert audit["epsilon_estimate"] >= audit["epsilon_lower_bound"]
  assert lines[-1].startswith("privacy audit (20 canaries): empirical epsilon")
  assert f"the accountant's upper bound {summary['epsilon']:.4g}" in lines[-1]


def test_the_canaries_are_one_seeded_draw_of_norm_dp_clip():
  """2N canaries of norm --dp-clip drawn from the run's seed: the first N inserted, the other N held out."""
  from fedjax_lite.core import Runner
  from fedjax_lite.models import dense_softmax

  args = cli.build_parser().parse_args(TINY + ["--dp-clip", "0.5", "--audit-canaries", "3", "--seed", "4"])
  model = dense_softmax(num_classes=10, input_shape=(60,))
  first, second = (cli._private_recipe(args, model, 12, None, Runner()).canaries for _ in range(2))
  for part, again in zip(first, second):
    jax.tree.map(np.testing.assert_array_equal, part, again)
  stacked = np.concatenate([np.concatenate([np.asarray(leaf).reshape(3, -1) for leaf in jax.tree.leaves(part)], 1)
                            for part in first])
  np.testing.assert_allclose(np.linalg.norm(stacked, axis=1), 0.5, rtol=1e-6)
  assert len({tuple(row) for row in stacked}) == 6


def test_matrix_factorization_runs_compare_rounds_when_resuming():
  """The strategy is planned for --rounds: a resumed matrix-factorization run must keep them (other runs may
  extend theirs)."""
  parser = cli.build_parser()
  assert cli._run_config(parser.parse_args(TINY + ["--dp-strategy", "blt"]))["--rounds"] == 5
  assert "--rounds" not in cli._run_config(parser.parse_args(TINY + ["--dp-strategy", "tree"]))
  assert "--rounds" not in cli._run_config(parser.parse_args(TINY))


@pytest.mark.parametrize("argv, fragment", [
    (["train", "--dp-strategy", "blt"], "--dp-strategy applies only with --aggregator dp"),
    (["train", "--audit-canaries", "5"], "--audit-canaries applies only with --aggregator dp and a fixed --dp-clip"),
    (["train", "--aggregator", "dp", "--audit-canaries", "5"], "--audit-canaries applies only with"),
    (["train", "--aggregator", "dp", "--dp-strategy", "banded", "--rounds-per-dispatch", "5"],
     "--rounds-per-dispatch applies only with a sampler that runs on the device"),
    (["train", "--aggregator", "dp", "--dp-strategy", "lattice"], "--dp-strategy"),
    (["train", "--aggregator", "dp", "--dp-clip", "1", "--audit-canaries", "0"], "--audit-canaries"),
    (TINY[1:] + ["--dp-strategy", "tree"], "--dp-strategy tree needs a fixed --dp-clip"),
    (TINY[1:] + ["--dp-strategy", "tree", "--dp-clip", "1", "--dp-accountant", "pld"], "RDP only"),
])
def test_flags_that_do_not_apply_are_one_line_and_exit_2(argv, fragment, capsys):
  argv = argv if argv[0] == "train" else ["train"] + argv
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("fedjax-lite: error:") and fragment in err, err


def test_a_missing_dp_mf_extra_is_one_line(monkeypatch, capsys):
  def missing(*args, **kwargs):
    raise ImportError("matrix-factorization DP-FTRL needs jax_privacy: pip install 'fedjax_lite[dp_mf]'")

  monkeypatch.setattr(recipes, "matrix_factorization", missing)
  assert cli.main(TINY + ["--dp-strategy", "blt"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "--dp-strategy blt" in err and "[dp_mf]" in err, err
