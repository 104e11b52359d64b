"""The ``fedjax-lite`` command line: ``fedjax-lite train`` runs a federated training job end to end.

With no flags it trains the original FedAvg CNN (McMahan et al. 2017) with FedAvg on scikit-learn's handwritten
digits split into 50 non-IID clients (2 label shards each), 10 clients a round, evaluating on a held-out test set;
it shows a progress bar, writes per-round metrics (JSON lines), a PNG plot and a JSON summary to the output
directory, and ends with a one-line summary (``--json`` prints the summary as JSON instead).

Datasets read from files (``--dataset emnist``, ...) are looked for in ``--data-dir`` and the cache; ``--download``
fetches them when they are not on disk (with a progress bar for large files), and a missing file's message names
the flags that fix it. ``fedjax-lite --version`` prints the versions of fedjax_lite, JAX and Python.

Bad flags give one line on stderr and exit code 2: unknown values, flags that do not apply to the chosen
algorithm, aggregator or dataset (e.g. ``--trim-fraction`` without ``--aggregator trimmed-mean``), an output path
that is a file or cannot be written (checked before any training). With ``--checkpoint-dir DIR`` the run saves
checkpoints (every ``--checkpoint-every`` rounds, at the end, and on SIGINT/SIGTERM, after which it exits with 128 +
the signal number); ``--resume`` continues the run in DIR and ends bit-identical to an uninterrupted one, or refuses
(exit 2) flags that would change the results, naming each (``--algorithm: "scaffold" in the checkpoint, "fedavg"
now``). A DIR another run writes (its lock file), or one that cannot be written, is refused with exit 2; a checkpoint
that cannot be written mid-run (full disk, read-only folder) ends the run with exit 1, the previous checkpoint and the
finished rounds' metrics intact. Every such fault is one line (``fedjax-lite: error: ...``); warnings are one line
each (``fedjax-lite: warning: ...``, e.g. a damaged checkpoint set aside), and orbax's own logs are not shown.

Privacy: ``--aggregator dp`` trains with user-level DP, by ``--dp-strategy``: ``gaussian`` is DP-FedAvg (Poisson
sampling, the Gaussian mechanism); ``tree``, ``blt``, ``banded`` and ``toeplitz`` are DP-FTRL with that noise
(``algorithms.dp_ftrl``: the tree in shuffled epochs; the matrix factorizations in fixed cyclic groups, planned for
``--rounds``); with ``--algorithm fedbuff`` it is the Gaussian mechanism over each buffer of ``K`` updates, its epsilon
one unamplified event per server step (``training.fed_buff_privacy``). ``--audit-canaries N`` adds N canary clients (and holds out N more) and, after training, writes the
one-shot audit's empirical epsilons (``privacy.audit``) beside the accountant's epsilon.
``--example-dp-clip C --example-dp-noise Z`` makes every local step a DP-SGD step (``algorithms.ExampleDp``) and
records the example-level epsilon every round (``privacy.example_level_epsilon``; beside the user-level one when
``--aggregator dp`` is on too).

Compressed uploads (the FedAvg family): ``--upload-compression topk|randomk|randomk-shared|sign`` compresses each
client's update (``fed_avg(upload_compressor=...)``, ``--compression-fraction``; ``randomk-shared``'s entries are
common to the round's clients, so it composes with ``--aggregator secure``), ``--error-feedback`` keeps each
client's residual in the client states (checkpointed), and ``sketch`` is FetchSGD's count sketch
(``aggregators.count_sketch``, ``--sketch-width``, ``--sketch-depth``); ``aggregated_bits`` counts the encoded
messages.

Fine-tuning: ``--init-from CKPT`` starts from saved weights (``models.load_params``); ``--model transformer
--init-from CKPT --lora-rank R`` fine-tunes a pretrained ``models.transformer_lm`` (its architecture read from
``CKPT.json``, as ``experiments/pretrain_transformer.py`` writes it) by training and uploading only rank-R LoRA
adapters, the base frozen (``algorithms.lora_fine_tuning``); ``--dataset grammar`` is a generated corpus with
per-client shifts (``--grammar-domain``, ``--grammar-shift``).

Client systems (:mod:`fedjax_lite.systems`, ``docs/systems.md``): ``--systems lognormal|constant|TRACE`` runs
synchronous rounds on a simulated clock (``systems/elapsed_hours`` in every record, the plot against simulated
hours), with ``--dropout P`` (lognormal or constant populations), ``--over-selection F``, ``--deadline SECONDS`` and
``--partial-work``. ``--algorithm fednova`` (``--client-momentum``) and ``--algorithm qffl`` (``--qffl-q``,
``--qffl-lipschitz``) are FedNova and q-FFL.

Many processes (:mod:`fedjax_lite.training.distributed`): every process runs the same command with
``--coordinator-address HOST:PORT --num-processes N --process-id K`` (or the ``FEDJAX_LITE_*`` environment
variables), plus ``--local-devices D`` on CPU; the clients of each round are split over every device of every
process, each process packs only its own clients, and only process 0 writes files and prints the summary.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Iterator, NamedTuple, Sequence

EXIT_USAGE = 2

DATASETS = ("digits", "synthetic", "emnist", "shakespeare", "stackoverflow", "cifar100", "grammar")  # +"tfds:NAME"
TEXT_DATASETS = ("shakespeare", "stackoverflow")
MODELS = ("cnn", "mlp", "dense", "cnn-dropout", "lstm", "resnet18", "transformer")
LANGUAGE_MODEL_DATASETS = ("grammar", "shakespeare", "stackoverflow")  # --model transformer's
ALGORITHMS = ("fedavg", "fedsgd", "fedprox", "scaffold", "mimelite", "mime", "fedadam", "fedyogi", "fedadagrad",
              "fedavgm", "fednova", "qffl", "fedbuff")
SYSTEMS_MODELS = ("lognormal", "constant")  # or the path of a trace file (CSV or JSON)
ADAPTIVE_ALGORITHMS = ("fedadam", "fedyogi", "fedadagrad")
# The server learning rate when --server-lr is not given (Reddi et al. 2021's EMNIST range for the adaptive ones).
DEFAULT_SERVER_LR = {"fedsgd": 0.1, "fedadam": 0.01, "fedyogi": 0.01, "fedadagrad": 0.1}
SERVER_OPTIMIZERS = ("sgd", "sgdm", "adam", "adagrad", "yogi")
AGGREGATORS = ("mean", "robust", "dp", "compression", "secure", "median", "trimmed-mean", "krum", "multi-krum")
PARTITIONS = ("shards", "dirichlet", "iid")
DP_STRATEGIES = ("gaussian", "tree", "blt", "banded", "toeplitz")
MATRIX_FACTORIZATION_STRATEGIES = ("blt", "banded", "toeplitz")  # planned for --rounds, in fixed cyclic groups
RUNNER_STRATEGIES = ("auto", "sequential", "vmap", "chunked")
# fed_avg's builders: they take its upload_compressor and example_dp options.
FED_AVG_FAMILY = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm")
UPLOAD_COMPRESSIONS = ("none", "topk", "randomk", "randomk-shared", "sign", "sketch")
COMPRESSION_AGGREGATORS = ("mean", "robust", "dp")  # sum-based, counting the sparse message (aggregators.compressed)


class UsageError(Exception):
  """A bad command line: reported in one line with exit code 2."""


class _Parser(argparse.ArgumentParser):

  def error(self, message: str):  # one line, no usage dump
    raise UsageError(message)


def number_type(kind: type, description: str, accept: Callable[[float], bool]) -> Callable[[str], float]:
  """An argparse ``type=``: the text parsed as ``kind`` (``int`` or ``float``, a float must be finite) and kept when
  ``accept(value)``; otherwise ``ArgumentTypeError("expected {description}, got '...'")``. The benchmarks'
  command lines use these parsers too."""

  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected {description}, got {text!r}") from None
    if (kind is float and not math.isfinite(value)) or not accept(value):
      raise argparse.ArgumentTypeError(f"expected {description}, got {text!r}")
    return value

  return parse


positive_int = number_type(int, "a positive integer", lambda value: value >= 1)
nonnegative_int = number_type(int, "a non-negative integer", lambda value: value >= 0)
positive_float = number_type(float, "a positive finite number", lambda value: value > 0)
nonnegative_float = number_type(float, "a non-negative finite number", lambda value: value >= 0)


def _trim_fraction(text: str) -> float:
  value = nonnegative_float(text)
  if value >= 0.5:
    raise argparse.ArgumentTypeError(f"expected a number in [0, 0.5), got {text!r}")
  return value


def _bits(text: str) -> int:
  value = positive_int(text)
  if value > 16:
    raise argparse.ArgumentTypeError(f"expected an integer in 1..16, got {text!r}")
  return value


def _bits_or_zero(text: str) -> int:
  value = nonnegative_int(text)
  if value > 16:
    raise argparse.ArgumentTypeError(f"expected an integer in 0..16, got {text!r}")
  return value


def _fraction(text: str) -> float:
  value = positive_float(text)
  if value >= 1:
    raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
  return value


_momentum = number_type(float, "a momentum in [0, 1)", lambda value: 0.0 <= value < 1.0)
_dropout = number_type(float, "a probability in [0, 1)", lambda value: 0.0 <= value < 1.0)
_over_selection = number_type(float, "a factor >= 1", lambda value: value >= 1.0)


def _systems_source(text: str) -> str:
  if text in SYSTEMS_MODELS or os.path.isfile(text):
    return text
  raise argparse.ArgumentTypeError(f"must be one of {', '.join(SYSTEMS_MODELS)} or a trace file (CSV or JSON), got "
                                   f"{text!r} (no such file)")


def _log_formats(text: str) -> tuple[str, ...]:
  from fedjax_lite.training.tracking import LOG_FORMATS, parse_log_formats

  try:
    return parse_log_formats(text, LOG_FORMATS + ("png", "wandb"))
  except ValueError as error:
    raise argparse.ArgumentTypeError(str(error)) from None


def _dataset_name(text: str) -> str:
  if text in DATASETS or (text.startswith("tfds:") and len(text) > len("tfds:")):
    return text
  raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(DATASETS)}, tfds:NAME)")


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="fedjax-lite", description="Federated learning simulations in JAX.")
  parser.add_argument("--version", action="store_true",
                      help="print the versions of fedjax_lite, JAX, jaxlib and Python, and exit")
  commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
  train = commands.add_parser("train", help="run a federated training job")
  data = train.add_argument_group("data")
  data.add_argument("--dataset", type=_dataset_name, default="digits",
                    metavar="{" + ",".join(DATASETS) + ",tfds:NAME}",
                    help="digits, synthetic and grammar (generated sentences, for --model transformer) are built in; emnist (62 classes), shakespeare, stackoverflow and "
                         "cifar100 read the reference's files from --data-dir; tfds:NAME a prepared TFDS dataset")
  data.add_argument("--data-dir", default=None,
                    help="folder with the dataset's files (default: $FEDJAX_LITE_DATA or ~/.cache/fedjax_lite)")
  data.add_argument("--download", action="store_true",
                    help="fetch the dataset when it is not on disk: the reference's files for emnist, shakespeare, "
                         "stackoverflow and cifar100 (sha256-checked, into the cache), TFDS's download and "
                         "preparation for tfds:NAME")
  data.add_argument("--num-clients", type=positive_int, default=50, help="clients in the population")
  data.add_argument("--partition", choices=PARTITIONS, default="shards",
                    help="how digits are split into clients (shards: McMahan's non-IID split)")
  data.add_argument("--dirichlet-alpha", type=positive_float, default=0.5)
  data.add_argument("--test-fraction", type=_fraction, default=0.2,
                    help="held out for testing: of each class (digits), of each client's examples (synthetic)")
  data.add_argument("--grammar-domain", type=nonnegative_int, default=0,
                    help="--dataset grammar (generated sentences, datasets.grammar_corpus): the shared word "
                         "distribution")
  data.add_argument("--grammar-shift", type=_fraction, default=0.0,
                    help="--dataset grammar: how far each client's word choice moves from the shared one, in [0, 1]")
  model = train.add_argument_group("model and algorithm")
  model.add_argument("--model", choices=MODELS, default="cnn")
  model.add_argument("--algorithm", choices=ALGORITHMS, default="fedavg",
                     help="fedavg; fedsgd; fedprox (--proximal-strength); scaffold (per-client control variates); "
                          "mimelite, mime (client steps with the server's momentum, --base-momentum); fedadam, "
                          "fedyogi, fedadagrad (adaptive server, --adaptivity); fedavgm (--server-momentum); fedbuff "
                          "(asynchronous buffered aggregation on simulated client systems, --systems or log-normal, "
                          "--rounds server steps, --fedbuff-*)")
  model.add_argument("--fedbuff-concurrency", type=positive_int, default=None, metavar="C",
                     help="FedBuff: clients training at once (default 2 x --clients-per-round, at most the clients "
                          "minus K - 1)")
  model.add_argument("--fedbuff-buffer-size", type=positive_int, default=None, metavar="K",
                     help="FedBuff: client updates per server step (default --clients-per-round)")
  model.add_argument("--fedbuff-max-staleness", type=nonnegative_int, default=None,
                     help="FedBuff: updates staler than this many server steps are dropped (default "
                          "4 x ceil(concurrency / K))")
  model.add_argument("--proximal-strength", type=nonnegative_float, default=0.01,
                     help="FedProx's mu (>= 0)")
  model.add_argument("--server-momentum", type=_fraction, default=0.9, help="FedAvgM's server momentum")
  model.add_argument("--adaptivity", type=positive_float, default=1e-3,
                     help="tau of FedAdam/FedYogi/FedAdagrad (Reddi et al. 2021)")
  model.add_argument("--base-momentum", type=_fraction, default=0.9,
                     help="momentum of Mime/MimeLite's base optimizer (SGD with the client learning rate)")
  model.add_argument("--client-momentum", type=_momentum, default=0.0,
                     help="FedNova's client heavy-ball momentum rho (its a_i vectors)")
  model.add_argument("--qffl-q", type=nonnegative_float, default=1.0,
                     help="q-FFL's fairness parameter q (0: FedAvg's objective)")
  model.add_argument("--qffl-lipschitz", type=positive_float, default=None,
                     help="q-FFL's Lipschitz estimate L (default 1 / --client-lr, as the paper's code)")
  model.add_argument("--aggregator", choices=AGGREGATORS, default="mean",
                     help="mean; robust (adaptive zeroing + clipping); dp (adaptive-clip Gaussian DP, unweighted); "
                          "compression (robust + 8-bit quantized upload); secure (simulated SecAgg); median; "
                          "trimmed-mean; krum, multi-krum (Blanchard et al. 2017, --num-byzantine)")
  model.add_argument("--num-byzantine", type=nonnegative_int, default=1,
                     help="f, the Byzantine clients --aggregator krum/multi-krum tolerates (needs clients-per-round "
                          "> 2f + 2)")
  model.add_argument("--trim-fraction", type=_trim_fraction, default=0.1,
                     help="per-side fraction dropped by --aggregator trimmed-mean, in [0, 0.5)")
  model.add_argument("--quantization-bits", type=_bits, default=8,
                     help="bits of --aggregator compression, 1..16")
  privacy = train.add_argument_group("differential privacy (--aggregator dp: user-level DP-FedAvg with Poisson "
                                     "sampling of clients at rate clients-per-round / num-clients, or DP-FTRL "
                                     "with --dp-strategy)")
  privacy.add_argument("--dp-strategy", choices=DP_STRATEGIES, default="gaussian",
                       help="gaussian: DP-FedAvg; tree: DP-FTRL with tree aggregation (clients in shuffled epochs, "
                            "needs --dp-clip); blt, banded, toeplitz: DP-FTRL with matrix-factorization noise "
                            "(jax_privacy, the [dp_mf] extra), planned for --rounds, clients in num-clients // "
                            "clients-per-round fixed groups visited in turn (each client once every that many "
                            "rounds); BLT's plan is optimized at the start (up to a minute on a CPU)")
  privacy.add_argument("--dp-noise-multiplier", type=positive_float, default=0.5,
                       help="total noise multiplier z (adaptive clipping splits it); with a matrix-factorization "
                            "--dp-strategy, of one participation")
  privacy.add_argument("--dp-delta", type=_fraction, default=1e-3,
                       help="delta of the reported epsilon (user level and --example-dp-clip's example level)")
  privacy.add_argument("--dp-epsilon-budget", type=positive_float, default=None,
                       help="stop before the round that would spend more than this epsilon")
  privacy.add_argument("--dp-accountant", choices=("rdp", "pld"), default="rdp",
                       help="of the user-level and the example-level epsilon")
  privacy.add_argument("--dp-clip", type=positive_float, default=None,
                       help="fixed L2 clip (default: adaptive, the median update norm)")
  privacy.add_argument("--audit-canaries", type=positive_int, default=None, metavar="N",
                       help="privacy audit (Andrew et al. 2024): insert N canary clients whose updates are random "
                            "directions of norm --dp-clip, taking part as the real clients do, hold out N more, and "
                            "after training write the empirical epsilons beside the accountant's in summary.json")
  family = "the FedAvg family: " + ", ".join(FED_AVG_FAMILY)
  compression = train.add_argument_group(f"compressed uploads ({family}; aggregators.sparsification)")
  compression.add_argument("--upload-compression", choices=UPLOAD_COMPRESSIONS, default="none",
                           help="each client compresses its update: topk (its largest entries), randomk (random "
                                "entries; scaled by d/k without --error-feedback), randomk-shared (random entries "
                                "common to the round's clients, drawn from --seed and the round: only the values "
                                "are sent, and they compose with --aggregator secure), sign (scaled sign per layer), "
                                "sketch (FetchSGD's count sketch, the server keeps the k heaviest coordinates; it "
                                "replaces --aggregator mean); the exact message bits are aggregated_bits")
  compression.add_argument("--compression-fraction", type=_fraction, default=0.01, metavar="F",
                           help="topk, randomk, randomk-shared: entries kept, a fraction of the model's; sketch: "
                                "k = ceil(F x the model's parameters) coordinates recovered")
  compression.add_argument("--error-feedback", action="store_true",
                           help="topk, randomk(-shared), sign: each client keeps what it did not send (its "
                                "residual, in the client states, checkpointed) and adds it to its next update (Stich et al. 2018, "
                                "Karimireddy et al. 2019)")
  compression.add_argument("--sketch-width", type=positive_int, default=None, metavar="W",
                           help="sketch: columns of the count sketch (default 10 x k)")
  compression.add_argument("--sketch-depth", type=positive_int, default=5, metavar="D",
                           help="sketch: rows of the count sketch")
  example = train.add_argument_group(f"example-level DP-SGD inside clients ({family}; algorithms.ExampleDp)")
  example.add_argument("--example-dp-clip", type=positive_float, default=None, metavar="C",
                       help="clip every example's gradient to L2 norm C and noise each local step (needs "
                            "--example-dp-noise); the example-level epsilon (at --dp-delta, of a client in every "
                            "round) is recorded each round as privacy/example_epsilon; composes with --aggregator dp "
                            "(user level)")
  example.add_argument("--example-dp-noise", type=positive_float, default=None, metavar="Z",
                       help="noise multiplier of --example-dp-clip: each step adds N(0, (Z C)^2) to the clipped sum")
  model.add_argument("--broadcast-quantization-bits", type=_bits_or_zero, default=0,
                     help="quantize the broadcast model's tensors above 10,000 elements to this many bits "
                          "(0: off)")
  model.add_argument("--weighting", choices=("num_examples", "uniform"), default="num_examples")
  tuning = train.add_argument_group("fine-tuning a pretrained model")
  tuning.add_argument("--init-from", default=None, metavar="CKPT",
                      help="start from these weights (.npz, .safetensors or an orbax directory; nothing is "
                           "downloaded); --model transformer reads its architecture from CKPT.json beside them "
                           "(experiments/pretrain_transformer.py writes both)")
  tuning.add_argument("--lora-rank", type=positive_int, default=None, metavar="R",
                      help="LoRA: train and upload only rank-R adapters on the query and value projections, the "
                           "pretrained base frozen and shared (algorithms.lora_fine_tuning)")
  rounds = train.add_argument_group("rounds")
  rounds.add_argument("--rounds", type=positive_int, default=100)
  rounds.add_argument("--clients-per-round", type=positive_int, default=10)
  rounds.add_argument("--local-epochs", type=positive_int, default=5)
  rounds.add_argument("--batch-size", type=positive_int, default=10)
  rounds.add_argument("--max-local-steps", type=positive_int, default=None)
  rounds.add_argument("--client-lr", type=positive_float, default=0.1)
  rounds.add_argument("--server-optimizer", choices=SERVER_OPTIMIZERS, default="sgd")
  rounds.add_argument("--server-lr", type=positive_float, default=None,
                      help="server learning rate (default 1.0 for FedAvg, 0.1 for FedSGD)")
  rounds.add_argument("--seed", type=nonnegative_int, default=0)
  rounds.add_argument("--runner", choices=RUNNER_STRATEGIES, default="auto",
                      help="how clients run: sequential scan (CPU default), vmap (accelerator default: all the "
                           "round's clients at once), chunked (vmap over --chunk-size clients at a time, for memory)")
  rounds.add_argument("--chunk-size", type=positive_int, default=8, metavar="K",
                      help="clients per vmap chunk of --runner chunked (memory holds K clients at a time; the cohort "
                           "is padded to a multiple of K)")
  rounds.add_argument("--cpu-devices", type=positive_int, default=None, metavar="N",
                      help="XLA:CPU devices, each running its own stream of clients (default: one per usable core, "
                           "at most 8; 1 for a single device); see fedjax_lite.configure_cpu")
  rounds.add_argument("--eval-every", type=positive_int, default=5)
  rounds.add_argument("--rounds-per-dispatch", type=positive_int, default=None, metavar="R",
                      help="whole training on the device: the data copied there once, up to R rounds per "
                           "dispatch with cohorts and shuffles drawn there (default: rounds packed on the host)")
  systems = train.add_argument_group("client systems and simulated time (fedjax_lite.systems, docs/systems.md)")
  systems.add_argument("--systems", type=_systems_source, default=None, metavar="lognormal|constant|TRACE",
                       help="simulate client speeds, bandwidths and availability: FedScale's log-normal model, every "
                            "client alike, or a trace file (CSV or JSON); records systems/elapsed_hours")
  systems.add_argument("--dropout", type=_dropout, default=0.0, metavar="P",
                       help="probability that a selected client goes offline mid-round (lognormal or constant)")
  systems.add_argument("--over-selection", type=_over_selection, default=1.0, metavar="F",
                       help="select ceil(F x --clients-per-round) clients, keep the first to report")
  systems.add_argument("--deadline", type=positive_float, default=None, metavar="SECONDS",
                       help="the round's deadline in simulated seconds")
  systems.add_argument("--partial-work", action="store_true",
                       help="stragglers send the local steps they managed by --deadline")
  output = train.add_argument_group("output")
  output.add_argument("--output-dir", default=None, help="default runs/<dataset>-<model>-<algorithm>-<time>")
  output.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
  output.add_argument("--no-progress", action="store_true", help="hide the progress bar")
  output.add_argument("--log-format", type=_log_formats, default=("jsonl", "png"),
                      help="comma list of what to write in the output directory: jsonl (metrics.jsonl), csv "
                           "(metrics.csv), tensorboard (event files under tensorboard/), png (training.png), "
                           "wandb (Weights & Biases, project $WANDB_PROJECT or fedjax-lite; needs wandb); "
                           "default jsonl,png")
  output.add_argument("--quiet", action="store_true",
                      help="for scripts: no progress bar and no summary line (--json still prints the summary)")
  checkpoints = train.add_argument_group("checkpoints")
  checkpoints.add_argument("--checkpoint-dir", default=None,
                           help="save checkpoints here (every --checkpoint-every rounds, at the end, and on "
                                "SIGINT/SIGTERM)")
  checkpoints.add_argument("--checkpoint-every", type=positive_int, default=10, help="rounds between checkpoints")
  checkpoints.add_argument("--resume", action="store_true",
                           help="continue the run saved in --checkpoint-dir (start afresh if it holds none)")
  hosts = train.add_argument_group("many processes (jax.distributed: run the same command in every process, "
                                   "one per host of a GPU/TPU slice, or several on one CPU machine)")
  hosts.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                     help="process 0's host and a free port, the same for every process (default "
                          "$FEDJAX_LITE_COORDINATOR_ADDRESS; unset: one process)")
  hosts.add_argument("--num-processes", type=positive_int, default=None, help="processes in the run")
  hosts.add_argument("--process-id", type=nonnegative_int, default=None,
                     help="this process's rank, 0 .. --num-processes - 1 (process 0 writes the files)")
  hosts.add_argument("--local-devices", type=positive_int, default=None,
                     help="CPU only: host devices this process exposes (e.g. 1 per core it may use)")
  return parser


# Flags that never change a run's results: not compared when resuming.
# (--data-dir only says where the files are: the data itself is compared by its hash.)
# (The process layout changes only the float summation order.)
_RESULT_NEUTRAL_FLAGS = ("command", "version", "download", "output_dir", "json", "no_progress", "quiet",
                         "log_format", "rounds", "dp_epsilon_budget", "checkpoint_dir", "checkpoint_every", "resume",
                         "data_dir", "coordinator_address", "num_processes", "process_id", "local_devices",
                         "rounds_per_dispatch")  # R does not change results; host vs device sampling is compared


# Flags added after runs could be checkpointed: left out of the configuration at their defaults, so that those runs
# still resume; any other value is recorded and compared like every flag.
_OMITTED_AT_DEFAULT = ("client_momentum", "qffl_q", "qffl_lipschitz", "systems", "dropout", "over_selection",
                       "deadline", "partial_work", "upload_compression", "compression_fraction", "error_feedback",
                       "sketch_width", "sketch_depth", "example_dp_clip", "example_dp_noise")


def _run_config(args) -> dict:
  """The flags that decide the results, by flag name (``--model``: ...), compared when resuming."""
  defaults = vars(build_parser().parse_args(["train"]))
  config = {"--" + name.replace("_", "-"): value for name, value in sorted(vars(args).items())
            if name not in _RESULT_NEUTRAL_FLAGS
            and not (name in _OMITTED_AT_DEFAULT and value == defaults.get(name, object()))}
  if getattr(args, "aggregator", None) == "dp" and getattr(args, "dp_strategy", None) in (
      MATRIX_FACTORIZATION_STRATEGIES):
    config["--rounds"] = args.rounds  # the strategy is planned for the run's rounds
  return config


def _explicit_flags(argv: Sequence[str] | None) -> set[str]:
  """The destinations of the flags given on the command line (not left at their defaults)."""
  parser = build_parser()
  for action in parser._actions:
    if isinstance(action, argparse._SubParsersAction):
      for subparser in action.choices.values():
        for sub_action in subparser._actions:
          sub_action.default = argparse.SUPPRESS
  return set(vars(parser.parse_args(argv))) - {"command"}


# flag destination -> (the setting it needs, whether the args have it)
_FLAG_CONDITIONS = {
    "trim_fraction": ("--aggregator trimmed-mean", lambda a: a.aggregator == "trimmed-mean"),
    "num_byzantine": ("--aggregator krum or multi-krum", lambda a: a.aggregator in ("krum", "multi-krum")),
    "quantization_bits": ("--aggregator compression", lambda a: a.aggregator == "compression"),
    "dp_noise_multiplier": ("--aggregator dp", lambda a: a.aggregator == "dp"),
    "dp_delta": ("--aggregator dp or --example-dp-clip",
                 lambda a: a.aggregator == "dp" or a.example_dp_clip is not None),
    "dp_epsilon_budget": ("--aggregator dp", lambda a: a.aggregator == "dp"),
    "dp_accountant": ("--aggregator dp or --example-dp-clip",
                      lambda a: a.aggregator == "dp" or a.example_dp_clip is not None),
    "dp_clip": ("--aggregator dp", lambda a: a.aggregator == "dp"),
    "dp_strategy": ("--aggregator dp", lambda a: a.aggregator == "dp"),
    "audit_canaries": ("--aggregator dp and a fixed --dp-clip (a canary's update has the clip's norm)",
                       lambda a: a.aggregator == "dp" and a.dp_clip is not None),
    "rounds_per_dispatch": ("a sampler that runs on the device (not --dp-strategy blt, banded or toeplitz: their "
                            "fixed cyclic groups are drawn on the host)",
                            lambda a: a.aggregator != "dp" or a.dp_strategy not in MATRIX_FACTORIZATION_STRATEGIES),
    "broadcast_quantization_bits": ("--algorithm fedavg without --aggregator dp",
                                    lambda a: a.algorithm == "fedavg" and a.aggregator != "dp"),
    "weighting": ("an algorithm with local training whose weights are the clients' (not qffl), without --aggregator "
                  "dp (DP-FedAvg is unweighted)",
                  lambda a: a.algorithm not in ("fedsgd", "qffl") and a.aggregator != "dp"),
    "local_epochs": ("an algorithm with local training (FedSGD takes one gradient per client)",
                     lambda a: a.algorithm != "fedsgd"),
    "client_lr": ("an algorithm with local training (FedSGD has no client optimizer)", lambda a: a.algorithm != "fedsgd"),
    "proximal_strength": ("--algorithm fedprox", lambda a: a.algorithm == "fedprox"),
    "upload_compression": (f"--algorithm {', '.join(FED_AVG_FAMILY)} (fed_avg's upload_compressor), without "
                           "--lora-rank", lambda a: a.upload_compression == "none" or (
                               a.algorithm in FED_AVG_FAMILY and not a.lora_rank)),
    "compression_fraction": ("--upload-compression topk, randomk, randomk-shared or sketch",
                             lambda a: a.upload_compression in ("topk", "randomk", "randomk-shared", "sketch")),
    "error_feedback": ("--upload-compression topk, randomk, randomk-shared or sign (a count sketch keeps no "
                       "residual)", lambda a: a.upload_compression in ("topk", "randomk", "randomk-shared", "sign")),
    "sketch_width": ("--upload-compression sketch", lambda a: a.upload_compression == "sketch"),
    "sketch_depth": ("--upload-compression sketch", lambda a: a.upload_compression == "sketch"),
    "example_dp_clip": (f"--algorithm {', '.join(FED_AVG_FAMILY)} (fed_avg's example_dp), without --lora-rank",
                        lambda a: a.algorithm in FED_AVG_FAMILY and not a.lora_rank),
    "example_dp_noise": ("--example-dp-clip", lambda a: a.example_dp_clip is not None),
    "fedbuff_concurrency": ("--algorithm fedbuff", lambda a: a.algorithm == "fedbuff"),
    "fedbuff_buffer_size": ("--algorithm fedbuff", lambda a: a.algorithm == "fedbuff"),
    "fedbuff_max_staleness": ("--algorithm fedbuff", lambda a: a.algorithm == "fedbuff"),
    "client_momentum": ("--algorithm fednova", lambda a: a.algorithm == "fednova"),
    "qffl_q": ("--algorithm qffl", lambda a: a.algorithm == "qffl"),
    "qffl_lipschitz": ("--algorithm qffl", lambda a: a.algorithm == "qffl"),
    "dropout": ("--systems lognormal or constant (a trace has its own availability)",
                lambda a: a.systems in SYSTEMS_MODELS),
    "over_selection": ("--systems", lambda a: a.systems is not None),
    "deadline": ("--systems", lambda a: a.systems is not None),
    "partial_work": ("--systems and --deadline", lambda a: a.systems is not None and a.deadline is not None),
    "server_momentum": ("--algorithm fedavgm", lambda a: a.algorithm == "fedavgm"),
    "adaptivity": ("--algorithm fedadam, fedyogi or fedadagrad", lambda a: a.algorithm in ADAPTIVE_ALGORITHMS),
    "base_momentum": ("--algorithm mime or mimelite", lambda a: a.algorithm in ("mime", "mimelite")),
    "server_optimizer": ("an algorithm whose server optimizer is not fixed (not fedadam, fedyogi, fedadagrad or "
                         "fedavgm)", lambda a: a.algorithm not in ADAPTIVE_ALGORITHMS + ("fedavgm",)),
    "partition": ("--dataset digits", lambda a: a.dataset == "digits"),
    "data_dir": ("--dataset emnist, shakespeare, stackoverflow, cifar100 or tfds:NAME",
                 lambda a: a.dataset not in ("digits", "synthetic")),
    "download": ("--dataset emnist, shakespeare, stackoverflow, cifar100 or tfds:NAME (digits and synthetic are "
                 "built in)", lambda a: a.dataset not in ("digits", "synthetic")),
    "num_clients": ("--dataset digits, synthetic, grammar or tfds:NAME (the others come with their own clients)",
                    lambda a: a.dataset in ("digits", "synthetic", "grammar") or a.dataset.startswith("tfds:")),
    "test_fraction": ("--dataset digits, synthetic or grammar",
                      lambda a: a.dataset in ("digits", "synthetic", "grammar")),
    "grammar_domain": ("--dataset grammar", lambda a: a.dataset == "grammar"),
    "grammar_shift": ("--dataset grammar", lambda a: a.dataset == "grammar"),
    "lora_rank": ("--model transformer --init-from CKPT --algorithm fedavg, without --aggregator dp",
                  lambda a: (a.model == "transformer" and a.init_from is not None and a.algorithm == "fedavg"
                             and a.aggregator != "dp")),
    "dirichlet_alpha": ("--dataset digits --partition dirichlet",
                        lambda a: a.dataset == "digits" and a.partition == "dirichlet"),
    "checkpoint_every": ("--checkpoint-dir", lambda a: a.checkpoint_dir is not None),
    "chunk_size": ("--runner chunked", lambda a: a.runner == "chunked"),
    "resume": ("--checkpoint-dir", lambda a: a.checkpoint_dir is not None),
}


def check_flags_apply(args, given: set[str]) -> None:
  """Raises ``UsageError`` for a flag given explicitly that the chosen algorithm/aggregator/dataset ignores."""
  for name in sorted(given):
    condition = _FLAG_CONDITIONS.get(name)
    if condition is not None and not condition[1](args):
      raise UsageError(f"--{name.replace('_', '-')} applies only with {condition[0]}")


# Library argument names -> the flags that set them, so that error messages name flags.
_PARAMETER_FLAGS = {
    "epsilon_budget": "--dp-epsilon-budget", "noise_multiplier": "--dp-noise-multiplier", "delta": "--dp-delta",
    "expected_clients_per_round": "--clients-per-round", "clients_per_round": "--clients-per-round",
    "cohort_size": "--clients-per-round", "num_clients": "--num-clients", "alpha": "--dirichlet-alpha",
    "test_fraction": "--test-fraction", "clip": "--dp-clip", "trim_fraction": "--trim-fraction",
    "quantization_bits": "--quantization-bits", "batch_size": "--batch-size", "num_epochs": "--local-epochs",
    "max_steps": "--max-local-steps", "client_learning_rate": "--client-lr", "learning_rate": "--server-lr",
    "num_rounds": "--rounds", "seed": "--seed", "checkpoint_every": "--checkpoint-every",
}


def flag_message(message: str) -> str:
  """``message`` with the library's argument names replaced by the flags that set them."""
  import re

  for internal, public in _INTERNAL_PHRASES:
    message = message.replace(internal, public)
  for pattern, public in _INTERNAL_PATTERNS:
    message = re.sub(pattern, public, message)
  return re.sub(r"(?<![\w-])(" + "|".join(sorted(map(re.escape, _PARAMETER_FLAGS), key=len, reverse=True))
                + r")(?![\w-])", lambda match: _PARAMETER_FLAGS[match.group(1)], message)


