"""FedPer and FedRep: a global body (representation) and a local head per client, FedAvg on the body.

* **FedPer** (Arivazhagan et al. 2019, "Federated Learning with Personalization Layers", arXiv:1912.00818): the
  model is split into base layers (global) and personalization layers (local). A round, for the sampled clients S:

  1. distributor: broadcast the body ``phi`` (the head is never sent);
  2. client ``i``: from ``(phi, h_i)`` -- ``h_i`` its own head from the client-state store, the initial head at
     first -- local SGD on every parameter; upload ``phi - phi_i'`` with weight ``n_i``; keep ``h_i <- h_i'``;
  3. aggregator: ``delta = sum_S n_i (phi - phi_i') / sum_S n_i`` (any aggregator: only the body's values);
  4. finalizer: ``phi <- server_optimizer(phi, delta)`` (SGD(1): the weighted average of the clients' bodies).

* **FedRep** (Collins et al. 2021, "Exploiting Shared Representations for Personalized Federated Learning", ICML,
  arXiv:2102.07078, Algorithm 1): the same round, but client ``i`` first trains its head ``tau_h`` passes over its
  data with the body fixed, ``h_i' = SGD^{tau_h}_h(phi, h_i)``, and then the body ``tau_phi`` passes with the NEW
  head fixed, ``phi_i' = SGD^{tau_phi}_phi(phi, h_i')``; it uploads ``phi - phi_i'`` (weight: the examples of the
  body passes) and keeps ``h_i'``. The paper's experiments use 10 head epochs and 1 body epoch (the defaults).

Both are :func:`~fedjax_lite.algorithms.fed_avg` with a parameter partition (``labels``: the head ``'local'``, the
body ``'global'``, optionally a ``'frozen'`` part) and the local parameters kept as client state; every FedAvg
option (server optimizer, aggregator, compression, DP, clipping, broadcast encoder, runner) applies and covers the
body only. ``next(state, round_data, rng, client_states) -> RoundOutput`` takes and returns the cohort's heads
(``fedjax_lite.training.run_training`` gathers and scatters them). ``state.params`` holds the body and the
INITIAL head (a new client's starting point); :func:`~fedjax_lite.algorithms.personalized_evaluation` evaluates
every client with its own head.
"""

from __future__ import annotations

from typing import Any

from fedjax_lite.algorithms.fed_avg import check_model, fed_avg, fed_avg_options
from fedjax_lite.core import validation
from fedjax_lite.core.model import Model
from fedjax_lite.core.param_partition import GLOBAL, LOCAL, LabelSpec
from fedjax_lite.core.process import Process

__all__ = ["fed_per", "fed_rep"]


def fed_per(model: Model, labels: LabelSpec, **options: Any) -> Process:
  """FedPer: FedAvg on the ``'global'`` body, the ``'local'`` head kept per client (module docstring).

  Args:
    model: the model.
    labels: the partition (:func:`fedjax_lite.core.label_params`), e.g. ``lambda path: 'local' if path[0] ==
      'head' else 'global'``; at least one parameter must be ``'local'``.
    **options: :func:`~fedjax_lite.algorithms.fed_avg`'s options (``client_learning_rate``, ``server_optimizer``,
      ``aggregator``, ...), except ``labels`` and ``local_state``, which FedPer sets.

  Returns:
    ``Process(init, next, client_state)``: ``client_state(params)`` is one client's initial local part (the
    params' tree with ``None`` at global positions), what ``ClientStateStore`` holds per client.
  """
  check_model(model)
  options = fed_avg_options("fed_per", options, sets=("labels", "local_state"))
  return fed_avg(model, labels=labels, local_state=True, **options)


def fed_rep(model: Model, labels: LabelSpec, *, head_epochs: int = 10, body_epochs: int = 1,
            **options: Any) -> Process:
  """FedRep: the head trained first (``head_epochs`` passes, body fixed), then the body (``body_epochs`` passes,
  head fixed); only the body is uploaded (module docstring).

  Args:
    model: the model.
    labels: the partition: the head ``'local'``, the body ``'global'`` (as for :func:`fed_per`).
    head_epochs: ``tau_h >= 1``, passes over the client's packed data training the head (paper: 10).
    body_epochs: ``tau_phi >= 1``, passes training the body (paper: 1).
    **options: :func:`~fedjax_lite.algorithms.fed_avg`'s options except ``labels``, ``local_state`` and
      ``local_phases`` (FedRep sets them). Pack ONE epoch per round: the epochs are these passes. Each pass
      starts the client optimizer from a fresh state (the same as the paper's SGD).

  Returns:
    ``Process(init, next, client_state)`` as :func:`fed_per`. The clients' ``train`` metrics and weights are those
    of the body passes.
  """
  check_model(model)
  validation.check_int("head_epochs", head_epochs, minimum=1)
  validation.check_int("body_epochs", body_epochs, minimum=1)
  options = fed_avg_options("fed_rep", options, sets=("labels", "local_state", "local_phases"))
  return fed_avg(model, labels=labels, local_state=True,
                 local_phases=((LOCAL, head_epochs), (GLOBAL, body_epochs)), **options)
