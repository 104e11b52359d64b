"""FedBN (Li et al. 2021, "FedBN: Federated Learning on Non-IID Features via Local Batch Normalization", ICLR,
arXiv:2102.07623): FedAvg in which every batch-normalization layer stays on the client.

The model's batch-norm layers -- their running statistics (``Model.state_collections``, e.g. flax's
``batch_stats``) and their affine parameters (the ``scale`` and ``bias`` of the same modules) -- are ``'local'``;
everything else is ``'global'``. A round, for the sampled clients S (Algorithm 1 of the paper):

1. distributor: broadcast the non-BN parameters ``w`` (no statistics, no BN affine parameters);
2. client ``i``: from ``w`` and its own BN layers ``b_i`` (client-state store; the model's initial ones at first),
   local SGD on ``w`` and the affine part of ``b_i``, the statistics following each step's forward pass
   (:func:`~fedjax_lite.algorithms.train_locally`); upload ``w - w_i'`` with weight ``n_i``, keep ``b_i <- b_i'``;
3. aggregator: the example-weighted mean of the uploads (any aggregator; it sees the non-BN parameters only);
4. finalizer: ``w <- server_optimizer(w, delta)``; SGD(1) gives the paper's averaging of the non-BN parameters.

Evaluation of a client with its own ``b_i`` (the paper's setting) is
:func:`~fedjax_lite.algorithms.personalized_evaluation`; ``state.params`` holds the global ``w`` and the INITIAL
BN layers.
"""

from __future__ import annotations

from typing import Any

import jax

from fedjax_lite.algorithms.fed_avg import check_model, fed_avg, fed_avg_options
from fedjax_lite.core.model import Model
from fedjax_lite.core.param_partition import GLOBAL, LOCAL, path_names
from fedjax_lite.core.process import Process
from fedjax_lite.core.tree import PyTree

__all__ = ["batch_norm_labels", "fed_bn"]


def batch_norm_labels(model: Model) -> PyTree:
  """The label tree of FedBN: ``'local'`` for the model's state collections and for the parameters of every module
  that holds state (the ``scale`` and ``bias`` of a BatchNorm whose statistics are ``batch_stats/<module>/...``),
  ``'global'`` for the rest. Read from the model's parameter shapes (``jax.eval_shape(model.init)``: no compute).

  Raises:
    ValueError: a model without state collections (nothing for FedBN to keep local).
  """
  check_model(model)
  if not model.state_collections:
    raise ValueError(f"FedBN keeps the batch-norm layers local, but model {model.name!r} has no state collections "
                     "(models.from_flax gives a module with nn.BatchNorm its 'batch_stats').")
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  stateful_modules = {
      path_names(path)[:-1]
      for collection in model.state_collections
      for path, _ in jax.tree_util.tree_flatten_with_path(shapes[collection])[0]
  }

  def label(path, _) -> str:
    names = path_names(path)
    return LOCAL if names[0] in model.state_collections or names[1:-1] in stateful_modules else GLOBAL

  return jax.tree_util.tree_map_with_path(label, shapes)


def fed_bn(model: Model, **options: Any) -> Process:
  """FedBN: FedAvg with the batch-norm layers (statistics and affine parameters) local (module docstring).

  Args:
    model: a model with batch statistics (``models.from_flax`` of a module with ``nn.BatchNorm``).
    **options: :func:`~fedjax_lite.algorithms.fed_avg`'s options except ``labels`` and ``local_state`` (FedBN
      sets them to :func:`batch_norm_labels` and True).

  Returns:
    ``Process(init, next, client_state)``; ``client_state(params)`` is one client's BN layers (the params' tree
    with ``None`` at global positions), what the client-state store holds per client.
  """
  check_model(model)
  options = fed_avg_options("fed_bn", options, sets=("labels", "local_state"))
  return fed_avg(model, labels=batch_norm_labels(model), local_state=True, **options)