# Library messages about settings no flag reaches (partitioner internals), restated in terms of flags.
_INTERNAL_PATTERNS = (
    (r"shards_per_client must be <= len\(labels\) / num_clients = \S+ so that no shard is empty \((\d+) examples, "
     r"(\d+) clients\), got (\d+)\.",
     r"--partition shards gives each client \3 label shards, so the \1 training examples allow at most \1 / \3 "
     r"clients, not \2: lower --num-clients or --test-fraction, or use --partition dirichlet or iid."),
    (r"dirichlet_partition: after max_attempts=(\d+) draws some client still had fewer than min_client_size=\d+ "
     r"examples \(smallest client in the last draw: \d+\)\. Increase alpha \(got (\S+)\), reduce num_clients "
     r"\(got (\d+)\) or min_client_size, or raise max_attempts\.",
     r"--partition dirichlet left some client without examples in \1 draws: raise --dirichlet-alpha (got \2) or "
     r"lower --num-clients (got \3)."),
)

# Phrases of library messages about settings no flag reaches, restated in terms of flags.
_INTERNAL_PHRASES = (
    ("Raise clipped_count_stddev (default 0.05 * expected_clients_per_round) or expected_clients_per_round.",
     "Raise --clients-per-round, or use a fixed --dp-clip."),
    ("must be < 2 * clipped_count_stddev (", "must be, with adaptive clipping, < 0.1 x --clients-per-round ("),
)


