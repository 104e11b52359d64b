"""SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning", ICML,
arXiv:1910.06378), Algorithm 1 with option II control variates and a global step size.

State: the server control variate ``c`` (in the finalizer state) and one control variate ``c_i`` per client of
the POPULATION (a :class:`fedjax_lite.core.ClientStateStore`, zeros at first). A round, for the sampled clients S:

1. distributor: broadcast ``x`` and ``c``;
2. client ``i`` (``c_i`` gathered from the store): ``K`` local SGD steps from ``y = x`` with the corrected gradient
   ``y <- y - eta_l (g_i(y) - c_i + c)``; then ``c_i+ = c_i - c + (x - y) / (K eta_l)`` (option II); it uploads
   ``delta_i = x - y`` and ``Delta c_i = c_i+ - c_i``, and ``c_i+`` goes back to the store;
3. aggregators: ``delta = mean_S delta_i`` (uniform, as in the paper; ``weighting='num_examples'`` for the
   example-weighted mean) and ``sum_S Delta c_i``;
4. finalizer: ``x <- server_optimizer(x, delta)`` (SGD(eta_g) gives ``x - eta_g delta``, the paper's
   ``x + eta_g mean(Delta y)``) and ``c <- c + (1/N) sum_S Delta c_i = c + |S|/N mean_S Delta c_i``, which keeps
   ``c`` the mean of all ``N`` clients' ``c_i`` under partial participation.

``K`` is the client's number of real local steps and ``eta_l`` the round's client learning rate (a float or a
schedule of the round). A client with no data (and every padding slot) keeps its ``c_i``; a client whose update is
not finite is rejected and keeps its ``c_i``.

Compressed uploads (``upload_compressor=``, :mod:`fedjax_lite.algorithms.compressed_uploads`): the model delta
``delta_i`` is compressed, with error feedback when the compressor has it; the control-variate change
``Delta c_i`` is uploaded UNCOMPRESSED, so ``c`` stays exactly the mean of the ``c_i`` (Karimireddy et al. do not
compress; compressing both needs a different algorithm, e.g. CompressedScaffnew, Condat, Agarsky & Richtarik,
arXiv:2210.13277, not provided). ``c_i`` is computed from the UNcompressed ``x - y`` (what the client trained). With
error feedback a client's state is ONE record, ``ErrorFeedbackState(state=c_i, residual=e_i)``.
"""

from __future__ import annotations


import flax.struct
import jax
import jax.numpy as jnp
import optax

from fedjax_lite.aggregators.base import Aggregator
from fedjax_lite.aggregators.mean import mean, unweighted_mean
from fedjax_lite.aggregators.sparsification import Compressor
from fedjax_lite.aggregators.sum import sum_aggregator
from fedjax_lite.algorithms.fed_avg import WEIGHTINGS, check_model, client_weight
from fedjax_lite.algorithms.local_training import train_locally
from fedjax_lite.algorithms.optimizers import scheduled_optimizer
from fedjax_lite.algorithms.template import (
    Broadcast,
    Finalizer,
    FinalizerOutput,
    build_round,
    check_optimizer,
    model_distributor,
)
from fedjax_lite.core import validation
from fedjax_lite.core.model import Model
from fedjax_lite.core.process import Process
from fedjax_lite.core.records import ClientOutput
from fedjax_lite.core.runner import Runner
from fedjax_lite.core.tree import PyTree, tree_select


@flax.struct.dataclass
class ScaffoldServerState:
  """SCAFFOLD's finalizer state (``ServerState.finalizer_state``).

  Attributes:
    server_optimizer: the server optimizer's optax state.
    control_variate: the server control variate ``c`` (shaped like the params), the mean of all ``N`` clients'
      ``c_i``.
  """

  server_optimizer: PyTree
  control_variate: PyTree


def control_variate_correction(correction: PyTree) -> optax.GradientTransformation:
  """``g <- g + correction`` (SCAFFOLD: ``correction = c - c_i``), chained before the client optimizer."""
  return optax.stateless(lambda updates, params=None: jax.tree.map(jnp.add, updates, correction))


