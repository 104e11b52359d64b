"""Pretrain the transformer language model centrally and save its weights: the start of LoRA fine-tuning.

The model is :func:`fedjax_lite.models.transformer_lm` (word level); the corpus is either generated offline --
sentences of a small probabilistic grammar (:func:`fedjax_lite.datasets.grammar_corpus`, one shared word
distribution, ``--domain`` choosing which) -- or StackOverflow when you have its files
(:func:`fedjax_lite.datasets.load_stackoverflow` with ``--data-dir``; nothing is downloaded unless ``--download``).
Training is centralized next-word prediction: AdamW with linear warm-up and cosine decay, all clients' training
sentences pooled and shuffled, ``--steps-per-dispatch`` steps per jitted ``lax.scan``.

Usage (from the repository root)::

  python experiments/pretrain_transformer.py --output runs/pretrained/weights.npz            # grammar corpus
  python experiments/pretrain_transformer.py --corpus stackoverflow --data-dir ~/data --output so.npz
  python experiments/pretrain_transformer.py --fast --output /tmp/pretrained/weights.npz     # smoke run

Writes the weights (``.npz``, ``.safetensors`` or an orbax directory, by the output's suffix:
:func:`fedjax_lite.models.save_params`) and ``<output>.json`` beside them: the ``transformer_lm`` arguments that
rebuild the model, the corpus, the training settings, and the test loss and token accuracy before and after.
Load them for fine-tuning with ``models.load_params(path, model.init(key), missing_ok=models.is_lora_path)``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

REPOSITORY = pathlib.Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--output", default="runs/pretrained_transformer/weights.npz",
                      help="weights file (.npz, .safetensors) or orbax directory (no suffix)")
  parser.add_argument("--overwrite", action="store_true", help="replace existing weights at --output")
  parser.add_argument("--corpus", choices=("grammar", "stackoverflow"), default="grammar")
  parser.add_argument("--data-dir", default=None, help="StackOverflow's files (for --corpus stackoverflow)")
  parser.add_argument("--download", action="store_true", help="fetch StackOverflow's files if missing")
  parser.add_argument("--sentences", type=int, default=20_000, help="grammar corpus: training sentences")
  parser.add_argument("--domain", type=int, default=0, help="grammar corpus: the shared word distribution")
  parser.add_argument("--vocabulary-size", type=int, default=10_000, help="StackOverflow: words kept")
  parser.add_argument("--max-examples", type=int, default=200_000, help="StackOverflow: training sentences used")
  parser.add_argument("--sequence-length", type=int, default=20)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--width", type=int, default=256)
  parser.add_argument("--mlp-width", type=int, default=None)
  parser.add_argument("--dropout", type=float, default=0.0)
  parser.add_argument("--steps", type=int, default=2_000)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--learning-rate", type=float, default=1e-3)
  parser.add_argument("--weight-decay", type=float, default=0.01)
  parser.add_argument("--warmup-steps", type=int, default=100)
  parser.add_argument("--steps-per-dispatch", type=int, default=50)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--fast", action="store_true", help="a tiny model for a few steps: a smoke test")
  args = parser.parse_args(argv)
  for name in ("sentences", "vocabulary_size", "max_examples", "sequence_length", "layers", "heads", "width",
               "steps", "batch_size", "steps_per_dispatch"):
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
  if args.mlp_width is not None and args.mlp_width < 1:
    parser.error(f"--mlp-width must be >= 1, got {args.mlp_width}.")
  if args.warmup_steps < 0 or args.learning_rate <= 0 or args.weight_decay < 0 or not 0 <= args.dropout < 1:
    parser.error("--warmup-steps and --weight-decay must be >= 0, --learning-rate > 0, --dropout in [0, 1).")
  if args.width % args.heads:
    parser.error(f"--width ({args.width}) must be divisible by --heads ({args.heads}).")
  if args.corpus == "stackoverflow" and args.data_dir is None and not args.download:
    parser.error("--corpus stackoverflow needs --data-dir (the reference's files) or --download.")
  if args.fast:
    args.sentences, args.layers, args.heads, args.width = 400, 1, 2, 16
    args.steps, args.steps_per_dispatch, args.batch_size, args.warmup_steps = 20, 10, 8, 2
  args.steps_per_dispatch = min(args.steps_per_dispatch, args.steps)
  return args


def load_corpus(args):
  """``(train examples, test examples, vocabulary size, description)``: pooled ``x``/``y`` int32 arrays."""
  import numpy as np

  from fedjax_lite import datasets

  if args.corpus == "grammar":
    per_client = 1_000
    num_clients = max(1, -(-args.sentences // (per_client - per_client // 10)))
    corpus = datasets.grammar_corpus(num_clients=num_clients, examples_per_client=per_client,
                                     sequence_length=args.sequence_length, domain=args.domain, test_fraction=0.1,
                                     seed=args.seed)
    description = {"corpus": "grammar", "domain": args.domain, "seed": args.seed}
  else:
    corpus = datasets.load_stackoverflow(args.vocabulary_size, args.sequence_length, data_dir=args.data_dir,
                                         download=args.download)
    description = {"corpus": "stackoverflow", "vocabulary_size": args.vocabulary_size}
  train, test = corpus.train.all_examples(), corpus.test.all_examples()
  limit = args.sentences if args.corpus == "grammar" else args.max_examples
  rng = np.random.default_rng(args.seed)
  order = rng.permutation(len(train["x"]))[:limit]
  train = {key: np.asarray(train[key])[order] for key in ("x", "y")}
  test_order = rng.permutation(len(test["x"]))[: max(1, min(len(test["x"]), 10_000))]
  test = {key: np.asarray(test[key])[test_order] for key in ("x", "y")}
  return train, test, len(corpus.vocabulary), description


def model_arguments(args, vocabulary_size: int) -> dict:
  """The ``transformer_lm`` keyword arguments that rebuild the pretrained model (saved beside the weights)."""
  return {"vocab_size": vocabulary_size, "sequence_length": args.sequence_length, "num_layers": args.layers,
          "num_heads": args.heads, "width": args.width, "mlp_width": args.mlp_width,
          "dropout_rate": args.dropout}


def run(args) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from fedjax_lite import algorithms, models
  from fedjax_lite.core.model import masked_loss_and_metric_sums

  output = pathlib.Path(args.output).expanduser().absolute()
  train, test, vocabulary_size, corpus = load_corpus(args)
  arguments = model_arguments(args, vocabulary_size)
  model = models.transformer_lm(**arguments)
  params = model.init(jax.random.key(args.seed))
  schedule = optax.warmup_cosine_decay_schedule(0.0, args.learning_rate, max(args.warmup_steps, 1), args.steps)
  optimizer = optax.adamw(schedule, weight_decay=args.weight_decay)
  opt_state = optimizer.init(params)
  evaluate = algorithms.centralized_evaluation(model, batch_size=256)

  def test_metrics(p) -> dict:
    return {key: float(value) for key, value in models.token_metrics(evaluate(p, test)).items()}

  @jax.jit
  def train_steps(params, opt_state, batches, keys):
    def step(carry, inputs):
      params, opt_state = carry
      batch, key = inputs
      mask = jnp.ones(batch["x"].shape[:1], bool)
      (loss, _), grads = jax.value_and_grad(
          lambda p: masked_loss_and_metric_sums(model, p, batch, mask, key, True), has_aux=True)(params)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), (batches, keys))
    return params, opt_state, losses

  before = test_metrics(params)
  rng = np.random.default_rng(args.seed + 1)
  num_train = len(train["x"])
  order = np.concatenate([rng.permutation(num_train) for _ in range(-(-args.steps * args.batch_size // num_train))])
  start, losses, step = time.time(), [], 0
  while step < args.steps:
    count = min(args.steps_per_dispatch, args.steps - step)
    rows = order[step * args.batch_size:(step + count) * args.batch_size].reshape(count, args.batch_size)
    batches = {key: train[key][rows] for key in ("x", "y")}
    keys = jax.random.split(jax.random.fold_in(jax.random.key(args.seed), step), count)
    params, opt_state, chunk_losses = train_steps(params, opt_state, batches, keys)
    losses.extend(np.asarray(chunk_losses).tolist())
    step += count
    print(f"step {step}/{args.steps}: training loss {np.mean(losses[-count:]):.4f} (sequence_loss: per position)",
          flush=True)
  seconds = time.time() - start
  after = test_metrics(params)
  saved = models.save_params(output, params, overwrite=args.overwrite)
  summary = {"weights": str(saved), "model": arguments, "corpus": corpus,
             "training": {"steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
                          "weight_decay": args.weight_decay, "warmup_steps": args.warmup_steps,
                          "train_sentences": num_train, "seed": args.seed, "seconds": round(seconds, 1),
                          "final_training_loss": float(np.mean(losses[-min(len(losses), 50):]))},
             "num_parameters": int(sum(np.size(leaf) for leaf in jax.tree.leaves(params))),
             "test_before": before, "test_after": after}
  output.with_name(output.name + ".json").write_text(json.dumps(summary, indent=2) + "\n")
  return summary


def main(argv=None) -> int:
  args = parse_args(argv)
  sys.path.insert(0, str(REPOSITORY))
  summary = run(args)
  print(f"saved {summary['weights']} ({summary['num_parameters']:,} parameters); test token accuracy "
        f"{summary['test_before']['accuracy']:.3f} -> {summary['test_after']['accuracy']:.3f}, loss "
        f"{summary['test_before']['loss']:.3f} -> {summary['test_after']['loss']:.3f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