# The dataset loaders' advice names Python arguments; on the command line it names the flags that set them, and
# drops what no flag reaches. (`--data_dir` with an underscore is the `tfds` command's own flag: kept.)
_DATASET_PHRASES = (
    (", or pass vocabulary=[...] explicitly", ""),
    ("pass download=True", "add --download"),
    ("pass data_dir=", "pass --data-dir "),
)


def dataset_message(message: str) -> str:
  """A dataset loader's message restated for the command line: ``--download``, ``--data-dir``."""
  import re

  for internal, public in _DATASET_PHRASES:
    message = message.replace(internal, public)
  return re.sub(r"(?<![\w-])data_dir(?![\w-])", "--data-dir", message)


_DISTRIBUTED_FLAGS = ("coordinator_address", "num_processes", "process_id", "local_devices")


def distributed_config(args, given: set[str], environ=None):
  """The :class:`~fedjax_lite.training.distributed.DistributedConfig` of the flags (else of the
  ``FEDJAX_LITE_*`` environment variables), or None for a one-process run; bad combinations are ``UsageError``."""
  from fedjax_lite.training.distributed import DistributedConfig

  if not given & set(_DISTRIBUTED_FLAGS):
    try:
      config = DistributedConfig.from_env(environ)
    except ValueError as error:
      raise UsageError(str(error)) from None
  elif args.coordinator_address is None:
    flag = next(name for name in _DISTRIBUTED_FLAGS if name in given)
    raise UsageError(f"--{flag.replace('_', '-')} applies only with --coordinator-address")
  elif args.num_processes is None or args.process_id is None:
    raise UsageError("--coordinator-address needs --num-processes and --process-id")
  elif args.process_id >= args.num_processes:
    raise UsageError(f"--process-id ({args.process_id}) must be < --num-processes ({args.num_processes})")
  else:
    try:
      config = DistributedConfig(args.coordinator_address, args.num_processes, args.process_id, args.local_devices)
    except ValueError as error:
      raise UsageError(str(error).replace("coordinator_address", "--coordinator-address")) from None
  if config is not None and args.cpu_devices is not None:
    raise UsageError("--cpu-devices applies to one-process runs; with several processes use --local-devices")
  if config is not None and config.num_processes > 1:
    if args.checkpoint_dir is not None:
      raise UsageError("--checkpoint-dir is not supported with several processes yet (one process would write "
                       "a checkpoint of arrays that live on all of them)")
    if args.algorithm == "scaffold":
      raise UsageError("--algorithm scaffold keeps per-client state on one host: run it with one process")
    if args.audit_canaries is not None:
      raise UsageError("--audit-canaries audits on one host: run it with one process")
    if args.error_feedback:
      raise UsageError("--error-feedback keeps per-client residuals on one host: run it with one process")
  return config


