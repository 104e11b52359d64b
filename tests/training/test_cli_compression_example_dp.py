"""``fedjax-lite train --upload-compression ... [--error-feedback]`` and ``--example-dp-clip C --example-dp-noise Z``:
each flag reaches the process (the CLI's metrics equal those of the same process built in Python, round for round);
the example-level epsilon of every round is ``privacy.example_level_epsilon``'s; an error-feedback run resumes
bit-identically (its residuals, the client states, restored); combinations that do not apply are one line, exit 2."""

from __future__ import annotations

import json
import types

import jax
import numpy as np
import optax
import pytest

from fedjax_lite import aggregators, algorithms, privacy
from fedjax_lite.core import ClientSpec, Runner
from fedjax_lite.training import checkpoint as ckpt
from fedjax_lite.training import cli
from fedjax_lite.training.loop import run_training

TINY = ["train", "--dataset", "synthetic", "--num-clients", "6", "--model", "dense", "--rounds", "2",
        "--clients-per-round", "3", "--local-epochs", "1", "--eval-every", "2", "--no-progress", "--json",
        "--log-format", "jsonl"]
CLIENT_LR, BATCH_SIZE = 0.1, 10  # the CLI's defaults


def _records(output_dir):
  """The metrics file's records without wall times and evaluation (compared against a run without evaluation)."""
  lines = (output_dir / "metrics.jsonl").read_text().splitlines()
  return [{key: value for key, value in json.loads(line).items()
           if not key.endswith("_time_in_seconds") and not key.startswith("evaluation/")} for line in lines]


def _python_records(argv, **fed_avg_options):
  """The records of ``algorithms.fed_avg(**fed_avg_options)`` trained by ``run_training`` on the CLI's data for
  ``argv`` (same seed, cohorts, client spec, initial params)."""
  args = cli.build_parser().parse_args(argv)
  train_data, _, num_classes, input_shape = cli._load_data(args)
  from fedjax_lite.models import dense_softmax

  model = dense_softmax(num_classes=num_classes, input_shape=input_shape)
  process = algorithms.fed_avg(model, client_learning_rate=CLIENT_LR, server_optimizer=optax.sgd(1.0),
                               runner=Runner(), **fed_avg_options)
  result = run_training(process, train_data, model.init(jax.random.key(0)),
                        client_spec=ClientSpec(batch_size=BATCH_SIZE, num_epochs=1), clients_per_round=3,
                        num_rounds=2, seed=0, progress=False)
  return [{key: value for key, value in record.items() if not key.endswith("_time_in_seconds")}
          for record in result.history], process, train_data


def _run(argv, tmp_path, capsys):
  code = cli.main(argv + ["--output-dir", str(tmp_path)])
  captured = capsys.readouterr()
  assert code == 0, captured.err
  return json.loads(captured.out.strip().splitlines()[-1])


@pytest.mark.parametrize("flags, compressor", [
    (["topk", "--compression-fraction", "0.1", "--error-feedback"],
     lambda: aggregators.top_k_compressor(fraction=0.1, error_feedback=True)),
    (["randomk", "--compression-fraction", "0.2"], lambda: aggregators.random_k_compressor(fraction=0.2)),
    (["randomk", "--compression-fraction", "0.2", "--error-feedback"],
     lambda: aggregators.random_k_compressor(fraction=0.2, unbiased=False, error_feedback=True)),
    (["sign", "--error-feedback"], lambda: aggregators.sign_compressor(error_feedback=True)),
])
def test_each_compressor_reaches_the_process(flags, compressor, tmp_path, capsys):
  argv = TINY + ["--upload-compression"] + flags
  summary = _run(argv, tmp_path, capsys)
  expected, process, _ = _python_records(argv, upload_compressor=compressor())
  assert _records(tmp_path) == expected  # every metric of both rounds, the exact aggregated bits included
  assert (process.client_state is not None) == ("--error-feedback" in flags)
  settings = summary["upload_compression"]
  assert settings["method"] == flags[0] and settings["error_feedback"] == ("--error-feedback" in flags)
  assert summary["aggregated_bits"] == expected[-1]["cumulative_aggregated_bits"]
  dense = 610 * 32 + 32  # the dense model (60 features x 10 classes + 10 biases, float32) and the mean's weight
  assert expected[0]["aggregated_bits"] < 3 * dense


