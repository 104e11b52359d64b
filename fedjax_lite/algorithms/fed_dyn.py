"""FedDyn (Acar, Zhao, Matas, Mattina, Whatmough & Saligrama 2021, "Federated Learning Based on Dynamic
Regularization", ICLR, arXiv:2111.04263), Algorithm 1, with full or partial participation.

State: the server's ``h`` (shaped like the params, zeros at first; in the finalizer state) and, for every client
``k`` of the POPULATION of ``m`` clients, ``g_k`` -- the paper's ``grad L_k(theta_k^{t-1})``, the client's gradient
at its last local model (a :class:`fedjax_lite.core.ClientStateStore`, zeros at first). A round ``t`` with the
sampled clients ``P_t``:

1. distributor: broadcast ``theta^{t-1}``;
2. client ``k``: local SGD from ``theta^{t-1}`` on the dynamically regularized objective

       L_k(theta) - <g_k, theta> + alpha/2 ||theta - theta^{t-1}||^2,

   i.e. every local gradient becomes ``grad L_k(theta; b) - g_k + alpha (theta - theta^{t-1})``; it ends at
   ``theta_k^t``, updates ``g_k <- g_k - alpha (theta_k^t - theta^{t-1})`` (back to the store), and uploads
   ``delta_k = theta^{t-1} - theta_k^t`` and a count of 1;
3. aggregators: ``sum_{P_t} delta_k`` and ``|P_t|`` (plain sums);
4. finalizer: ``h <- h - (alpha/m) sum_{P_t} (theta_k^t - theta^{t-1})`` and
   ``theta^t = (1/|P_t|) sum_{P_t} theta_k^t - h / alpha`` (with the NEW ``h``).

The argmin of the paper's step is approximated, as in its experiments, by the client's local SGD steps (one pass
over its packed batches). Every participating client counts once (the paper's uniform mean); a client whose update
or ``g_k`` is not finite is rejected (count 0, ``g_k`` kept), padding slots add nothing, and a round with no
accepted client leaves ``theta`` and ``h`` unchanged (``0/0`` is non-finite: the template's server rule).
``alpha`` is both the proximal strength and the step of ``h``; the paper tunes it in {0.1, 0.01, 0.001}.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import optax

from fedjax_lite.aggregators.sum import sum_aggregator
from fedjax_lite.algorithms.fed_avg import check_model
from fedjax_lite.algorithms.fed_prox import proximal_term
from fedjax_lite.algorithms.local_training import train_locally
from fedjax_lite.algorithms.optimizers import scheduled_optimizer
from fedjax_lite.algorithms.scaffold import control_variate_correction
from fedjax_lite.algorithms.template import Broadcast, Finalizer, FinalizerOutput, build_round, model_distributor
from fedjax_lite.core import validation
from fedjax_lite.core.model import Model
from fedjax_lite.core.process import Process
from fedjax_lite.core.records import ClientOutput
from fedjax_lite.core.runner import Runner
from fedjax_lite.core.tree import PyTree


@flax.struct.dataclass
class FedDynServerState:
  """FedDyn's finalizer state (``ServerState.finalizer_state``).

  Attributes:
    h: the server's ``h`` (shaped like the params): ``-(alpha/m)`` times the sum, over every round so far, of the
      participating clients' ``theta_k^t - theta^{t-1}``.
  """

  h: PyTree


def fed_dyn(
    model: Model,
    *,
    alpha: float,
    num_clients: int,
    client_learning_rate: float | optax.Schedule,
    runner: Runner | None = None,
) -> Process:
  """Builds FedDyn (see the module docstring for the update rules).

  Args:
    model: the model.
    alpha: ``alpha > 0``, the dynamic regularizer's strength.
    num_clients: ``m``, the population size (``h`` moves by ``alpha/m`` of the cohort's summed change; with full
      participation, ``m = |P_t|``).
    client_learning_rate: the local SGD rate, a positive float or a schedule of the round number.
    runner: the client runner.

  Returns:
    ``Process(init, next, client_state)``: ``client_state(params)`` is one client's initial ``g_k`` (zeros);
    ``next(state, round_data, rng, client_states) -> RoundOutput(state, metrics, client_states)`` takes and
    returns the cohort's ``g_k`` (``training.run_training`` and :class:`fedjax_lite.core.ClientStateStore` gather
    and scatter them); ``state.finalizer_state`` is a :class:`FedDynServerState`.
  """
  check_model(model)
  validation.check_float("alpha", alpha, low=0.0, low_inclusive=False)
  validation.check_int("num_clients", num_clients, minimum=1)
  optimizer = scheduled_optimizer(optax.sgd, client_learning_rate)

  def client_work(broadcast: Broadcast, client_data: PyTree, gradient: PyTree, rng: jax.Array) -> ClientOutput:
    start = broadcast.params                                                        # theta^{t-1}
    regularizer = optax.chain(control_variate_correction(jax.tree.map(jnp.negative, gradient)),  # - g_k
                              proximal_term(alpha))                                 # + alpha (theta - theta^{t-1})
    final, metric_sums = train_locally(model, optimizer.for_round(broadcast.hparams, regularizer), start,
                                       client_data, rng)
    delta = jax.tree.map(jnp.subtract, start, final)                                # theta^{t-1} - theta_k^t
    new_gradient = jax.tree.map(lambda g, d: g + alpha * d, gradient, delta)        # g_k - alpha (theta_k - theta)
    return ClientOutput(update={"delta": delta, "count": jnp.ones((), jnp.float32)},
                        weight=jnp.ones((), jnp.float32), metrics=metric_sums, new_state=new_gradient)

  def init_finalizer(params) -> FedDynServerState:
    return FedDynServerState(h=jax.tree.map(jnp.zeros_like, params))

  def apply_finalizer(state: FedDynServerState, params, aggregate) -> FinalizerOutput:
    total, count = aggregate["delta"], aggregate["count"]
    h = jax.tree.map(lambda h, s: h + (alpha / num_clients) * s, state.h, total)
    params = jax.tree.map(lambda p, s, h: p - s / count - h / alpha, params, total, h)
    return FinalizerOutput(state=FedDynServerState(h=h), params=params)

  return build_round(
      client_work,                                                                             # 2.
      distributor=model_distributor(),                                                         # 1.
      client_optimizer=optimizer,                                                              #    rate
      aggregator={"delta": sum_aggregator(), "count": sum_aggregator()},                      # 3.
      update_template=lambda params: {"delta": params, "count": jax.ShapeDtypeStruct((), jnp.float32)},
      finalizer=Finalizer(init_finalizer, apply_finalizer),                                    # 4.
      client_state=lambda params: jax.tree.map(jnp.zeros_like, params),
      runner=runner,
  )