def _check_output_path(flag: str, path: str) -> None:
  """A directory flag must name a directory this process can write (one line, exit 2, before any training)."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise UsageError(f"{flag} {path} is a file, not a directory")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as error:
    raise UsageError(f"{flag} {path}: cannot create the directory ({error.strerror or error})") from None
  try:  # a real write: permission bits do not tell (root, read-only mounts, immutable folders, ACLs)
    descriptor, probe = tempfile.mkstemp(prefix=".fedjax-lite-write-test-", dir=path)
    os.close(descriptor)
    os.unlink(probe)
  except OSError as error:
    raise UsageError(f"{flag} {path} is not writable ({error.strerror or error})") from None


def _server_optimizer(name: str, learning_rate: float):
  import optax

  return {
      "sgd": lambda: optax.sgd(learning_rate),
      "sgdm": lambda: optax.sgd(learning_rate, momentum=0.9),
      "adam": lambda: optax.adam(learning_rate, eps=1e-3),
      "adagrad": lambda: optax.adagrad(learning_rate, eps=1e-3),
      "yogi": lambda: optax.yogi(learning_rate, eps=1e-3),
  }[name]()


def _build_aggregator(args):
  """The aggregator named by ``--aggregator`` and whether it needs unweighted FedAvg."""
  from fedjax_lite import aggregators

  weighted = args.weighting == "num_examples"
  name = args.aggregator
  if name == "mean":
    return None, weighted
  if name == "robust":
    return aggregators.robust_aggregator(weighted=weighted), weighted
  if name == "compression":
    return aggregators.compression_aggregator(weighted=weighted, quantization_bits=args.quantization_bits), weighted
  if name == "secure":
    return aggregators.secure_aggregator(weighted=weighted), weighted
  if name == "median":
    return aggregators.coordinate_median(), weighted
  if name in ("krum", "multi-krum"):
    if args.clients_per_round <= 2 * args.num_byzantine + 2:
      raise UsageError(f"--aggregator {name} with --num-byzantine {args.num_byzantine} needs --clients-per-round > "
                       f"{2 * args.num_byzantine + 2}")
    builder = aggregators.krum if name == "krum" else aggregators.multi_krum
    return builder(args.num_byzantine), weighted
  return aggregators.trimmed_mean(args.trim_fraction), weighted


def _load_data(args):
  import numpy as np

  from fedjax_lite.datasets import load_digits, synthetic_leaf

  if args.dataset == "digits":
    digits = load_digits(num_clients=args.num_clients, partition=args.partition, alpha=args.dirichlet_alpha,
                         test_fraction=args.test_fraction, seed=args.seed)
    return digits.train, digits.test, digits.num_classes, tuple(digits.input_shape)
  if args.dataset == "grammar":
    return _load_grammar(args)
  if args.dataset != "synthetic":
    return _load_file_dataset(args)
  population = synthetic_leaf(num_clients=args.num_clients, seed=args.seed)
  train, test = _split_each_client(population, args.test_fraction, args.seed)
  return train, test, 10, tuple(train.element_spec["x"][0])


def _split_each_client(population, test_fraction: float, seed: int):
  """LEAF's split of Synthetic: each client's examples, shuffled, give ``round(test_fraction n)`` (at least one, at
  most ``n - 1``) to a pooled test set and keep the rest. A held-out client would be useless as a test set here:
  every Synthetic(alpha, beta) client has its own teacher, so its labels follow no training client's (a whole
  held-out client measured 0% accuracy)."""
  import numpy as np

  from fedjax_lite.core import FederatedData

  rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
  train_clients, test_parts = {}, []
  for client_id in population.client_ids:
    examples = population[client_id]
    size = len(next(iter(examples.values())))
    order = rng.permutation(size)
    num_test = int(np.clip(round(test_fraction * size), 1, size - 1))
    test_parts.append({key: np.asarray(value)[order[:num_test]] for key, value in examples.items()})
    train_clients[client_id] = {key: np.asarray(value)[order[num_test:]] for key, value in examples.items()}
  test = {key: np.concatenate([part[key] for part in test_parts]) for key in test_parts[0]}
  return FederatedData.from_clients(train_clients), test


def _load_file_dataset(args):
  """The datasets read from files (the reference's, or TFDS's): train clients, centralized test set."""
  import numpy as np

  from fedjax_lite import datasets

  try:
    if args.dataset.startswith("tfds:"):
      name = args.dataset[len("tfds:"):]
      train = datasets.from_tfds(name, split="train", data_dir=args.data_dir, num_clients=args.num_clients,
                                 seed=args.seed, download=args.download)
      test = datasets.from_tfds(name, split="test", data_dir=args.data_dir, num_clients=1, seed=args.seed,
                                download=args.download)
      num_classes = int(max(np.max(train.examples["y"]), np.max(test.examples["y"]))) + 1
      return train, test.all_examples(), num_classes, tuple(train.element_spec["x"][0])
    files = dict(data_dir=args.data_dir, download=args.download)
    loader = {"emnist": lambda: datasets.load_emnist(only_digits=False, **files),
              "shakespeare": lambda: datasets.load_shakespeare(**files),
              "stackoverflow": lambda: datasets.load_stackoverflow(**files),
              "cifar100": lambda: datasets.load_cifar100(**files)}[args.dataset]
    data = loader()
  except (datasets.DatasetNotFoundError, datasets.DatasetFormatError, datasets.MissingDependencyError) as error:
    raise UsageError(dataset_message(str(error))) from None
  return data.train, data.test.all_examples(), data.num_classes, tuple(data.input_shape)


def _check_dataset_labels(train_data, test_data, num_classes: int, dataset: str) -> None:
  """Labels outside the model's classes would train to a NaN loss every round: refuse the dataset in one line
  naming the client, the label and the class count."""
  from fedjax_lite.core.round_data import check_labels

  try:
    check_labels(train_data.examples, num_classes, name="train_data", client_ids=train_data.client_ids,
                 client_offsets=train_data.offsets)
    check_labels(test_data, num_classes, name="test_data")
  except (ValueError, TypeError) as error:
    raise UsageError(f"--dataset {dataset}: {error}") from None


def _build_model(name: str, num_classes: int, input_shape, dataset: str = "digits"):
  from fedjax_lite import models

  if (dataset in TEXT_DATASETS) != (name == "lstm"):
    raise UsageError(f"--dataset {dataset} needs --model lstm" if dataset in TEXT_DATASETS
                     else f"--model lstm needs --dataset {' or '.join(TEXT_DATASETS)}")
  if name in ("lstm", "resnet18"):
    builder_name = {"shakespeare": "shakespeare_lstm", "stackoverflow": "stackoverflow_lstm"}.get(dataset,
                                                                                                  "cifar100_resnet18")
    builder = getattr(models, builder_name, None)
    if builder is None:
      raise UsageError(f"--model {name} is not available in this version of fedjax_lite.models")
    if name == "lstm":  # vocabulary = num_classes - pad - BOS - EOS - 1 OOV bucket
      return builder(vocab_size=num_classes - 4, sequence_length=input_shape[0])
    if len(input_shape) != 3:
      raise UsageError(f"--model resnet18 needs images of shape (height, width, channels), got {input_shape}")
    return builder(num_classes=num_classes, input_shape=input_shape)
  if name in ("cnn", "cnn-dropout") and len(input_shape) < 2:
    raise UsageError(f"--model {name} needs image data; --dataset synthetic has flat features (use mlp or dense)")
  builder = {"cnn": models.original_fedavg_cnn, "mlp": models.mlp, "dense": models.dense_softmax,
             "cnn-dropout": models.cnn_dropout}[name]
  return builder(num_classes=num_classes, input_shape=input_shape)


def _checkpoint_model_arguments(args) -> dict | None:
  """``--model transformer --init-from CKPT``: the ``transformer_lm`` arguments recorded in ``CKPT.json`` (what
  ``experiments/pretrain_transformer.py`` writes beside the weights); None without ``--init-from``."""
  if args.model != "transformer" or args.init_from is None:
    return None
  weights = os.path.abspath(os.path.expanduser(args.init_from.rstrip("/")))
  record = weights + ".json"
  if not os.path.exists(weights):
    raise UsageError(f"--init-from {args.init_from}: no such file or directory (nothing is downloaded)")
  try:
    with open(record) as source:
      arguments = json.load(source)["model"]
  except (OSError, ValueError, KeyError, TypeError) as error:
    raise UsageError(f"--init-from {args.init_from}: --model transformer reads its architecture from {record} "
                     f"(a JSON object with the transformer_lm arguments under 'model', as "
                     f"experiments/pretrain_transformer.py writes): {type(error).__name__}: {error}") from None
  if not isinstance(arguments, dict):
    raise UsageError(f"--init-from {args.init_from}: 'model' in {record} must be a JSON object of transformer_lm "
                     "arguments")
  return arguments


def _load_grammar(args):
  """``--dataset grammar``: generated sentences (``datasets.grammar_corpus``), 200 per client, offline; sentences
  as long as the checkpoint's model takes (20 words without ``--init-from``)."""
  from fedjax_lite import datasets

  arguments = _checkpoint_model_arguments(args) or {}
  corpus = datasets.grammar_corpus(num_clients=args.num_clients, sequence_length=arguments.get("sequence_length", 20),
                                   shift=args.grammar_shift, domain=args.grammar_domain,
                                   test_fraction=args.test_fraction, seed=args.seed)
  return corpus.train, corpus.test.all_examples(), corpus.num_classes, tuple(corpus.input_shape)


