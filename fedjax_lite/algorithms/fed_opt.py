"""Adaptive federated optimization (Reddi et al. 2021, "Adaptive Federated Optimization", ICLR, arXiv:2003.00295):
FedAvgM, FedAdagrad, FedAdam and FedYogi, i.e. FedAvg whose server optimizer is adaptive.

Algorithm 2 of the paper, with ``Delta_t`` the aggregated client delta (here the pseudo-gradient
``x - y``, so the server SUBTRACTS the step):

* ``m_t = beta1 m_{t-1} + (1 - beta1) Delta_t``
* FedAdagrad: ``v_t = v_{t-1} + Delta_t^2``
* FedAdam: ``v_t = beta2 v_{t-1} + (1 - beta2) Delta_t^2``
* FedYogi: ``v_t = v_{t-1} - (1 - beta2) Delta_t^2 sign(v_{t-1} - Delta_t^2)``
* ``x_{t+1} = x_t - eta m_t / (sqrt(v_t) + tau)``

Defaults from the paper's experiments (§5 and App. C): adaptivity
``tau = 1e-3``, ``beta1 = 0.9``, ``beta2 = 0.99``, initial accumulator ``v_{-1} = 0`` (the paper's FedAdagrad and
FedYogi runs), FedAvgM momentum 0.9. FedAdagrad's ``beta1`` defaults to 0 (classic Adagrad).

Differences from TFF's optimizers (``tensorflow_federated/python/learning/optimizers/``), stated because results
depend on them: TFF's ``build_adam`` and
``build_yogi`` (and optax's ``adam``) BIAS-CORRECT the step, ``eta_t = eta sqrt(1 - beta2^t) / (1 - beta1^t)``,
which the paper's Algorithm 2 does not; TFF's ``build_adagrad`` puts ``epsilon`` inside the square root and starts
from ``v = 0.1``; TFF's ``build_yogi`` starts from ``v = 1e-6``. ``bias_correction=True`` gives the TFF/optax step
size; the accumulator start and ``tau`` are arguments.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lite.algorithms.fed_avg import fed_avg, fed_avg_options
from fedjax_lite.core import validation
from fedjax_lite.core.model import Model
from fedjax_lite.core.process import Process
from fedjax_lite.core.tree import PyTree

ACCUMULATORS = ("adagrad", "adam", "yogi")


class AdaptiveState(NamedTuple):
  count: jax.Array
  momentum: PyTree
  accumulator: PyTree


def scale_by_adaptive_server(
    accumulator: str,
    *,
    beta1: float,
    beta2: float,
    adaptivity: float,
    initial_accumulator: float = 0.0,
    bias_correction: bool = False,
) -> optax.GradientTransformation:
  """Reddi et al.'s ``m_t / (sqrt(v_t) + tau)`` for ``accumulator`` in ``'adagrad'|'adam'|'yogi'`` (formulas in
  the module docstring); with ``bias_correction`` the result is multiplied by
  ``sqrt(1 - beta2^t) / (1 - beta1^t)`` (TFF/optax Adam and Yogi). Chain with ``optax.scale(-lr)``."""
  validation.check_choice("accumulator", accumulator, ACCUMULATORS)
  validation.check_float("beta1", beta1, low=0.0, high=1.0, high_inclusive=False)
  validation.check_float("beta2", beta2, low=0.0, high=1.0, high_inclusive=False)
  validation.check_float("adaptivity", adaptivity, low=0.0, low_inclusive=False)
  validation.check_float("initial_accumulator", initial_accumulator, low=0.0)

  def init(params):
    return AdaptiveState(count=jnp.zeros((), jnp.int32), momentum=jax.tree.map(jnp.zeros_like, params),
                         accumulator=jax.tree.map(lambda p: jnp.full_like(p, initial_accumulator), params))

  def update(updates, state, params=None):
    momentum = jax.tree.map(lambda m, g: beta1 * m + (1.0 - beta1) * g, state.momentum, updates)
    if accumulator == "adagrad":
      second = jax.tree.map(lambda v, g: v + g * g, state.accumulator, updates)
    elif accumulator == "adam":
      second = jax.tree.map(lambda v, g: beta2 * v + (1.0 - beta2) * g * g, state.accumulator, updates)
    else:
      second = jax.tree.map(lambda v, g: v - (1.0 - beta2) * g * g * jnp.sign(v - g * g), state.accumulator,
                            updates)
    count = state.count + 1
    step = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + adaptivity), momentum, second)
    if bias_correction:
      t = count.astype(jnp.float32)
      factor = jnp.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
      step = jax.tree.map(lambda s: s * factor.astype(s.dtype), step)
    return step, AdaptiveState(count=count, momentum=momentum, accumulator=second)

  return optax.GradientTransformation(init, update)


def adaptive_server_optimizer(accumulator: str, server_learning_rate: float, **kwargs) -> optax.GradientTransformation:
  """``x <- x - eta m_t / (sqrt(v_t) + tau)``: :func:`scale_by_adaptive_server` then ``optax.scale(-eta)``."""
  validation.check_positive("server_learning_rate", server_learning_rate)
  return optax.chain(scale_by_adaptive_server(accumulator, **kwargs), optax.scale(-server_learning_rate))


def fed_adam(model: Model, *, server_learning_rate: float, beta1: float = 0.9, beta2: float = 0.99,
             adaptivity: float = 1e-3, initial_accumulator: float = 0.0, bias_correction: bool = False,
             **options) -> Process:
  """FedAdam (Reddi et al. 2021, Algorithm 2): FedAvg with the Adam server step of the module docstring.

  ``options``: every option of :func:`~fedjax_lite.algorithms.fed_avg` (``client_learning_rate``,
  ``client_optimizer``, ``weighting``, ``aggregator``, ...) except ``server_optimizer``, which this sets."""
  server = adaptive_server_optimizer("adam", server_learning_rate, beta1=beta1, beta2=beta2, adaptivity=adaptivity,
                                     initial_accumulator=initial_accumulator, bias_correction=bias_correction)
  return fed_avg(model, server_optimizer=server, **fed_avg_options("fed_adam", options, sets=("server_optimizer",)))


def fed_yogi(model: Model, *, server_learning_rate: float, beta1: float = 0.9, beta2: float = 0.99,
             adaptivity: float = 1e-3, initial_accumulator: float = 0.0, bias_correction: bool = False,
             **options) -> Process:
  """FedYogi (Reddi et al. 2021, Algorithm 2): FedAvg with the Yogi server step of the module docstring.

  ``options``: every option of :func:`~fedjax_lite.algorithms.fed_avg` except ``server_optimizer``."""
  server = adaptive_server_optimizer("yogi", server_learning_rate, beta1=beta1, beta2=beta2, adaptivity=adaptivity,
                                     initial_accumulator=initial_accumulator, bias_correction=bias_correction)
  return fed_avg(model, server_optimizer=server, **fed_avg_options("fed_yogi", options, sets=("server_optimizer",)))


def fed_adagrad(model: Model, *, server_learning_rate: float, beta1: float = 0.0, adaptivity: float = 1e-3,
                initial_accumulator: float = 0.0, **options) -> Process:
  """FedAdagrad (Reddi et al. 2021, Algorithm 2): FedAvg with the Adagrad server step of the module docstring.

  ``options``: every option of :func:`~fedjax_lite.algorithms.fed_avg` except ``server_optimizer``."""
  server = adaptive_server_optimizer("adagrad", server_learning_rate, beta1=beta1, beta2=0.0, adaptivity=adaptivity,
                                     initial_accumulator=initial_accumulator)
  return fed_avg(model, server_optimizer=server,
                 **fed_avg_options("fed_adagrad", options, sets=("server_optimizer",)))


def fed_avgm(model: Model, *, server_learning_rate: float = 1.0, server_momentum: float = 0.9,
             **options) -> Process:
  """FedAvgM (Hsu et al. 2019, arXiv:1909.06335; Reddi et al. 2021): FedAvg with server SGD with momentum,
  ``a <- mu a + Delta``, ``x <- x - eta a`` (``optax.sgd(eta, momentum=mu)``, TFF ``build_sgdm``).

  ``options``: every option of :func:`~fedjax_lite.algorithms.fed_avg` except ``server_optimizer``."""
  validation.check_positive("server_learning_rate", server_learning_rate)
  validation.check_float("server_momentum", server_momentum, low=0.0, high=1.0, high_inclusive=False)
  return fed_avg(model, server_optimizer=optax.sgd(server_learning_rate, momentum=server_momentum),
                 **fed_avg_options("fed_avgm", options, sets=("server_optimizer",)))
