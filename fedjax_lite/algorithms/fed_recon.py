"""Federated Reconstruction (Singhal, Sidahmed, Garrett, Wu, Rush & Prakash 2021, "Federated Reconstruction:
Partially Local Federated Learning", NeurIPS, arXiv:2102.03448), as TFF's ``tff.learning.algorithms.
build_fed_recon`` (TFF 0.82, ``learning/algorithms/fed_recon.py``).

The parameters are labelled (:mod:`fedjax_lite.core.param_partition`) ``'global'`` -- trained by every client,
broadcast, uploaded and aggregated -- or ``'local'`` -- never stored and never uploaded: every client RECONSTRUCTS
them from its own data in every round, so clients are stateless (billions of users, clients never seen before).
A round, for the sampled clients:

1. distributor: broadcast the global parameters ``g`` (only they travel and count in the bits);
2. client ``k``: its data are split into a reconstruction part ``D_r`` and a post-reconstruction part ``D_p``
   (:class:`DatasetSplit`, by default TFF's: even-indexed batches reconstruct, odd-indexed ones train);
   (a) the local parameters are initialized fresh (``local_initializer``: by default the model's own
   initializer with a new key, as TFF builds a fresh model on every client) and trained on ``D_r`` with ``g``
   FIXED: ``l <- l - reconstruction_optimizer(grad_l L(g, l; b))``;
   (b) the global parameters are trained on ``D_p`` with ``l`` FIXED (``jointly_train_variables=True``: both,
   with the client optimizer): ``g_k <- g_k - client_optimizer(grad_g L(g_k, l; b))``;
   it uploads ``delta_k = g - g_k`` with weight ``n_k`` = the examples of ``D_p`` (TFF's ``NUM_EXAMPLES``) or 1,
   and forgets ``l``;
3. aggregator: ``delta = aggregate({delta_k}, {n_k})``, by default the weighted mean (TFF's ``MeanFactory``);
4. finalizer: ``g <- server_optimizer(g, delta)``.

The training metrics (``client_work/train``) are those of the post-reconstruction steps only (TFF: "the loss
metric does not include reconstruction batches"), plus ``num_reconstruction_batches`` and
``num_reconstruction_examples``. :func:`fed_recon_evaluation` (TFF's ``build_fed_recon_eval``) evaluates a model
the same way: reconstruct on ``D_r``, evaluate on ``D_p``.

TFF's defaults, kept: client optimizer SGD(0.1), reconstruction optimizer SGD(0.1), server optimizer SGD(1.0),
``dataset_split_fn = build_dataset_split_fn(split_dataset=True)`` (one epoch of each half), client weighting by
the post-reconstruction examples, local variables trained only in the reconstruction stage
(``jointly_train_variables=False``, the option of the research code's ``build_federated_reconstruction_process``;
TFF 0.82 has only this behaviour). A client whose update is non-finite is rejected (weight 0), and a non-finite
aggregate leaves the model unchanged, as TFF's.

Deviations: TFF splits a ``tf.data`` dataset by batch index; here the client's packed batches (its real batches
are a prefix of the step axis) are split the same way, so pack ONE epoch per round (``num_epochs=1``) and set the
epochs in :class:`DatasetSplit`, as with TFF's ``repeat``. TFF's local initial values come from the Keras model's
initializers (fresh variables on every client); here from ``local_initializer(key)`` with the client's own key
``fold_in(client key, LOCAL_INIT_STREAM)``, different for every client and round unless the initializer ignores
it (pass ``lambda key: zeros`` for a deterministic start).

The round is :func:`~fedjax_lite.algorithms.build_round` with ``labels=`` (no ``local_state``): only the global
parameters are broadcast, encoded, uploaded, aggregated, stepped by the server and counted in the bits;
``state.params`` holds the global parameters and the model's initial local values (never changed and never sent:
the clients make their own). ``'frozen'`` parameters (e.g. a pretrained base) are never trained; the clients
receive them with the broadcast, which does not count them in the bits (see the template).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lite.aggregators.base import Aggregator
from fedjax_lite.algorithms.fed_avg import WEIGHTINGS, check_model, client_weight, resolve_aggregator
from fedjax_lite.algorithms.local_training import split_steps, train_locally
from fedjax_lite.algorithms.optimizers import OptimizerFactory, scheduled_optimizer
from fedjax_lite.algorithms.template import (
    Broadcast,
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
    Labels,
    label_params,
    merge_params,
    partial_model,
    select_params,
)
from fedjax_lite.core.process import Process
from fedjax_lite.core.records import ClientOutput
from fedjax_lite.core.runner import Runner
from fedjax_lite.core.tree import PyTree

LOCAL_INIT_STREAM = 0x10CA1      # a client's local initial values use fold_in(client key, LOCAL_INIT_STREAM)
RECONSTRUCTION_STREAM = 0x5EC0   # its reconstruction steps fold_in(client key, RECONSTRUCTION_STREAM)

LocalInitializer = Callable[[jax.Array], PyTree]


class DatasetSplit(NamedTuple):
  """How a client's packed batches are split between reconstruction and post-reconstruction (TFF's
  ``ReconstructionModel.build_dataset_split_fn``), as one pure function of the client's data: :meth:`apply`.

  With ``split_dataset`` the reconstruction part is the client's even-indexed real batches (0, 2, 4, ...) and the
  post-reconstruction part its odd-indexed ones (1, 3, ...); otherwise both parts are all its batches. Each part is
  then repeated ``*_epochs`` times and cut to at most ``*_steps_max`` batches (after the repetition, as TFF's
  ``repeat(epochs).take(steps_max)``). The post-reconstruction part is the training part in :func:`fed_recon` and
  the evaluation part in :func:`~fedjax_lite.algorithms.fed_recon_evaluation`.

  The default is what TFF's ``build_fed_recon`` and ``build_fed_recon_eval`` use when ``dataset_split_fn`` is None
  (``build_dataset_split_fn(split_dataset=True)``; the function's own default is ``split_dataset=False``).

  Attributes:
    recon_epochs: passes over the reconstruction part (>= 1).
    recon_steps_max: optional cap on the reconstruction steps (>= 1), over all its passes.
    post_recon_epochs: passes over the post-reconstruction part (>= 1).
    post_recon_steps_max: optional cap on the post-reconstruction steps (>= 1).
    split_dataset: disjoint halves (True) or all batches for both parts (False).
  """

  recon_epochs: int = 1
  recon_steps_max: int | None = None
  post_recon_epochs: int = 1
  post_recon_steps_max: int | None = None
  split_dataset: bool = True

  def check(self) -> None:
    validation.check_int("recon_epochs", self.recon_epochs, minimum=1)
    validation.check_int("post_recon_epochs", self.post_recon_epochs, minimum=1)
    for name in ("recon_steps_max", "post_recon_steps_max"):
      value = getattr(self, name)
      if value is not None:
        validation.check_int(name, value, minimum=1)
    if not isinstance(self.split_dataset, bool):
      raise TypeError(f"split_dataset must be a bool, got {type(self.split_dataset).__name__}.")

  def apply(self, client_data: PyTree) -> tuple[dict, dict]:
    """``(reconstruction data, post-reconstruction data)`` of ONE client's packed data (jittable).

    Each is packed data of its own static step count (``epochs x`` the batches of the part's parity, capped at
    ``steps_max``) whose real batches are a prefix, as :func:`~fedjax_lite.algorithms.train_locally` expects;
    ``num_examples`` counts the part's real examples over its passes.
    """
    return (self._part(client_data, parity=0, epochs=self.recon_epochs, steps_max=self.recon_steps_max),
            self._part(client_data, parity=1, epochs=self.post_recon_epochs, steps_max=self.post_recon_steps_max))

  def _part(self, client_data: PyTree, *, parity: int, epochs: int, steps_max: int | None) -> dict:
    steps, num_steps = split_steps(client_data)
    total = steps["mask"].shape[0]
    if self.split_dataset:  # the batches 2j + parity, j = 0, 1, ...
      available, real = (total + 1 - parity) // 2, (num_steps + 1 - parity) // 2
      source = lambda j: 2 * j + parity  # noqa: E731
    else:
      available, real = total, num_steps
      source = lambda j: j  # noqa: E731
    length = max(1, epochs * available)
    if steps_max is not None:
      length = min(length, steps_max)
    position = jnp.arange(length, dtype=jnp.int32)
    valid = position < jnp.minimum(epochs * real, length)
    index = jnp.where(valid, source(position % jnp.maximum(real, 1)), 0)
    part = {key: jnp.take(value, index, axis=0) for key, value in steps.items()}
    part["mask"] = part["mask"] & valid[:, None]
    part["num_examples"] = jnp.sum(part["mask"], dtype=jnp.int32)
    return part


def reconstruction_labels(model: Model, labels: LabelSpec) -> Labels:
  """The label tree of ``model``'s params (from the shapes of ``model.init``), checked for reconstruction: some
  ``'global'`` and some ``'local'`` parameters (``'frozen'`` ones allowed)."""
  check_model(model)
  label_tree = label_params(jax.eval_shape(model.init, jax.random.key(0)), labels)
  used = set(jax.tree.leaves(label_tree))
  if GLOBAL not in used or LOCAL not in used:
    raise ValueError(f"Federated Reconstruction needs both 'global' and 'local' parameters; the labels use only "
                     f"{sorted(used)} (all 'global' is FedAvg: algorithms.fed_avg).")
  return label_tree


def default_local_initializer(model: Model, label_tree: Labels) -> LocalInitializer:
  """The local part of ``model.init(key)``: TFF's fresh model on every client, its initializers run anew."""
  return lambda key: select_params(model.init(key), label_tree, LOCAL)


def reconstruct(model: Model, stage: "Reconstruction", received: PyTree, data: PyTree,
                rng: jax.Array) -> tuple[PyTree, dict]:
  """``(full params, metric sums)`` of ONE client's reconstruction: fresh local params
  (``stage.initialize_local(fold_in(rng, LOCAL_INIT_STREAM))``) trained by ``stage.optimizer`` (fresh state) on
  ``data`` with the global and frozen parts of ``received`` fixed (a :func:`~fedjax_lite.core.partial_model`),
  merged with those parts (``received``'s local positions are not read)."""
  labels = stage.labels
  local = stage.initialize_local(jax.random.fold_in(rng, LOCAL_INIT_STREAM))
  local_model = partial_model(model, labels, {GLOBAL: received, FROZEN: received})
  local, sums = train_locally(local_model, stage.optimizer, local, data,
                              jax.random.fold_in(rng, RECONSTRUCTION_STREAM))
  return merge_params({GLOBAL: received, FROZEN: received, LOCAL: local}, labels), sums


class Reconstruction(NamedTuple):
  """The reconstruction stage's settings, shared by training and evaluation (:func:`reconstruction_stage`)."""

  labels: Labels
  optimizer: optax.GradientTransformation
  dataset_split: DatasetSplit
  initialize_local: LocalInitializer


def reconstruction_stage(model: Model, labels: LabelSpec, optimizer: optax.GradientTransformation | None,
                         dataset_split: DatasetSplit | None,
                         local_initializer: LocalInitializer | None) -> Reconstruction:
  """The checked settings with TFF's defaults: the label tree (:func:`reconstruction_labels`), the reconstruction
  optimizer (default ``optax.sgd(0.1)``), the split (default :class:`DatasetSplit` ``()``) and the local
  initializer (default :func:`default_local_initializer`)."""
  label_tree = reconstruction_labels(model, labels)
  optimizer = optax.sgd(0.1) if optimizer is None else optimizer
  check_optimizer("reconstruction_optimizer", optimizer)
  dataset_split = DatasetSplit() if dataset_split is None else dataset_split
  if not isinstance(dataset_split, DatasetSplit):
    raise TypeError(f"dataset_split must be a DatasetSplit, got {type(dataset_split).__name__}.")
  dataset_split.check()
  if local_initializer is not None and not callable(local_initializer):
    raise TypeError(f"local_initializer must be a function key -> local params, got "
                    f"{type(local_initializer).__name__}.")
  return Reconstruction(label_tree, optimizer, dataset_split,
                        local_initializer or default_local_initializer(model, label_tree))


def fed_recon(
    model: Model,
    labels: LabelSpec,
    *,
    client_optimizer: optax.GradientTransformation | OptimizerFactory = optax.sgd,
    client_learning_rate: float | optax.Schedule | None = 0.1,
    reconstruction_optimizer: optax.GradientTransformation | None = None,
    server_optimizer: optax.GradientTransformation | None = None,
    dataset_split: DatasetSplit | None = None,
    weighting: str = "num_examples",
    aggregator: Aggregator | None = None,
    jointly_train_variables: bool = False,
    local_initializer: LocalInitializer | None = None,
    broadcast_encoder: Any | None = None,
    runner: Runner | None = None,
) -> Process:
  """Builds Federated Reconstruction (see the module docstring; TFF's ``build_fed_recon``).

  Args:
    model: the model.
    labels: which parameters are ``'global'``, ``'local'`` (and optionally ``'frozen'``)
      (:func:`fedjax_lite.core.label_params`: a function of the parameter's path, or a label tree), e.g.
      ``lambda path: 'local' if path[0] == 'user' else 'global'`` for the user embeddings of matrix factorization.
    client_optimizer: the post-reconstruction optimizer, an optax transformation or a function of the learning rate
      (default ``optax.sgd``).
    client_learning_rate: its rate, a float or a schedule of the round (default 0.1, TFF's SGD(0.1)); None with a
      transformation.
    reconstruction_optimizer: trains the local params in the reconstruction stage (fresh state every round);
      default ``optax.sgd(0.1)`` (TFF's).
    server_optimizer: applied to the aggregated delta; default ``optax.sgd(1.0)`` (TFF's).
    dataset_split: the reconstruction / post-reconstruction split; default :class:`DatasetSplit` ``()`` (TFF's).
    weighting: ``'num_examples'`` (the post-reconstruction examples; TFF's default) or ``'uniform'``.
    aggregator: aggregator of the global deltas; default the (un)weighted mean per ``weighting``.
    jointly_train_variables: train the local params with the global ones after reconstruction (the client
      optimizer over both); default False (global only, alternating minimization).
    local_initializer: ``key -> local params`` (the params' tree with ``None`` at the global positions); default
      the local part of ``model.init(key)``.
    broadcast_encoder: optional server-to-client compression of the global params.
    runner: the client runner.

  Returns:
    ``Process(init, next)``: ``init(params)`` takes the full params; ``next(state, round_data, rng) ->
    RoundOutput(state, metrics, None)`` (stateless clients). ``state.params`` holds the global params (trained)
    and the initial local and frozen values (unchanged).
  """
  stage = reconstruction_stage(model, labels, reconstruction_optimizer, dataset_split, local_initializer)
  label_tree = stage.labels
  optimizer = scheduled_optimizer(client_optimizer, client_learning_rate)
  server_optimizer = optax.sgd(1.0) if server_optimizer is None else server_optimizer
  check_optimizer("server_optimizer", server_optimizer)
  validation.check_choice("weighting", weighting, WEIGHTINGS)
  if not isinstance(jointly_train_variables, bool):
    raise TypeError(f"jointly_train_variables must be a bool, got {type(jointly_train_variables).__name__}.")

  def client_work(broadcast: Broadcast, client_data: PyTree, client_state: PyTree, rng: jax.Array) -> ClientOutput:
    reconstruction_data, train_data = stage.dataset_split.apply(client_data)
    params, reconstruction_sums = reconstruct(model, stage, broadcast.params, reconstruction_data, rng)  # (a)
    trained = (GLOBAL, LOCAL) if jointly_train_variables else (GLOBAL,)              # (b) g trained, l fixed
    fixed = {label: params for label in (LOCAL, FROZEN) if label not in trained}
    final, sums = train_locally(partial_model(model, label_tree, fixed), optimizer.for_round(broadcast.hparams),
                                select_params(params, label_tree, trained), train_data, rng)
    final = merge_params({**fixed, **{label: final for label in trained}}, label_tree)
    delta = jax.tree.map(jnp.subtract, select_params(params, label_tree, GLOBAL),     # l is dropped here
                         select_params(final, label_tree, GLOBAL))
    metrics = {**sums, "num_reconstruction_batches": reconstruction_sums["num_batches"],
               "num_reconstruction_examples": reconstruction_sums["num_examples"]}
    return ClientOutput(update=delta, weight=client_weight(weighting, sums), metrics=metrics)

  return build_round(
      client_work,                                                                             # 2.
      distributor=model_distributor(),                                                         # 1.
      client_optimizer=optimizer,                                                              #    rate
      aggregator=resolve_aggregator(aggregator, weighted=weighting == "num_examples"),        # 3.
      finalizer=optimizer_finalizer(server_optimizer),                                         # 4. (global part)
      labels=label_tree,                                                                       # only g travels
      broadcast_encoder=broadcast_encoder,
      runner=runner,
  )