def _build_transformer(args, num_classes: int, input_shape):
  """``--model transformer``: ``models.transformer_lm`` for the dataset's vocabulary (the checkpoint's
  architecture with ``--init-from``, else the default one), with rank ``--lora-rank`` adapters."""
  from fedjax_lite import models

  if args.dataset not in LANGUAGE_MODEL_DATASETS:
    raise UsageError(f"--model transformer needs --dataset {', '.join(LANGUAGE_MODEL_DATASETS)}")
  arguments = dict(_checkpoint_model_arguments(args) or {"sequence_length": input_shape[0]})
  vocab_size = num_classes - 4  # pad, BOS, EOS and one OOV bucket besides the words
  if arguments.setdefault("vocab_size", vocab_size) != vocab_size:
    raise UsageError(f"--init-from {args.init_from}: the checkpoint's model has a vocabulary of "
                     f"{arguments['vocab_size']} tokens, --dataset {args.dataset} {vocab_size}")
  if arguments.get("sequence_length") != input_shape[0]:
    raise UsageError(f"--init-from {args.init_from}: the checkpoint's model takes sequences of "
                     f"{arguments.get('sequence_length')} tokens, --dataset {args.dataset} has {input_shape[0]}")
  return models.transformer_lm(**arguments, lora_rank=args.lora_rank or 0)


def _initial_params(args, model):
  """The run's starting params: ``model.init`` at ``--seed``, or the ``--init-from`` weights loaded into them (the
  LoRA adapters, absent from a base checkpoint, keep their initialization)."""
  import jax

  from fedjax_lite import models

  params = model.init(jax.random.key(args.seed))
  if args.init_from is None:
    return params
  try:
    return models.load_params(args.init_from, params, missing_ok=models.is_lora_path if args.lora_rank else None)
  except (OSError, ValueError) as error:
    raise UsageError(f"--init-from {args.init_from}: {error}") from None


def _build_algorithm(args, model, num_clients, server_optimizer, server_lr, aggregator, weighting, encoder, runner,
                     family_options=None):
  """The ``--algorithm``'s process with its knobs; ``family_options`` (``upload_compressor``, ``example_dp``) go to
  the FedAvg family's builders (the flags that set them apply only to those)."""
  import optax

  from fedjax_lite import algorithms

  name, lr = args.algorithm, args.client_lr
  family_options = family_options or {}
  assert not family_options or name in FED_AVG_FAMILY, (name, family_options)  # check_flags_apply's job
  if name == "fedavg":
    return algorithms.fed_avg(model, client_learning_rate=lr, server_optimizer=server_optimizer, weighting=weighting,
                              aggregator=aggregator, broadcast_encoder=encoder, runner=runner, **family_options)
  if name == "fedsgd":
    return algorithms.fed_sgd(model, server_optimizer=server_optimizer, aggregator=aggregator, runner=runner)
  if name == "fedprox":
    return algorithms.fed_prox(model, args.proximal_strength, client_learning_rate=lr,
                               server_optimizer=server_optimizer, weighting=weighting, aggregator=aggregator,
                               runner=runner, **family_options)
  if name == "scaffold":
    return algorithms.scaffold(model, num_clients=num_clients, client_learning_rate=lr,
                               server_optimizer=server_optimizer, weighting=weighting, delta_aggregator=aggregator,
                               runner=runner)
  if name in ("mime", "mimelite"):
    base = optax.sgd(lr, momentum=args.base_momentum or None)
    if name == "mime":
      if args.aggregator != "mean":
        raise UsageError("--algorithm mime averages with the mean (its two passes); use --aggregator mean")
      return algorithms.mime(model, base, server_optimizer=server_optimizer, weighting=weighting, runner=runner)
    return algorithms.mime_lite(model, base, server_optimizer=server_optimizer, weighting=weighting,
                                aggregator=aggregator, runner=runner)
  if name == "fedbuff":
    from fedjax_lite.systems import default_max_staleness

    buffer_size = args.fedbuff_buffer_size or args.clients_per_round
    concurrency = args.fedbuff_concurrency or max(1, min(2 * args.clients_per_round, num_clients - buffer_size + 1))
    max_staleness = (args.fedbuff_max_staleness if args.fedbuff_max_staleness is not None
                     else default_max_staleness(concurrency, buffer_size))
    if concurrency + buffer_size - 1 > num_clients:
      raise UsageError(f"--fedbuff-concurrency + --fedbuff-buffer-size - 1 ({concurrency} + {buffer_size} - 1) "
                       f"exceeds the {num_clients} clients of the population (a client in flight or waiting in the "
                       "buffer cannot start again)")
    return algorithms.fed_buff(model, concurrency=concurrency, buffer_size=buffer_size, max_staleness=max_staleness,
                               client_learning_rate=lr, server_optimizer=server_optimizer, weighting=weighting,
                               aggregator=aggregator, runner=runner)
  if name == "fedavgm":
    return algorithms.fed_avgm(model, server_learning_rate=server_lr, server_momentum=args.server_momentum,
                               client_learning_rate=lr, weighting=weighting, aggregator=aggregator, runner=runner,
                               **family_options)
  if name == "fednova":
    return algorithms.fed_nova(model, client_learning_rate=lr, client_momentum=args.client_momentum,
                               server_optimizer=server_optimizer, weighting=weighting, aggregator=aggregator,
                               runner=runner)
  if name == "qffl":
    if args.aggregator != "mean":
      raise UsageError("--algorithm qffl averages the clients' loss-weighted updates with the mean; use --aggregator "
                       "mean")
    return algorithms.q_ffl(model, args.qffl_q, lipschitz=args.qffl_lipschitz, client_learning_rate=lr,
                            server_optimizer=server_optimizer, runner=runner)
  builder = {"fedadam": algorithms.fed_adam, "fedyogi": algorithms.fed_yogi, "fedadagrad": algorithms.fed_adagrad}[name]
  return builder(model, server_learning_rate=server_lr, client_learning_rate=lr, adaptivity=args.adaptivity,
                 weighting=weighting, aggregator=aggregator, runner=runner, **family_options)