def test_count_sketch_replaces_the_mean(tmp_path, capsys):
  argv = TINY + ["--upload-compression", "sketch", "--compression-fraction", "0.05", "--sketch-depth", "3"]
  summary = _run(argv, tmp_path, capsys)
  k = int(np.ceil(0.05 * 610))
  expected, _, _ = _python_records(argv, aggregator=aggregators.count_sketch(k=k, width=10 * k, depth=3, seed=0))
  assert _records(tmp_path) == expected
  assert expected[0]["aggregated_bits"] == 3 * (3 * 10 * k * 32 + 32)  # three clients' sketches and weights
  assert summary["upload_compression"] == {"method": "sketch", "fraction": 0.05, "k": k, "width": 10 * k, "depth": 3}


def test_example_dp_reaches_the_process_and_reports_its_epsilon(tmp_path, capsys):
  argv = TINY + ["--example-dp-clip", "0.5", "--example-dp-noise", "1.2", "--dp-delta", "1e-4"]
  summary = _run(argv, tmp_path, capsys)
  expected, _, train_data = _python_records(argv, example_dp=algorithms.ExampleDp(l2_clip=0.5, noise_multiplier=1.2))
  records = _records(tmp_path)
  assert [{k: v for k, v in r.items() if not k.startswith("privacy/")} for r in records] == expected
  # One local epoch: every example in one batch per round, whatever the client's size.
  epsilons = [privacy.example_level_epsilon(1.2, rounds=rounds, delta=1e-4, num_examples=int(n), batch_size=10)
              for rounds in (1, 2) for n in train_data.client_sizes[:1]]
  assert [r["privacy/example_epsilon"] for r in records] == epsilons
  assert all(r["privacy/example_delta"] == 1e-4 for r in records)
  assert summary["example_dp"]["epsilon"] == epsilons[-1] and summary["epsilon"] is None
  assert summary["example_dp"]["l2_clip"] == 0.5 and summary["example_dp"]["noise_multiplier"] == 1.2


def test_the_example_level_bound_holds_for_every_client(capsys):
  """Two local epochs: a client whose size the batch does not divide has the larger bound; the ledger's epsilon is
  the largest over the population's clients."""
  args = cli.build_parser().parse_args(TINY + ["--local-epochs", "2", "--batch-size", "7", "--example-dp-clip",
                                               "1", "--example-dp-noise", "2"])
  train_data = cli._load_data(args)[0]
  ledger = cli._example_ledger(args, train_data)
  per_client = [privacy.example_level_epsilon(2.0, rounds=3, delta=1e-3, num_examples=int(n), batch_size=7,
                                              num_epochs=2) for n in train_data.client_sizes]
  assert len(set(per_client)) == 2  # the sizes 7 divides and those it does not
  assert ledger.epsilon_after(3) == max(per_client)


def test_user_and_example_level_dp_are_both_reported(tmp_path, capsys):
  argv = TINY + ["--num-clients", "12", "--aggregator", "dp", "--dp-clip", "0.5", "--dp-noise-multiplier", "1.5",
                 "--example-dp-clip", "0.5", "--example-dp-noise", "1.0"]
  summary = _run(argv, tmp_path, capsys)
  args = cli.build_parser().parse_args(argv)
  train_data = cli._load_data(args)[0]
  ledger = privacy.PrivacyLedger(privacy.sampled_run_events(
      aggregators.gaussian_fixed(1.5, 3.0, 0.5).dp_event(), sampling="poisson", sampling_probability=3 / 12), 1e-3)
  records = _records(tmp_path)
  assert [r["privacy/epsilon"] for r in records] == [ledger.epsilon_after(1), ledger.epsilon_after(2)]
  assert records[-1]["privacy/example_epsilon"] == privacy.example_level_epsilon(
      1.0, rounds=2, delta=1e-3, num_examples=int(train_data.client_sizes[0]), batch_size=10)
  assert summary["epsilon"] == ledger.epsilon_after(2)
  assert summary["example_dp"]["epsilon"] == records[-1]["privacy/example_epsilon"]


