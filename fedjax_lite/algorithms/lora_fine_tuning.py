"""Federated fine-tuning of a pretrained model with a frozen base: only the adapters train, travel and aggregate.

Parameter-efficient fine-tuning (LoRA: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022;
federated, e.g. FedIT/FlowerTune, Zhang et al. 2024 arXiv:2305.05644, and FedLLM-Bench, Ye et al. 2024
arXiv:2406.04845) labels the model's parameters ``'global'`` (the adapters) and ``'frozen'`` (the pretrained base:
:func:`fedjax_lite.core.label_params`, e.g. ``models.lora_labels``), and runs FedAvg on the global part:

1. distributor: the server's model ``w = (A, W0)``; only the adapters ``A`` are sent and counted (the round
   template's partitioned round, ``build_round(labels=...)``): every client already holds the base ``W0`` (the
   pretrained checkpoint), which never changes. In the simulation the base is part of the broadcast pytree,
   unbatched over the cohort, so ONE copy serves every client of the round;
2. client work: local steps on ``A`` alone, from ``A``: the model is :func:`fedjax_lite.core.partial_model`
   ``A -> model(A, W0)`` with ``W0`` bound from the broadcast as a traced argument -- the local-training loop
   carries, differentiates and updates the adapters only, never a per-client copy of the base -- and the upload is
   ``delta_i = A - A_i`` with weight ``n_i`` (or 1);
3. aggregator: ``delta = aggregate({delta_i}, {w_i})`` over the adapters' tree only, so the exact upload bits, the
   compression and any DP noise cover the adapters alone (``aggregated_bits`` = the adapters' size per client);
4. finalizer: ``A <- A + server_optimizer(delta)``; ``W0`` is copied through, bit for bit.

The server's params are the whole model (base and adapters), so checkpoints, evaluation and the training loop see
one ordinary model; ``state.finalizer_state`` is the server optimizer's state over the adapters. The difference
from ``fed_avg(model, labels=...)``, which trains the whole model with the frozen part masked by optax
(:func:`fedjax_lite.core.partition_optimizer`), is the client work: there the base is part of the trained params,
carried by every client's local-training loop (under ``vmap``, one copy per client); here it is bound from the
broadcast, one copy for the cohort (``benchmarks/lora_memory.py``).
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import optax

from fedjax_lite.algorithms.fed_avg import (
    FED_AVG_OPTIONS,
    check_model,
    client_weight,
    fed_avg,
    fed_avg_options,
    resolve_aggregator,
    WEIGHTINGS,
)
from fedjax_lite.algorithms.local_training import train_locally
from fedjax_lite.algorithms.optimizers import ScheduledOptimizer, scheduled_optimizer
from fedjax_lite.algorithms.template import (
    Broadcast,
    ClientWork,
    build_round,
    check_optimizer,
    model_distributor,
    optimizer_finalizer,
)
from fedjax_lite.core import validation
from fedjax_lite.core.model import Model
from fedjax_lite.core.param_partition import (
    FROZEN,
    GLOBAL,
    LOCAL,
    LabelSpec,
    label_params,
    partial_model,
    select_params,
)
from fedjax_lite.core.process import Process
from fedjax_lite.core.records import ClientOutput
from fedjax_lite.core.tree import PyTree

__all__ = ["frozen_base_training_work", "lora_fine_tuning"]

HANDLED_OPTIONS = ("client_optimizer", "client_learning_rate", "server_optimizer", "weighting", "aggregator",
                   "client_grad_clip_norm", "server_midpoint_fraction", "gradient_correction", "broadcast_encoder",
                   "runner")


def _labels(params: PyTree, labels: LabelSpec) -> PyTree:
  """The label tree, which must have global (trained) and frozen parameters only."""
  tree = label_params(params, labels)
  used = set(jax.tree.leaves(tree))
  if LOCAL in used or GLOBAL not in used:
    raise ValueError(f"fine-tuning with a frozen base needs labels 'global' (the adapters, trained and uploaded) "
                     f"and 'frozen' (the base) only; got labels {sorted(used)} ('local' parameters are the "
                     "personalization algorithms').")
  return tree


def frozen_base_training_work(model: Model, labels: LabelSpec, optimizer: ScheduledOptimizer, *,
                              weighting: str = "num_examples", gradient_correction=None) -> ClientWork:
  """The client work of :func:`lora_fine_tuning`: local steps on the global part (the adapters) of
  ``broadcast.params`` with the frozen part bound (:func:`~fedjax_lite.core.partial_model`); uploads
  ``delta = A - A_i`` over the adapters' tree (the params' structure, ``None`` at frozen positions).

  ``gradient_correction(broadcast, client_state)``, when given, is chained before the client optimizer and sees
  the adapters' gradients only (e.g. FedProx's proximal term on the adapters).
  """

  def work(broadcast: Broadcast, client_data: PyTree, client_state: PyTree, rng: jax.Array) -> ClientOutput:
    tree = _labels(broadcast.params, labels)
    adapters = select_params(broadcast.params, tree, GLOBAL)
    partial = partial_model(model, tree, {FROZEN: select_params(broadcast.params, tree, FROZEN)})
    corrections = () if gradient_correction is None else (gradient_correction(broadcast, client_state),)
    final, metric_sums = train_locally(partial, optimizer.for_round(broadcast.hparams, *corrections), adapters,
                                       client_data, rng)
    delta = jax.tree.map(jnp.subtract, adapters, final)
    return ClientOutput(update=delta, weight=client_weight(weighting, metric_sums), metrics=metric_sums)

  return work


def lora_fine_tuning(model: Model, labels: LabelSpec, **options) -> Process:
  """Builds federated fine-tuning with a frozen base (LoRA): FedAvg on the ``'global'`` parameters (the adapters),
  the ``'frozen'`` ones (the pretrained base) shared by the cohort and never trained, uploaded or counted.

  See the module docstring for the round. ``process.init(params)`` takes the WHOLE model (the pretrained base with
  its adapters, e.g. ``models.load_params(path, model.init(key), missing_ok=models.is_lora_path)``); the state's
  params stay the whole model, the base bit-identical round after round.

  Args:
    model: the full model (e.g. ``models.transformer_lm(..., lora_rank=8)``).
    labels: which parameters are the adapters: a label tree (``models.lora_labels(params)``), a function of the
      parameter's path, e.g. ``lambda path: 'global' if models.is_lora_path(path) else 'frozen'``; labels
      ``'global'`` and ``'frozen'`` only.
    **options: the options of :func:`~fedjax_lite.algorithms.fed_avg` (``client_optimizer``,
      ``client_learning_rate``, ``server_optimizer``, ``weighting``, ``aggregator``, ``client_grad_clip_norm``,
      ``server_midpoint_fraction``, ``gradient_correction``, ``runner``, and ``broadcast_encoder``, which encodes
      the adapters only), with their meanings and defaults, applied to the adapters.

  Returns:
    ``Process(init, next)``; ``next(state, round_data, rng) -> RoundOutput(state, metrics, None)`` with fed_avg's
    metrics; ``aggregated_bits`` is the adapters' exact size per client (with the default aggregator) and
    ``broadcasted_bits`` the adapters' plus the round's hyperparameters.

  Example::

    model = models.transformer_lm(vocab_size=..., lora_rank=8)
    params = models.load_params('pretrained.npz', model.init(key), missing_ok=models.is_lora_path)
    process = algorithms.lora_fine_tuning(model, models.lora_labels(params), client_optimizer=optax.adam,
                                          client_learning_rate=1e-3)
    state = process.init(params)
  """
  check_model(model)
  if not (isinstance(labels, str) or callable(labels)):  # a label tree: checked now (a function: at the first round)
    _labels(jax.tree.map(lambda _: 0, labels), labels)
  # fed_avg's options this round applies; any other (one added to fed_avg later, e.g. a partition of its own) is
  # refused by name rather than ignored.
  unhandled = tuple(name for name in FED_AVG_OPTIONS if name not in HANDLED_OPTIONS)
  options = fed_avg_options("lora_fine_tuning", options, sets=unhandled)
  bound = inspect.signature(fed_avg).bind(model, **options)
  bound.apply_defaults()
  option = bound.arguments
  optimizer = scheduled_optimizer(option["client_optimizer"], option["client_learning_rate"],
                                  grad_clip_norm=option["client_grad_clip_norm"])
  server_optimizer = optax.sgd(1.0) if option["server_optimizer"] is None else option["server_optimizer"]
  check_optimizer("server_optimizer", server_optimizer)
  weighting = option["weighting"]
  validation.check_choice("weighting", weighting, WEIGHTINGS)
  validation.check_float("server_midpoint_fraction", option["server_midpoint_fraction"], low=0.0, high=1.0,
                         low_inclusive=False, allow_none=True)
  if option["server_midpoint_fraction"] is not None:
    server_optimizer = optax.chain(server_optimizer, optax.scale(option["server_midpoint_fraction"]))
  if option["gradient_correction"] is not None and not callable(option["gradient_correction"]):
    raise TypeError(f"gradient_correction must be a function (broadcast, client_state) -> optax "
                    f"GradientTransformation, got {type(option['gradient_correction']).__name__}.")

  return build_round(
      frozen_base_training_work(model, labels, optimizer, weighting=weighting,                              # 2.
                                gradient_correction=option["gradient_correction"]),
      distributor=model_distributor(),                                                                      # 1.
      client_optimizer=optimizer,                                                                           #    rate
      aggregator=resolve_aggregator(option["aggregator"], weighted=weighting == "num_examples"),            # 3.
      finalizer=optimizer_finalizer(server_optimizer),                                                      # 4.
      labels=labels,  # only the adapters are broadcast (and encoded), uploaded, counted and stepped
      broadcast_encoder=option["broadcast_encoder"],
      runner=option["runner"],
  )
