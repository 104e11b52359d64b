"""FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks", MLSys, arXiv:1812.06127).

FedAvg whose clients minimize ``L_i(w) + mu/2 ||w - w0||^2`` with ``w0`` the broadcast (server) parameters: every
local gradient becomes ``grad L_i(w) + mu (w - w0)``, which pulls the local model back towards the server model
and limits client drift on heterogeneous data. The server is FedAvg's (default SGD(1.0) on the weighted mean
delta). ``mu = 0`` is FedAvg exactly.

Sign. TFF's ``build_weighted_fed_prox`` adds ``mu (w0 - w)`` to the gradient
(``tensorflow_federated/python/learning/templates/proximal_client_work.py``). The gradient of ``mu/2 ||w - w0||^2``
is ``+mu (w - w0)``; with the
reference's sign the term pushes the local model AWAY from ``w0``. ``tests/algorithms/test_fed_prox.py`` checks
numerically that our term is the gradient of the proximal objective (and that one step with a zero loss gradient
moves ``w`` towards ``w0``); we follow the paper, not the reference's code.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import optax

from fedjax_lite.algorithms.fed_avg import fed_avg, fed_avg_options
from fedjax_lite.core import validation
from fedjax_lite.core.model import Model
from fedjax_lite.core.process import Process
from fedjax_lite.core.tree import PyTree


class ProximalState(NamedTuple):
  """The anchor ``w0``: the parameters the transformation was initialized with."""

  anchor: PyTree


def proximal_term(proximal_strength: float, anchor: PyTree | None = None) -> optax.GradientTransformation:
  """``g <- g + mu (w - w0)``, the gradient of ``mu/2 ||w - w0||^2`` added to the loss gradient.

  ``w0`` is ``anchor`` when given (Ditto's personal model is pulled towards the broadcast global model, not its own
  starting point), else the ``params`` passed to ``init`` (for a FedProx client: the broadcast server model);
  ``update`` needs ``params``. Chain it before the client optimizer: ``optax.chain(proximal_term(mu),
  optax.sgd(lr))``.
  """
  validation.check_float("proximal_strength", proximal_strength, low=0.0)

  def init(params):
    return ProximalState(anchor=params if anchor is None else anchor)

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("proximal_term needs params in update(updates, state, params).")
    return jax.tree.map(lambda g, w, w0: g + proximal_strength * (w - w0), updates, params, state.anchor), state

  return optax.GradientTransformation(init, update)


def fed_prox(model: Model, proximal_strength: float, **options) -> Process:
  """Builds FedProx: :func:`~fedjax_lite.algorithms.fed_avg` with the proximal term ``mu (w - w0)`` added to
  every local gradient (see the module docstring for the formula and the sign).

  Args:
    model: the model.
    proximal_strength: ``mu >= 0`` (the FedProx paper tries 0.001 to 1).
    **options: every option of :func:`~fedjax_lite.algorithms.fed_avg` (``client_optimizer``,
      ``client_learning_rate``, ``server_optimizer`` (default SGD(1.0)), ``weighting``, ``aggregator``,
      ``client_grad_clip_norm`` -- which clips the whole proximal gradient ``grad L + mu (w - w0)`` -- ...) except
      ``gradient_correction``, which FedProx sets.
  """
  validation.check_float("proximal_strength", proximal_strength, low=0.0)
  return fed_avg(model, gradient_correction=lambda broadcast, client_state: proximal_term(proximal_strength),
                 **fed_avg_options("fed_prox", options, sets=("gradient_correction",)))