def test_compression_with_error_feedback_under_user_level_dp(tmp_path, capsys):
  """--aggregator dp clips and noises the compressed messages: the CLI's run is
  ``dp_fed_avg(..., upload_compressor=...)`` on its Poisson sampler, with the unchanged ledger."""
  argv = TINY + ["--num-clients", "12", "--aggregator", "dp", "--dp-noise-multiplier", "0.5", "--dp-clip", "0.5", "--upload-compression",
                 "topk", "--compression-fraction", "0.1", "--error-feedback"]
  summary = _run(argv, tmp_path, capsys)
  args = cli.build_parser().parse_args(argv)
  train_data, _, num_classes, input_shape = cli._load_data(args)
  from fedjax_lite.models import dense_softmax

  model = dense_softmax(num_classes=num_classes, input_shape=input_shape)
  recipe = algorithms.dp_fed_avg(model, noise_multiplier=0.5, num_clients=12, expected_clients_per_round=3.0,
                                 delta=1e-3, client_learning_rate=CLIENT_LR, server_optimizer=optax.sgd(1.0),
                                 clip=0.5, runner=Runner(), upload_compressor=aggregators.top_k_compressor(
                                     fraction=0.1, error_feedback=True))
  assert recipe.process.client_state is not None
  result = run_training(recipe.process, train_data, model.init(jax.random.key(0)),
                        client_spec=ClientSpec(batch_size=BATCH_SIZE, num_epochs=1), num_rounds=2, seed=0,
                        progress=False, sampler=recipe.sampler, privacy=recipe.ledger)
  expected = [{key: value for key, value in record.items() if not key.endswith("_time_in_seconds")}
              for record in result.history]
  assert _records(tmp_path) == expected
  assert summary["epsilon"] == recipe.ledger.epsilon_after(2) and summary["upload_compression"]["method"] == "topk"


def test_the_summary_line_and_round_lines_name_both_epsilons(tmp_path, capsys):
  argv = [flag for flag in TINY if flag != "--json"] + ["--example-dp-clip", "1", "--example-dp-noise", "1"]
  assert cli.main(argv + ["--output-dir", str(tmp_path)]) == 0
  captured = capsys.readouterr()
  assert captured.err.splitlines()[0].startswith("round 0: example-level epsilon ")
  assert "example-level epsilon" in captured.out and "at delta 0.001" in captured.out


