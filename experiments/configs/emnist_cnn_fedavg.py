"""Named presets of the field's standard federated EMNIST (62 classes) runs, as ``fedjax-lite train`` flags.

* ``fedjax-emnist-conv`` -- FedJAX's EMNIST example (``examples/emnist_fed_avg.py``, the EMNIST_CONV benchmark):
  the CNN with dropout (TFF's ``create_conv_dropout_model``), 10 clients a round, 1 local epoch of batch 20,
  client SGD ``10^-1.5``, server Adam ``10^-2.5``, 1,500 rounds. FedJAX's Adam uses ``eps = 1e-4``; the CLI's
  server Adam uses ``eps = 1e-3`` (Reddi et al.'s default), the only difference.
* ``reddi-emnist-cr-fedadam``, ``...-fedyogi``, ``...-fedavgm``, ``...-fedavg`` -- Reddi et al. 2021, "Adaptive
  Federated Optimization" (arXiv:2003.00295), EMNIST character recognition: same model and cohort, batch 20,
  1 epoch, 1,500 rounds, client sampling seed 1, and the paper's best learning rates (log10 client / server):
  FedAdam and FedYogi -1.5 / -2.5, FedAvgM -1.5 / -0.5 (momentum 0.9), FedAvg -1 / 0. Table 1 reports about
  85% test accuracy for all of them.

Runnable when the data is present (``emnist_all.sqlite`` or its ``.lzma`` in ``--data-dir``, or
``$FEDJAX_LITE_DATA``; see :func:`fedjax_lite.datasets.load_emnist`)::

  python experiments/configs/emnist_cnn_fedavg.py reddi-emnist-cr-fedadam --data-dir ~/data [more train flags]

Flags after the preset name are passed on to ``fedjax-lite train`` and override the preset's (e.g. ``--rounds 10``).
"""

from __future__ import annotations

import sys
from typing import Sequence

_COMMON = ["--dataset", "emnist", "--model", "cnn-dropout", "--clients-per-round", "10", "--local-epochs", "1",
           "--batch-size", "20", "--rounds", "1500", "--algorithm", "fedavg"]


def _lr(log10: float) -> str:
  """A learning rate given as its log10, as a flag value."""
  return repr(10.0 ** log10)


PRESETS: dict[str, list[str]] = {
    "fedjax-emnist-conv": _COMMON + ["--client-lr", _lr(-1.5), "--server-optimizer", "adam",
                                     "--server-lr", _lr(-2.5), "--seed", "0"],
    "reddi-emnist-cr-fedadam": _COMMON + ["--client-lr", _lr(-1.5), "--server-optimizer", "adam",
                                          "--server-lr", _lr(-2.5), "--seed", "1"],
    "reddi-emnist-cr-fedyogi": _COMMON + ["--client-lr", _lr(-1.5), "--server-optimizer", "yogi",
                                          "--server-lr", _lr(-2.5), "--seed", "1"],
    "reddi-emnist-cr-fedavgm": _COMMON + ["--client-lr", _lr(-1.5), "--server-optimizer", "sgdm",
                                          "--server-lr", _lr(-0.5), "--seed", "1"],
    "reddi-emnist-cr-fedavg": _COMMON + ["--client-lr", _lr(-1.0), "--server-optimizer", "sgd",
                                         "--server-lr", _lr(0.0), "--seed", "1"],
}


def preset_argv(name: str, extra: Sequence[str] = ()) -> list[str]:
  """``fedjax-lite`` arguments of preset ``name`` followed by ``extra`` (later flags win in argparse)."""
  if name not in PRESETS:
    raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}.")
  return ["train", *PRESETS[name], *extra]


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] not in PRESETS:
    sys.stderr.write(f"usage: emnist_cnn_fedavg.py {{{','.join(PRESETS)}}} [fedjax-lite train flags]\n")
    return 2
  from fedjax_lite.training.cli import main as cli_main  # pylint: disable=import-outside-toplevel
  return cli_main(preset_argv(argv[0], argv[1:]))


if __name__ == "__main__":
  sys.exit(main())