def _build_job(args, mesh=None):
  """Everything the flags describe; argument errors raised here are usage errors (exit code 2)."""
  from fedjax_lite.core import ClientSpec, Runner

  train_data, test_data, num_classes, input_shape = _load_data(args)
  _check_dataset_labels(train_data, test_data, num_classes, args.dataset)
  if args.clients_per_round > train_data.num_clients:
    raise UsageError(f"--clients-per-round ({args.clients_per_round}) exceeds the {train_data.num_clients} "
                     "clients of the population")
  if args.model == "transformer":
    model = _build_transformer(args, num_classes, input_shape)
  elif args.dataset == "grammar":
    raise UsageError("--dataset grammar needs --model transformer")
  else:
    model = _build_model(args.model, num_classes, input_shape, dataset=args.dataset)
  runner = Runner(strategy=args.runner, chunk_size=args.chunk_size, mesh=mesh)
  example_dp = _example_dp(args, model)
  compressor, sketch = _upload_compression(args, model)
  server_lr = args.server_lr if args.server_lr is not None else DEFAULT_SERVER_LR.get(args.algorithm, 1.0)
  server_optimizer = _server_optimizer(args.server_optimizer, server_lr)
  if args.aggregator == "dp" and args.algorithm == "fedbuff":
    recipe = _private_fed_buff(args, model, train_data.num_clients, server_optimizer, server_lr, runner)
    client_spec = ClientSpec(batch_size=args.batch_size, num_epochs=args.local_epochs,
                             max_steps=args.max_local_steps)
    return train_data, test_data, model, recipe.process, client_spec, runner, recipe
  if args.aggregator == "dp":
    if args.algorithm != "fedavg":
      raise UsageError("--aggregator dp runs DP-FedAvg (or DP FedBuff); use it with --algorithm fedavg or fedbuff")
    recipe = _private_recipe(args, model, train_data.num_clients, server_optimizer, runner, example_dp, compressor)
    client_spec = ClientSpec(batch_size=args.batch_size, num_epochs=args.local_epochs,
                             max_steps=args.max_local_steps)
    return train_data, test_data, model, recipe.process, client_spec, runner, recipe
  aggregator, weighted = _build_aggregator(args)
  if sketch is not None:
    aggregator = sketch
  family_options = {name: value for name, value in (("upload_compressor", compressor), ("example_dp", example_dp))
                    if value is not None}
  encoder = None
  if args.broadcast_quantization_bits:
    if args.algorithm != "fedavg":
      raise UsageError("--broadcast-quantization-bits applies to --algorithm fedavg")
    from fedjax_lite.aggregators import broadcast_encoder

    encoder = broadcast_encoder(args.broadcast_quantization_bits, 10000)
  if args.lora_rank:
    from fedjax_lite import algorithms, models

    process = algorithms.lora_fine_tuning(  # the adapters 'global', the pretrained base 'frozen'
        model, lambda path: "global" if models.is_lora_path(path) else "frozen", client_learning_rate=args.client_lr,
        server_optimizer=server_optimizer, weighting="num_examples" if weighted else "uniform",
        aggregator=aggregator, broadcast_encoder=encoder, runner=runner)
  else:
    process = _build_algorithm(args, model, train_data.num_clients, server_optimizer, server_lr, aggregator,
                               "num_examples" if weighted else "uniform", encoder, runner, family_options)
  client_spec = ClientSpec(batch_size=args.batch_size,
                           num_epochs=args.local_epochs if args.algorithm != "fedsgd" else 1,
                           max_steps=args.max_local_steps)
  return train_data, test_data, model, process, client_spec, runner, None


def _example_dp(args, model):
  """``--example-dp-clip C --example-dp-noise Z``: ``algorithms.ExampleDp(l2_clip=C, noise_multiplier=Z)``, or None
  without them; refused for a model with non-trainable state (BatchNorm), as ``fed_avg`` refuses it."""
  if args.example_dp_clip is None:
    return None
  if args.example_dp_noise is None:
    raise UsageError("--example-dp-clip needs --example-dp-noise Z (the noise multiplier of every local step)")
  if model.state_collections:
    raise UsageError(f"--example-dp-clip needs a model without non-trainable state: --model {args.model} has "
                     f"{', '.join(model.state_collections)} (batch statistics mix the examples of a batch, so a "
                     "per-example gradient is not defined)")
  from fedjax_lite.algorithms import ExampleDp

  return ExampleDp(l2_clip=args.example_dp_clip, noise_multiplier=args.example_dp_noise)


def _example_ledger(args, train_data):
  """The example-level :class:`~fedjax_lite.privacy.PrivacyLedger` of ``--example-dp-clip`` (None without): one
  example of a client that takes part in every round, its batches the packing's shuffled epochs
  (``privacy.example_level_run_events``, ``sampling='shuffled'``) at ``--dp-delta`` with ``--dp-accountant``. The
  client's size matters only when epochs do not end on batch boundaries (the bound is then larger): the first
  client whose size ``--batch-size`` does not divide is accounted, else the first client (the bound of every
  client, ``--max-local-steps`` only removing steps)."""
  if args.example_dp_clip is None:
    return None
  from fedjax_lite import privacy

  sizes = [int(size) for size in train_data.client_sizes]
  unaligned = [size for size in sizes if size % args.batch_size]
  run = privacy.example_level_run_events(args.example_dp_noise, num_examples=(unaligned or sizes)[0],
                                         batch_size=args.batch_size, num_epochs=args.local_epochs)
  return privacy.PrivacyLedger(run, args.dp_delta, args.dp_accountant)


def _upload_compression(args, model):
  """``(compressor, sketch aggregator)`` of ``--upload-compression`` (``(None, None)`` for none): a
  ``Compressor`` for ``fed_avg(upload_compressor=...)`` (topk, randomk, sign; ``--error-feedback`` keeps the
  residuals in the client states; random-k with error feedback is unscaled, Stich et al.'s contraction), or
  FetchSGD's count-sketch aggregator (``k = ceil(--compression-fraction x d)`` of the model's ``d`` parameters)."""
  name = args.upload_compression
  if name == "none":
    return None, None
  if name == "sketch" and args.aggregator != "mean":
    raise UsageError("--upload-compression sketch is the aggregator (the server sums the count sketches and keeps "
                     "the k heaviest coordinates): use it with --aggregator mean")
  allowed = COMPRESSION_AGGREGATORS + (("secure",) if name == "randomk-shared" else ())
  if args.aggregator not in allowed:
    raise UsageError(f"--upload-compression {name} needs a sum of the decoded messages whose bits are the sparse "
                     f"message's: --aggregator {', '.join(allowed[:-1])} or {allowed[-1]}, not {args.aggregator}"
                     + ("" if name == "randomk-shared" else " (a secure sum takes only randomk-shared's common "
                        "entries)"))
  if args.error_feedback and args.rounds_per_dispatch is not None:
    raise UsageError("--error-feedback keeps per-client residuals on the host: not with --rounds-per-dispatch")
  from fedjax_lite import aggregators

  fraction, feedback = args.compression_fraction, args.error_feedback
  if name == "topk":
    return aggregators.top_k_compressor(fraction=fraction, error_feedback=feedback), None
  if name == "randomk":
    return aggregators.random_k_compressor(fraction=fraction, unbiased=not feedback, error_feedback=feedback), None
  if name == "randomk-shared":
    return aggregators.shared_random_k_compressor(fraction=fraction, unbiased=not feedback, seed=args.seed,
                                                  error_feedback=feedback), None
  if name == "sign":
    return aggregators.sign_compressor(error_feedback=feedback), None
  k = _sketch_k(args, model)
  return None, aggregators.count_sketch(k=k, width=args.sketch_width or 10 * k, depth=args.sketch_depth,
                                        seed=args.seed)


def _sketch_k(args, model) -> int:
  """``--upload-compression sketch``'s ``k``: ``ceil(--compression-fraction x`` the model's parameters``)``."""
  import jax

  size = sum(int(math.prod(leaf.shape)) for leaf in jax.tree.leaves(jax.eval_shape(model.init, jax.random.key(0))))
  return max(1, math.ceil(args.compression_fraction * size))


def _upload_compression_summary(args, model) -> dict | None:
  """The ``--upload-compression`` settings recorded in summary.json (None without)."""
  if args.upload_compression == "none":
    return None
  if args.upload_compression == "sketch":
    k = _sketch_k(args, model)
    return {"method": "sketch", "fraction": args.compression_fraction, "k": k,
            "width": args.sketch_width or 10 * k, "depth": args.sketch_depth}
  settings = {"method": args.upload_compression, "error_feedback": args.error_feedback}
  if args.upload_compression != "sign":
    settings["fraction"] = args.compression_fraction
  if args.upload_compression in ("randomk", "randomk-shared"):
    settings["unbiased"] = not args.error_feedback
  if args.upload_compression == "randomk-shared":
    settings["mask_seed"] = args.seed
  return settings


class _PrivateRecipe(NamedTuple):
  """``algorithms.PrivateTraining``'s fields, and the audit's ``(inserted, held_out)`` canaries or None."""

  process: Any
  sampler: Any
  ledger: Any
  canaries: tuple | None


def _private_recipe(args, model, num_clients: int, server_optimizer, runner, example_dp=None,
                    upload_compressor=None) -> _PrivateRecipe:
  """``--aggregator dp``: DP-FedAvg (``--dp-strategy gaussian``) or DP-FTRL with the strategy, and with
  ``--audit-canaries N``, 2N canary directions of norm ``--dp-clip`` (the first N inserted as clients that follow
  the recipe's participation, the rest held out)."""
  import jax

  from fedjax_lite.algorithms import dp_fed_avg, dp_ftrl

  if args.dp_strategy == "tree" and args.dp_clip is None:
    raise UsageError("--dp-strategy tree needs a fixed --dp-clip")
  if args.dp_strategy == "tree" and args.dp_accountant != "rdp":
    raise UsageError("--dp-strategy tree is accounted with RDP only: use --dp-accountant rdp")
  canaries = inserted = None
  if args.audit_canaries is not None:
    from fedjax_lite import privacy

    directions = privacy.canary_directions(
        jax.random.fold_in(jax.random.key(args.seed), _CANARY_SEED_STREAM), model.init(jax.random.key(args.seed)),
        2 * args.audit_canaries, norm=args.dp_clip)
    inserted = jax.tree.map(lambda c: c[:args.audit_canaries], directions)
    canaries = (inserted, jax.tree.map(lambda c: c[args.audit_canaries:], directions))
  common = dict(noise_multiplier=args.dp_noise_multiplier, num_clients=num_clients, delta=args.dp_delta,
                client_learning_rate=args.client_lr, server_optimizer=server_optimizer, clip=args.dp_clip,
                epsilon_budget=args.dp_epsilon_budget, accountant=args.dp_accountant, seed=args.seed, runner=runner,
                canaries=inserted, example_dp=example_dp, upload_compressor=upload_compressor)
  try:
    if args.dp_strategy == "gaussian":
      recipe = dp_fed_avg(model, expected_clients_per_round=float(args.clients_per_round), **common)
    else:
      recipe = dp_ftrl(model, clients_per_round=args.clients_per_round, strategy=args.dp_strategy,
                       num_rounds=args.rounds if args.dp_strategy != "tree" else None, **common)
  except ImportError as error:  # the [dp_mf] extra
    raise UsageError(f"--dp-strategy {args.dp_strategy}: {error}") from None
  return _PrivateRecipe(recipe.process, recipe.sampler, recipe.ledger, canaries)


_CANARY_SEED_STREAM = 0xCA9A


def _private_fed_buff(args, model, num_clients: int, server_optimizer, server_lr, runner) -> _PrivateRecipe:
  """``--algorithm fedbuff --aggregator dp``: FedBuff with the Gaussian mechanism over each buffer of ``K`` updates
  (``--dp-clip`` fixed, else adaptive clipping), accounted as one unamplified event per server step
  (:func:`~fedjax_lite.training.fed_buff_privacy`: FedBuff's participation follows the clients' speeds, not
  sampling)."""
  from fedjax_lite import aggregators
  from fedjax_lite.training.buffered_driver import fed_buff_privacy

  if args.dp_strategy != "gaussian":
    raise UsageError(f"--dp-strategy {args.dp_strategy} is DP-FTRL's (synchronous rounds); --algorithm fedbuff "
                     "takes --dp-strategy gaussian")
  if args.audit_canaries is not None:
    raise UsageError("--audit-canaries is not supported with --algorithm fedbuff yet")
  buffer_size = args.fedbuff_buffer_size or args.clients_per_round
  aggregator = (aggregators.gaussian_fixed(args.dp_noise_multiplier, float(buffer_size), args.dp_clip)
                if args.dp_clip is not None
                else aggregators.gaussian_adaptive(args.dp_noise_multiplier, float(buffer_size)))
  process = _build_algorithm(args, model, num_clients, server_optimizer, server_lr, aggregator, "uniform", None,
                             runner)
  ledger = fed_buff_privacy(process, delta=args.dp_delta, accountant=args.dp_accountant,
                            epsilon_budget=args.dp_epsilon_budget)
  return _PrivateRecipe(process, None, ledger, None)