def test_an_error_feedback_run_resumes_bit_identically(tmp_path, capsys):
  """Two rounds, then two more resumed from the checkpoint: the server state, the residuals (client states) and
  every record equal those of four uninterrupted rounds."""
  base = TINY[:TINY.index("--rounds")] + TINY[TINY.index("--rounds") + 2:]
  flags = base + ["--upload-compression", "topk", "--compression-fraction", "0.05", "--error-feedback",
                  "--eval-every", "1"]

  def run(rounds, name, *extra):
    assert cli.main(flags + ["--rounds", str(rounds), "--output-dir", str(tmp_path / name), "--checkpoint-dir",
                             str(tmp_path / (name + "-ck")), *extra]) == 0, capsys.readouterr().err

  run(4, "whole")
  run(2, "split")
  run(4, "split", "--resume")
  whole, whole_meta = ckpt.read_checkpoint(tmp_path / "whole-ck")
  split, _ = ckpt.read_checkpoint(tmp_path / "split-ck")
  assert set(whole) == set(split) and "client_states" in whole_meta["trees"], whole_meta["trees"].keys()
  for name in whole:
    for leaf, other in zip(whole[name], split[name], strict=True):
      assert leaf.dtype == other.dtype and leaf.tobytes() == other.tobytes(), name
  assert any(np.any(leaf != 0) for leaf in whole["client_states"])  # residuals kept: the resume needed them
  assert _records(tmp_path / "split") == _records(tmp_path / "whole")
  # Resuming it without error feedback would change the results: refused, naming the flag.
  without = [flag for flag in flags if flag != "--error-feedback"]
  assert cli.main(without + ["--rounds", "6", "--output-dir", str(tmp_path / "split"), "--checkpoint-dir",
                             str(tmp_path / "split-ck"), "--resume"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "cannot resume" in err and "--error-feedback" in err, err


def test_a_model_with_batch_norm_is_refused():
  args = cli.build_parser().parse_args(TINY + ["--example-dp-clip", "1", "--example-dp-noise", "1"])
  with pytest.raises(cli.UsageError, match="--example-dp-clip needs a model without non-trainable state: --model "
                                           "dense has batch_stats"):
    cli._example_dp(args, types.SimpleNamespace(state_collections=("batch_stats",)))


@pytest.mark.parametrize("flags, fragment", [
    (["--error-feedback"], "--error-feedback applies only with --upload-compression topk, randomk, randomk-shared or sign"),
    (["--upload-compression", "sketch", "--error-feedback"], "--error-feedback applies only with"),
    (["--compression-fraction", "0.1"], "--compression-fraction applies only with --upload-compression topk"),
    (["--upload-compression", "sign", "--compression-fraction", "0.1"], "--compression-fraction applies only"),
    (["--sketch-width", "5"], "--sketch-width applies only with --upload-compression sketch"),
    (["--upload-compression", "topk", "--sketch-depth", "3"], "--sketch-depth applies only"),
    (["--upload-compression", "topk", "--compression-fraction", "1.5"], "--compression-fraction"),
    (["--upload-compression", "zip"], "--upload-compression"),
    (["--algorithm", "scaffold", "--upload-compression", "topk"], "--upload-compression applies only with --algorithm fedavg"),
    (["--algorithm", "mimelite", "--upload-compression", "sign"], "--upload-compression applies only"),
    (["--upload-compression", "topk", "--aggregator", "secure"], "--aggregator mean, robust or dp, not secure"),
    (["--upload-compression", "randomk", "--aggregator", "median"], "--aggregator mean, robust or dp, not median"),
    (["--upload-compression", "sketch", "--aggregator", "robust"], "use it with --aggregator mean"),
    (["--upload-compression", "sketch", "--aggregator", "dp"], "use it with --aggregator mean"),
    (["--upload-compression", "topk", "--error-feedback", "--rounds-per-dispatch", "2"], "--rounds-per-dispatch"),
    (["--example-dp-noise", "1"], "--example-dp-noise applies only with --example-dp-clip"),
    (["--example-dp-clip", "1"], "--example-dp-clip needs --example-dp-noise"),
    (["--example-dp-clip", "0", "--example-dp-noise", "1"], "--example-dp-clip"),
    (["--algorithm", "fednova", "--example-dp-clip", "1", "--example-dp-noise", "1"],
     "--example-dp-clip applies only with --algorithm fedavg"),
    (["--algorithm", "fedbuff", "--example-dp-clip", "1", "--example-dp-noise", "1"], "--example-dp-clip applies"),
    (["--dp-delta", "1e-4"], "--dp-delta applies only with --aggregator dp or --example-dp-clip"),
])
def test_combinations_that_do_not_apply_are_one_line_and_exit_2(flags, fragment, tmp_path, capsys):
  assert cli.main(TINY + ["--output-dir", str(tmp_path)] + flags) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("fedjax-lite: error:") and fragment in err, err


def test_several_processes_refuse_error_feedback():
  args = cli.build_parser().parse_args(TINY + ["--upload-compression", "sign", "--error-feedback",
                                               "--coordinator-address", "localhost:1", "--num-processes", "2",
                                               "--process-id", "0"])
  given = cli._explicit_flags(TINY + ["--coordinator-address", "localhost:1", "--num-processes", "2",
                                      "--process-id", "0"])
  with pytest.raises(cli.UsageError, match="--error-feedback keeps per-client residuals on one host"):
    cli.distributed_config(args, given)


def test_new_flags_at_their_defaults_leave_older_checkpoints_resumable():
  config = cli._run_config(cli.build_parser().parse_args(TINY))
  assert not any(flag.startswith(("--upload-compression", "--compression", "--error-feedback", "--sketch",
                                  "--example-dp")) for flag in config)
  changed = cli._run_config(cli.build_parser().parse_args(TINY + ["--upload-compression", "sign",
                                                                  "--error-feedback"]))
  assert changed["--upload-compression"] == "sign" and changed["--error-feedback"] is True


def test_run_training_checks_its_example_ledger():
  from fedjax_lite.datasets import synthetic_leaf
  from fedjax_lite.models import dense_softmax

  model = dense_softmax(num_classes=10, input_shape=(60,))
  data = synthetic_leaf(num_clients=3, seed=0)
  common = dict(client_spec=ClientSpec(batch_size=10), clients_per_round=1, num_rounds=1, progress=False)
  process = algorithms.fed_avg(model, client_learning_rate=0.1)
  run = privacy.example_level_run_events(1.0, num_examples=20, batch_size=10)
  with pytest.raises(ValueError, match="example_privacy is reported, not enforced"):
    run_training(process, data, model.init(jax.random.key(0)),
                 example_privacy=privacy.PrivacyLedger(run, 1e-5, epsilon_budget=100.0), **common)
  with pytest.raises(TypeError, match="example_privacy must be a PrivacyLedger"):
    run_training(process, data, model.init(jax.random.key(0)), example_privacy=run, **common)


@pytest.mark.parametrize("fast_compile", [True, False])
def test_example_dp_runs_keep_xlas_fusion_emitters(monkeypatch, fast_compile):
  """``_configure_cpu`` hands ``fast_compile`` to ``configure_cpu`` (False for ``--example-dp-clip``: Gaussian draws
  at every step are 2.6x faster with XLA's fusion emitters); this process's JAX is running, so the backend check is
  stubbed."""
  from fedjax_lite.core import cpu

  calls = []
  monkeypatch.setattr(cpu, "backend_initialized", lambda: False)
  monkeypatch.setattr(cpu, "configure_cpu", lambda devices, fast_compile: calls.append((devices, fast_compile)))
  cli._configure_cpu(None, fast_compile=fast_compile)
  assert calls == [(None, fast_compile)]


@pytest.mark.parametrize("error_feedback", [False, True])
def test_the_shared_random_k_mask_reaches_the_process(error_feedback, tmp_path, capsys):
  flags = ["randomk-shared", "--compression-fraction", "0.2"] + (["--error-feedback"] if error_feedback else [])
  argv = TINY + ["--upload-compression"] + flags
  summary = _run(argv, tmp_path, capsys)
  expected, _, _ = _python_records(argv, upload_compressor=aggregators.shared_random_k_compressor(
      fraction=0.2, unbiased=not error_feedback, seed=0, error_feedback=error_feedback))
  assert _records(tmp_path) == expected
  assert summary["upload_compression"]["method"] == "randomk-shared"
  assert summary["upload_compression"]["mask_seed"] == 0


def test_only_the_shared_mask_composes_with_the_secure_sum(tmp_path, capsys):
  sparse = _run(TINY + ["--upload-compression", "randomk-shared", "--compression-fraction", "0.1", "--aggregator",
                        "secure"], tmp_path / "sparse", capsys)["aggregated_bits"]
  dense = _run(TINY + ["--aggregator", "secure"], tmp_path / "dense", capsys)["aggregated_bits"]
  assert 0 < sparse < 0.2 * dense  # 61 of the 610 entries, at the secure sum's widths
  code = cli.main(TINY + ["--upload-compression", "randomk", "--aggregator", "secure", "--output-dir",
                          str(tmp_path / "refused")])
  assert code == 2 and "randomk-shared" in capsys.readouterr().err