def scaffold(
    model: Model,
    *,
    num_clients: int,
    client_learning_rate: float | optax.Schedule,
    server_optimizer: optax.GradientTransformation | None = None,
    weighting: str = "uniform",
    delta_aggregator: Aggregator | None = None,
    upload_compressor: Compressor | None = None,
    runner: Runner | None = None,
) -> Process:
  """Builds SCAFFOLD (option II, global step size); see the module docstring for the update rules.

  Args:
    model: the model.
    num_clients: ``N``, the population size (the server control variate moves by ``1/N`` of the sum of the
      cohort's control-variate changes).
    client_learning_rate: ``eta_l``, a positive float or a schedule of the round number; clients run plain SGD.
    server_optimizer: applied to the mean delta; default ``optax.sgd(1.0)`` (``eta_g = 1``).
    weighting: ``'uniform'`` (the paper) or ``'num_examples'`` for the mean of the deltas.
    delta_aggregator: aggregator of the deltas; default the (un)weighted mean per ``weighting``.
    upload_compressor: optional :class:`~fedjax_lite.aggregators.Compressor` of the model deltas (module
      docstring): ``build_round(upload_compressor={'delta': upload_compressor})``.
    runner: the client runner.

  Returns:
    ``Process(init, next, client_state)``: ``next(state, round_data, rng, client_states) -> RoundOutput(state,
    metrics, client_states)`` with ``client_states`` the cohort's control variates ``c_i`` in and ``c_i+`` out
    (see :class:`fedjax_lite.core.ClientStateStore` and ``fedjax_lite.training.run_training``, which do the
    gathering and scattering), or ``ErrorFeedbackState(c_i, e_i)`` records with an error-feedback compressor;
    ``state.finalizer_state`` is a :class:`ScaffoldServerState`.
  """
  check_model(model)
  validation.check_int("num_clients", num_clients, minimum=1)
  validation.check_choice("weighting", weighting, WEIGHTINGS)
  optimizer = scheduled_optimizer(optax.sgd, client_learning_rate)
  server_optimizer = optax.sgd(1.0) if server_optimizer is None else server_optimizer
  check_optimizer("server_optimizer", server_optimizer)
  if delta_aggregator is None:
    delta_aggregator = mean() if weighting == "num_examples" else unweighted_mean()
  elif not isinstance(delta_aggregator, Aggregator):
    raise TypeError(f"delta_aggregator must be a fedjax_lite Aggregator, got {type(delta_aggregator).__name__}.")

  def client_work(broadcast: Broadcast, client_data, client_control, rng) -> ClientOutput:
    x, server_control = broadcast.params, broadcast.extra
    correction = jax.tree.map(jnp.subtract, server_control, client_control)  # c - c_i
    y, metric_sums = train_locally(
        model, optimizer.for_round(broadcast.hparams, control_variate_correction(correction)), x, client_data, rng)
    delta = jax.tree.map(jnp.subtract, x, y)
    steps = metric_sums["num_batches"].astype(jnp.float32)
    scale = 1.0 / (jnp.maximum(steps, 1.0) * broadcast.hparams["learning_rate"])
    new_control = jax.tree.map(lambda ci, c, d: ci - c + d * scale, client_control, server_control, delta)
    new_control = tree_select(steps > 0, new_control, client_control)
    control_change = jax.tree.map(jnp.subtract, new_control, client_control)
    return ClientOutput(update={"delta": delta, "control": control_change},
                        weight=client_weight(weighting, metric_sums), metrics=metric_sums, new_state=new_control)

  def init_finalizer(params) -> ScaffoldServerState:
    return ScaffoldServerState(server_optimizer=server_optimizer.init(params),
                               control_variate=jax.tree.map(jnp.zeros_like, params))

  def apply_finalizer(state: ScaffoldServerState, params, aggregate):
    updates, opt_state = server_optimizer.update(aggregate["delta"], state.server_optimizer, params)
    control = jax.tree.map(lambda c, s: c + s / num_clients, state.control_variate, aggregate["control"])
    return FinalizerOutput(state=ScaffoldServerState(server_optimizer=opt_state, control_variate=control),
                           params=optax.apply_updates(params, updates))

  return build_round(
      distributor=model_distributor(extra=lambda state: state.finalizer_state.control_variate),
      client_optimizer=optimizer,
      client_work=client_work,
      aggregator={"delta": delta_aggregator, "control": sum_aggregator()},
      finalizer=Finalizer(init_finalizer, apply_finalizer),
      client_state=lambda params: jax.tree.map(jnp.zeros_like, params),
      update_template=lambda params: {"delta": params, "control": params},
      runner=runner,
      upload_compressor=None if upload_compressor is None else {"delta": upload_compressor},
  )