def _audit_summary(private: _PrivateRecipe | None, initial_params, final_params, delta: float) -> dict | None:
  """The one-shot audit of the trained model (``privacy.audit`` on ``initial - final``), or None without
  canaries."""
  if private is None or private.canaries is None:
    return None
  import jax

  from fedjax_lite import privacy

  inserted, held_out = private.canaries
  model_delta = jax.tree.map(lambda start, end: start - end, initial_params, final_params)
  result = privacy.audit(model_delta, inserted, held_out, delta=delta)
  return {"canaries": int(jax.tree.leaves(inserted)[0].shape[0]),
          "epsilon_estimate": result.epsilon_estimate,
          "epsilon_lower_bound": result.epsilon_lower_bound,
          "epsilon_lower_bound_clopper_pearson": result.epsilon_lower_bound_clopper_pearson,
          "confidence": 1 - result.significance}


def _configure_cpu(cpu_devices: int | None, fast_compile: bool = True) -> int | None:
  """``fedjax_lite.configure_cpu`` (one device per core: the fastest measured CPU setup), unless JAX already started
  in this process (``main`` called from Python after JAX use): then its devices are kept, and an explicit
  ``--cpu-devices`` asking for another count is an error. Returns the CPU devices the run uses (None off CPU): the
  count is part of the run's configuration, since the client axis is split over them (float summation order).
  ``fast_compile=False`` (example-level DP-SGD: a Gaussian draw the model's size at every local step) keeps XLA's
  fusion emitters, which draw Gaussians 2.6x faster on jaxlib 0.10."""
  import jax

  from fedjax_lite.core import cpu

  if cpu.backend_initialized():
    if cpu_devices is not None and jax.default_backend() == "cpu" and cpu_devices != jax.local_device_count():
      raise UsageError(f"--cpu-devices {cpu_devices} must take effect before JAX starts, but JAX is already running "
                       f"in this process with {jax.local_device_count()} CPU device(s); run fedjax-lite in a new "
                       "process.")
  else:
    cpu.configure_cpu(cpu_devices, fast_compile=fast_compile)
  return jax.local_device_count() if jax.default_backend() == "cpu" else cpu_devices


def _build_systems(args, train_data, mesh=None):
  """The ``--systems`` flags as a :class:`fedjax_lite.systems.SystemsRounds`, or None without ``--systems``."""
  if args.systems is None:
    return None
  if args.rounds_per_dispatch is not None:
    raise UsageError("--systems plans every round on the host: not with --rounds-per-dispatch")
  if mesh is not None:
    raise UsageError("--systems runs in one process (rounds planned and packed on one host)")
  from fedjax_lite import systems

  availability = systems.RandomDropout(args.dropout) if args.dropout > 0 else systems.AlwaysOn()
  if args.systems == "lognormal":
    population = systems.lognormal_systems(train_data.num_clients, seed=args.seed, availability=availability)
  elif args.systems == "constant":
    population = systems.constant_systems(train_data.num_clients, availability=availability)
  else:
    population = systems.load_trace(args.systems, client_ids=train_data.client_ids)
  policy = systems.RoundPolicy(deadline_seconds=args.deadline, over_selection=args.over_selection,
                               partial_work=args.partial_work)
  return systems.SystemsRounds(population, policy)


