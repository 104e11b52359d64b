"""``fedjax-lite train --model transformer --init-from CKPT --lora-rank R``: LoRA fine-tuning from the command line,
end to end on a tiny checkpoint (what ``experiments/pretrain_transformer.py`` writes: weights and ``CKPT.json``)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from fedjax_lite import core, datasets, models
from fedjax_lite.training import cli

ARCHITECTURE = dict(sequence_length=8, num_layers=1, num_heads=2, width=16, mlp_width=None, dropout_rate=0.0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A tiny 'pretrained' base (random weights: the CLI path is what is tested) and its JSON record."""
  vocab_size = datasets.grammar_corpus(num_clients=1, examples_per_client=2, sequence_length=8).num_classes - 4
  arguments = dict(ARCHITECTURE, vocab_size=vocab_size)
  model = models.transformer_lm(**arguments)
  path = tmp_path_factory.mktemp("pretrained") / "weights.npz"
  models.save_params(path, model.init(jax.random.key(3)))
  path.with_name("weights.npz.json").write_text(json.dumps({"model": arguments}))
  return path, arguments


def run(argv, capsys):
  code = cli.main(argv)
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def test_lora_fine_tuning_from_the_command_line_uploads_the_adapters_only(checkpoint, tmp_path, capsys):
  path, arguments = checkpoint
  common = ["train", "--dataset", "grammar", "--grammar-domain", "1", "--grammar-shift", "0.5", "--num-clients",
            "6", "--model", "transformer", "--init-from", str(path), "--rounds", "2", "--clients-per-round", "3",
            "--local-epochs", "1", "--batch-size", "8", "--eval-every", "2", "--no-progress", "--json",
            "--log-format", "jsonl"]
  code, out, err = run([*common, "--lora-rank", "2", "--output-dir", str(tmp_path / "lora")], capsys)
  assert code == 0, err
  lora = json.loads(out.strip().splitlines()[-1])
  code, out, err = run([*common, "--output-dir", str(tmp_path / "full")], capsys)
  assert code == 0, err
  full = json.loads(out.strip().splitlines()[-1])
  assert 0.0 <= lora["final_test_accuracy"] <= 1.0 and 0.0 <= full["final_test_accuracy"] <= 1.0
  model = models.transformer_lm(**arguments, lora_rank=2)
  params = model.init(jax.random.key(0))
  counts = core.count_params(params, models.lora_labels(params))
  records = [json.loads(line) for line in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()]
  # Exact bits: 3 clients, each uploading the adapters (float32) and its weight.
  assert records[0]["aggregated_bits"] == 3 * (32 * counts["global"] + 32)
  full_records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
  assert full_records[0]["aggregated_bits"] == 3 * (32 * (counts["frozen"]) + 32)


@pytest.mark.parametrize("flags, message", [
    (["--lora-rank", "2"], "--lora-rank applies only with --model transformer --init-from CKPT"),
    (["--model", "transformer", "--dataset", "digits"], "--model transformer needs --dataset grammar"),
    (["--dataset", "grammar"], "--dataset grammar needs --model transformer"),
    (["--grammar-shift", "0.5"], "--grammar-shift applies only with --dataset grammar"),
])
def test_flags_that_do_not_apply_are_refused_in_one_line(flags, message, tmp_path, capsys):
  code, _, err = run(["train", *flags, "--output-dir", str(tmp_path), "--no-progress"], capsys)
  assert code == cli.EXIT_USAGE
  assert message in err and len(err.strip().splitlines()) == 1


def test_a_checkpoint_without_its_record_or_of_another_vocabulary_is_refused(checkpoint, tmp_path, capsys):
  path, arguments = checkpoint
  alone = tmp_path / "alone.npz"
  alone.write_bytes(path.read_bytes())
  base = ["train", "--dataset", "grammar", "--model", "transformer", "--rounds", "1", "--no-progress",
          "--output-dir", str(tmp_path / "run")]
  code, _, err = run([*base, "--init-from", str(alone), "--lora-rank", "2"], capsys)
  assert code == cli.EXIT_USAGE and "alone.npz.json" in err and len(err.strip().splitlines()) == 1
  other = tmp_path / "other.npz"
  other.write_bytes(path.read_bytes())
  (tmp_path / "other.npz.json").write_text(json.dumps({"model": dict(arguments, vocab_size=7)}))
  code, _, err = run([*base, "--init-from", str(other)], capsys)
  assert code == cli.EXIT_USAGE and "vocabulary of 7 tokens" in err
  code, _, err = run([*base, "--init-from", str(tmp_path / "missing.npz")], capsys)
  assert code == cli.EXIT_USAGE and "no such file" in err