def train_command(args, distributed=None) -> dict | None:
  """Runs the job; ``distributed`` (a ``DistributedConfig``) joins a multi-process run first. Returns the summary,
  or None on the processes other than process 0."""
  import jax

  from fedjax_lite.training import distributed as multiprocess

  if distributed is not None:  # before anything starts JAX's backend
    multiprocess.initialize(distributed)
  else:
    args.cpu_devices = _configure_cpu(  # recorded in the run's configuration (checkpoints)
        args.cpu_devices, fast_compile=getattr(args, "example_dp_clip", None) is None)
  mesh = multiprocess.global_client_mesh() if jax.process_count() > 1 else None
  writer = multiprocess.is_writer()

  from fedjax_lite.algorithms import centralized_evaluation
  from fedjax_lite.training.loop import run_training
  from fedjax_lite.training import units
  from fedjax_lite.training.plotting import plot_history
  from fedjax_lite.training.tracking import FILE_NAMES, make_trackers

  try:
    train_data, test_data, model, process, client_spec, runner, private = _build_job(args, mesh)
    simulated = _build_systems(args, train_data, mesh)
    example_ledger = _example_ledger(args, train_data)
  except (ValueError, TypeError) as error:
    raise UsageError(flag_message(str(error))) from None
  if args.algorithm == "fedbuff":
    _check_fed_buff_flags(args, mesh, simulated)
  packing = {}
  if mesh is not None:
    process = multiprocess.distribute_process(process, mesh)
    packing = dict(round_packer=multiprocess.ProcessShard(mesh).packer(client_spec, train_data))
    if not writer:  # process 0 writes the files and prints; the others only compute
      args = argparse.Namespace(**{**vars(args), "log_format": (), "quiet": True, "json": False})

  output_dir = args.output_dir or os.path.join(
      "runs", f"{args.dataset}-{args.model}-{args.algorithm}-{time.strftime('%Y%m%d-%H%M%S')}")
  if writer:
    _check_output_path("--output-dir", output_dir)
  if args.checkpoint_dir is not None:
    _check_output_path("--checkpoint-dir", args.checkpoint_dir)
  checkpointing = {}
  if args.checkpoint_dir is not None:
    checkpointing = dict(checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                         resume=args.resume, config=_run_config(args))
  centralized = centralized_evaluation(model)

  def evaluate(params, examples):
    metrics = dict(centralized(params, examples))
    if "counted_tokens" in metrics:  # sequence models report token ratios as two sums (models.sequence)
      from fedjax_lite.models.sequence import token_metrics

      metrics.update(token_metrics(metrics))
    return metrics
  sampling = (dict(sampler=private.sampler, privacy=private.ledger) if private is not None
              else dict(clients_per_round=args.clients_per_round))

  def report_epsilon(round_num, record):
    if (private is not None or example_ledger is not None) and args.no_progress and not args.quiet:
      user_level = "user-level epsilon" if example_ledger is not None else "epsilon"
      spent = ([f"{user_level} {record['privacy/epsilon']:.4g}"] if private is not None else []) + (
          [f"example-level epsilon {record['privacy/example_epsilon']:.4g}"] if example_ledger is not None else [])
      sys.stderr.write(f"round {round_num}: {', '.join(spent)} at delta {args.dp_delta:g}\n")

  tracked_formats = [name for name in args.log_format if name in ("csv", "tensorboard")]  # jsonl: metrics_path
  trackers = make_trackers(tracked_formats, output_dir) if tracked_formats else ()
  if "wandb" in args.log_format:
    from fedjax_lite.training.tracking import WandbTracker

    try:
      trackers = [*trackers, WandbTracker(os.environ.get("WANDB_PROJECT", "fedjax-lite"),
                                          name=os.path.basename(os.path.normpath(output_dir)),
                                          config=_run_config(args))]
    except ImportError as error:
      raise UsageError(f"--log-format wandb: {error}") from None
  initial_params = _initial_params(args, model)
  if args.algorithm == "fedbuff":
    return _train_fed_buff(args, process, train_data, initial_params, client_spec, runner,
                           lambda params: evaluate(params, test_data), output_dir,
                           None if simulated is None else simulated.systems, trackers=trackers,
                           checkpointing=checkpointing, privacy=None if private is None else private.ledger)
  result = run_training(
      process, train_data, initial_params, client_spec=client_spec,
      num_rounds=args.rounds, seed=args.seed, evaluate=lambda params: evaluate(params, test_data),
      evaluate_every=args.eval_every,
      metrics_path=os.path.join(output_dir, "metrics.jsonl") if "jsonl" in args.log_format else None,
      progress=not (args.no_progress or args.quiet), on_round_end=report_epsilon,
      trackers=trackers, **sampling, **checkpointing, **packing, rounds_per_dispatch=args.rounds_per_dispatch,
      systems=simulated, example_privacy=example_ledger,
  )
  if not writer:
    return None
  plot_path = os.path.join(output_dir, "training.png") if "png" in args.log_format else None
  tracked = sorted({key for record in result.history for key in record
                    if key.startswith("aggregator/") and (key.endswith("_norm") or key.endswith("/clip"))})
  if plot_path is not None:
    plot_history(result.history, plot_path, extra_keys=tracked,
                 x_key="round" if simulated is None else "systems/elapsed_hours",
                 title=f"{args.algorithm} / {args.model} on {args.dataset} ({train_data.num_clients} clients), "
                       f"aggregator {args.aggregator}")
  last = result.history[-1]
  summary = {
      "dataset": args.dataset,
      "model": args.model,
      "algorithm": args.algorithm,
      "rounds": len(result.history),
      "clients_per_round": args.clients_per_round,
      "final_test_accuracy": last.get("evaluation/accuracy"),
      "final_test_loss": last.get("evaluation/loss"),
      "final_train_loss": last.get("client_work/train/loss"),
      "seconds": round(result.seconds, 3),
      "first_round_seconds": round(result.first_round_seconds, 3),
      "median_round_seconds": round(sorted(r["round_time_in_seconds"] for r in result.history)[
          len(result.history) // 2], 4),
      "aggregator": args.aggregator,
      "epsilon": last.get("privacy/epsilon"),
      "delta": last.get("privacy/delta"),
      "dp_strategy": args.dp_strategy if args.aggregator == "dp" else None,
      "audit": _audit_summary(private, initial_params, result.state.params, args.dp_delta),
      "example_dp": (None if example_ledger is None else
                     {"l2_clip": args.example_dp_clip, "noise_multiplier": args.example_dp_noise,
                      "epsilon": last["privacy/example_epsilon"], "delta": last["privacy/example_delta"],
                      "unit": "one example of a client that took part in every round"}),
      "upload_compression": _upload_compression_summary(args, model),
      "stopped_early": result.stopped_early,
      "simulated_hours": last.get("systems/elapsed_hours"),
      "broadcasted_mebibits": units.mebibits(last.get("cumulative_broadcasted_bits", 0)),  # training.units
      "aggregated_mebibits": units.mebibits(last.get("cumulative_aggregated_bits", 0)),
      "aggregated_bits": last.get("cumulative_aggregated_bits"),  # exact: the encoded uploads' bits
      "backend": jax.default_backend(),
      "runner": runner.resolved_strategy(),
      "processes": jax.process_count(),
      "devices": runner.resolved_mesh().size if runner.resolved_mesh() is not None else 1,
      "output_dir": output_dir,
      "metrics_file": os.path.join(output_dir, "metrics.jsonl") if "jsonl" in args.log_format else None,
      "csv_file": os.path.join(output_dir, FILE_NAMES["csv"]) if "csv" in args.log_format else None,
      "tensorboard_dir": (os.path.join(output_dir, FILE_NAMES["tensorboard"]) if "tensorboard" in args.log_format
                          else None),
      "plot_file": plot_path,
  }
  with open(os.path.join(output_dir, "summary.json"), "w") as sink:
    json.dump(summary, sink, indent=2)
  return summary


def _check_fed_buff_flags(args, mesh, simulated) -> None:
  """What ``--algorithm fedbuff`` does not support yet, refused in one line before anything is written."""
  for flag, given in (("--over-selection", args.over_selection != 1.0), ("--deadline", args.deadline is not None),
                      ("--partial-work", args.partial_work)):
    if given:
      raise UsageError(f"{flag} shapes synchronous rounds; --algorithm fedbuff has none (its clients report when "
                       "they finish)")
  if args.rounds_per_dispatch is not None:
    raise UsageError("--rounds-per-dispatch is not supported with --algorithm fedbuff (its steps are planned on the "
                     "host, one dispatch each)")
  if mesh is not None:
    raise UsageError("--algorithm fedbuff runs in one process")


def _train_fed_buff(args, process, train_data, initial_params, client_spec, runner, evaluate, output_dir,
                    population, *, trackers, checkpointing, privacy) -> dict:
  """``--algorithm fedbuff``: ``--rounds`` server steps of :func:`~fedjax_lite.training.run_fed_buff` on the
  ``--systems`` population (``--dropout`` and a trace's availability windows included), by default log-normal
  client systems (FedScale's defaults, seeded by ``--seed``); the same files as the other algorithms (a server step
  in place of a round): metrics.jsonl, the csv/TensorBoard/wandb trackers, training.png (against simulated hours),
  summary.json, and checkpoints with ``--checkpoint-dir`` (``--resume`` continues bit-identically)."""
  import jax

  from fedjax_lite import systems
  from fedjax_lite.training import units
  from fedjax_lite.training.buffered_driver import run_fed_buff
  from fedjax_lite.training.plotting import plot_history
  from fedjax_lite.training.tracking import FILE_NAMES

  run = run_fed_buff(process, train_data, initial_params, client_spec=client_spec, seed=args.seed,
                     num_server_steps=args.rounds,
                     systems=population or systems.lognormal_systems(train_data.num_clients, seed=args.seed),
                     evaluate=evaluate, evaluate_every=args.eval_every,
                     metrics_path=os.path.join(output_dir, "metrics.jsonl") if "jsonl" in args.log_format else None,
                     progress=not (args.no_progress or args.quiet), trackers=trackers, privacy=privacy,
                     **checkpointing)
  history = run.history
  plot_path = os.path.join(output_dir, "training.png") if "png" in args.log_format else None
  if plot_path is not None:
    plot_history(history, plot_path, x_key="fedbuff/elapsed_hours",
                 title=f"fedbuff / {args.model} on {args.dataset} ({train_data.num_clients} clients), "
                       f"aggregator {args.aggregator}")
  last = history[-1]
  summary = {
      "dataset": args.dataset, "model": args.model, "algorithm": args.algorithm, "rounds": len(history),
      "clients_per_round": process.buffer_size, "fedbuff_concurrency": process.concurrency,
      "fedbuff_max_staleness": process.max_staleness,
      "final_test_accuracy": last.get("evaluation/accuracy"), "final_test_loss": last.get("evaluation/loss"),
      "final_train_loss": last.get("client_work/train/loss"), "seconds": round(run.seconds, 3),
      "simulated_hours": last["fedbuff/elapsed_hours"],
      "mean_staleness": sum(r["fedbuff/mean_staleness"] for r in history) / len(history),
      "dropped_stale": sum(r["fedbuff/dropped_stale"] for r in history),
      "dropped_offline": sum(r["fedbuff/dropped_offline"] for r in history),
      "aggregator": args.aggregator, "epsilon": last.get("privacy/epsilon"), "delta": last.get("privacy/delta"),
      "dp_strategy": args.dp_strategy if args.aggregator == "dp" else None, "audit": None,
      "stopped_early": run.stopped_early, "example_dp": None, "upload_compression": None,
      "aggregated_bits": last.get("cumulative_aggregated_bits", 0),
      "broadcasted_mebibits": units.mebibits(last.get("cumulative_broadcasted_bits", 0)),
      "aggregated_mebibits": units.mebibits(last.get("cumulative_aggregated_bits", 0)),
      "backend": jax.default_backend(), "runner": runner.resolved_strategy(), "processes": 1,
      "devices": runner.resolved_mesh().size if runner.resolved_mesh() is not None else 1,
      "output_dir": output_dir,
      "metrics_file": os.path.join(output_dir, "metrics.jsonl") if "jsonl" in args.log_format else None,
      "csv_file": os.path.join(output_dir, FILE_NAMES["csv"]) if "csv" in args.log_format else None,
      "tensorboard_dir": (os.path.join(output_dir, FILE_NAMES["tensorboard"]) if "tensorboard" in args.log_format
                          else None),
      "plot_file": plot_path,
  }
  with open(os.path.join(output_dir, "summary.json"), "w") as sink:
    json.dump(summary, sink, indent=2)
  return summary


# The environment's faults that end a run (exit 1): one line naming the file and the reason.
_ENVIRONMENT_ERRNOS = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EROFS, errno.EACCES, errno.EPERM,
                       errno.EIO)


class _HideOrbaxLogs(logging.Filter):
  """Drops orbax's own log records: a failed save is reported once, in one line, by the CLI."""

  def filter(self, record: logging.LogRecord) -> bool:
    return f"{os.sep}orbax{os.sep}" not in record.pathname


@contextlib.contextmanager
def _one_line_reports() -> Iterator[None]:
  """Warnings as one line each on stderr (``fedjax-lite: warning: ...``), orbax's logs hidden."""
  previous_show, previous_unraisable = warnings.showwarning, sys.unraisablehook

  def show(message, category, filename, lineno, file=None, line=None):
    del category, filename, lineno, line
    (file or sys.stderr).write(f"fedjax-lite: warning: {message}\n")

  def unraisable(report):
    # After a failed save, tensorstore may complete one of orbax's other writes once orbax's event loop is closed;
    # the callback's error is about a write already reported as failed.
    if not (isinstance(report.exc_value, RuntimeError) and str(report.exc_value) == "Event loop is closed"):
      previous_unraisable(report)

  warnings.showwarning, sys.unraisablehook = show, unraisable
  orbax_logs = _HideOrbaxLogs()
  absl_logger = logging.getLogger("absl")  # orbax logs through absl
  absl_logger.addFilter(orbax_logs)
  try:
    yield
  finally:
    warnings.showwarning, sys.unraisablehook = previous_show, previous_unraisable
    absl_logger.removeFilter(orbax_logs)


def version_line() -> str:
  """``fedjax-lite 0.1.0 (jax 0.10.2, jaxlib 0.10.2, Python 3.11.7)``: read from the installed packages' metadata,
  without starting JAX."""
  import importlib.metadata
  import platform

  def installed(name: str) -> str:
    try:
      return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      return "not installed"

  return (f"fedjax-lite {installed('fedjax_lite')} (jax {installed('jax')}, jaxlib {installed('jaxlib')}, "
          f"Python {platform.python_version()})")


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of the ``fedjax-lite`` console script."""
  parser = build_parser()
  try:
    from absl import logging as absl_logging  # dp_accounting logs RDP-order warnings through absl

    absl_logging.set_verbosity(absl_logging.ERROR)
  except ImportError:
    pass
  try:
    with _one_line_reports():
      args = parser.parse_args(argv)
      if args.version:
        print(version_line())
        return 0
      if args.command is None:
        raise UsageError("a command is required: fedjax-lite train [flags] (see fedjax-lite train --help)")
      given = _explicit_flags(argv)
      check_flags_apply(args, given)
      summary = train_command(args, distributed_config(args, given))
  except UsageError as error:
    sys.stderr.write(f"fedjax-lite: error: {error}\n")
    return EXIT_USAGE
  except Exception as error:  # the run's own failures: one line each, no traceback
    from fedjax_lite.training.checkpoint import CheckpointError, CheckpointSaveError, ConfigMismatchError
    from fedjax_lite.training.loop import TrainingStalledError

    if isinstance(error, CheckpointSaveError):  # the environment failed mid-run: not a usage error
      sys.stderr.write(f"fedjax-lite: error: {error}; continue with --resume once it can be written\n")
      return 1
    if isinstance(error, (ConfigMismatchError, CheckpointError)) or (
        isinstance(error, ValueError) and ("already holds checkpoints" in str(error)
                                           or str(error).startswith("rounds_per_dispatch"))):
      message = str(error).replace("pass resume=True", "pass --resume").replace("rounds_per_dispatch",
                                                                                  "--rounds-per-dispatch")
      sys.stderr.write(f"fedjax-lite: error: {message}\n")
      return EXIT_USAGE
    if isinstance(error, TrainingStalledError):
      sys.stderr.write(f"fedjax-lite: error: {error}\n")
      return 1
    if isinstance(error, OSError) and error.errno in _ENVIRONMENT_ERRNOS:
      where = f"{error.filename}: " if error.filename else ""
      sys.stderr.write(f"fedjax-lite: error: {where}{error.strerror or error}\n")
      return 1
    raise
  except KeyboardInterrupt as interrupt:
    from fedjax_lite.training.checkpoint import TrainingInterrupted

    if isinstance(interrupt, TrainingInterrupted):
      sys.stderr.write(f"fedjax-lite: {interrupt}; continue with --resume\n")
      return 128 + int(interrupt.signum)
    raise
  if summary is None:  # a process other than process 0 of a multi-process run
    return 0
  if args.json:
    print(json.dumps(summary))
  elif not args.quiet:
    accuracy = summary["final_test_accuracy"]
    user_level = "user-level epsilon" if summary["example_dp"] is not None else "epsilon"
    privacy = (f", {user_level} {summary['epsilon']:.4g} at delta {summary['delta']:g}"
               if summary["epsilon"] is not None else "")
    if summary["example_dp"] is not None:
      privacy += (f", example-level epsilon {summary['example_dp']['epsilon']:.4g} at delta "
                  f"{summary['example_dp']['delta']:g}")
    print(f"{summary['algorithm']} {summary['model']} on {summary['dataset']}: {summary['rounds']} rounds in "
          f"{summary['seconds']:.1f} s, final test accuracy {accuracy:.4f}{privacy}, results in "
          f"{summary['output_dir']}")
    if summary["stopped_early"]:
      print(f"stopped early: {summary['stopped_early']}")
    audit = summary["audit"]
    if audit is not None:
      clopper_pearson = audit["epsilon_lower_bound_clopper_pearson"]
      print(f"privacy audit ({audit['canaries']} canaries): empirical epsilon {audit['epsilon_estimate']:.4g}, "
            f"lower bounds {audit['epsilon_lower_bound']:.4g} (Gaussian scores)"
            + ("" if clopper_pearson is None else f" and {clopper_pearson:.4g} (Clopper-Pearson)")
            + f" at {audit['confidence']:.0%} confidence; the accountant's upper bound {summary['epsilon']:.4g}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
