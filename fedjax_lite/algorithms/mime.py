"""Mime and MimeLite (Karimireddy et al. 2021, "Breaking the centralized barrier for cross-device federated
learning", NeurIPS; arXiv:2008.03606): a centralized optimizer's state (e.g. momentum) applied on the clients.

Both keep a base optimizer ``B`` (an optax transformation, e.g. ``optax.sgd(lr, momentum=0.9)``) whose state
``s`` lives on the server and is FROZEN during local training. Per round, with server model ``x``:

* **MimeLite** (TFF ``build_weighted_mime_lite``, ``tensorflow_federated/python/learning/algorithms/mime.py``):
  client ``i`` computes its full-batch gradient ``g_i = grad f_i(x)`` (mean over its examples), then runs local steps
  ``y <- y + B.update(grad f_i(y; batch), s)`` with ``s`` frozen, and uploads ``delta_i = x - y`` and ``g_i``. The
  server aggregates ``delta = mean(delta_i)`` and ``g = mean(g_i)`` (same weights), updates the base state with the
  full gradient, ``s <- B.update(g, s, x).state``, and the model with its own optimizer, ``x <- server_opt(x,
  delta)`` (default SGD(1.0)).
* **Mime** adds the SVRG-style correction of the paper (Algorithm 1): the local steps use
  ``grad f_i(y; batch) - grad f_i(x; batch) + g`` where ``g = mean_S g_i`` is the cohort's full gradient at ``x``.
  ``g`` must be known before local training, so a Mime round runs its clients TWICE: once for the full
  gradients (aggregated, and used to update ``s``), then for local training with the correction. Each local step
  evaluates two gradients (at ``y`` and at ``x``) on the same batch.

In both, local steps use the base state ``s_t`` of the start of the round; ``s_{t+1}`` is computed from ``g`` at
the end of the round, as in the paper. A non-finite aggregate leaves the model, the server optimizer and ``s``
unchanged (the round template's rule).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from fedjax_lite.aggregators.base import Aggregator
from fedjax_lite.algorithms.fed_avg import WEIGHTINGS, check_model, client_weight, resolve_aggregator
from fedjax_lite.algorithms.local_training import (
    add_metric_sums,
    client_gradient,
    split_steps,
    step_loop,
    train_locally,
    zero_metric_sums,
)
from fedjax_lite.algorithms.template import (
    Broadcast,
    Finalizer,
    FinalizerOutput,
    Prepass,
    build_round,
    check_optimizer,
    model_distributor,
)
from fedjax_lite.core import validation
from fedjax_lite.core.model import Model, masked_loss_and_metric_sums
from fedjax_lite.core.process import Process
from fedjax_lite.core.records import ClientOutput
from fedjax_lite.core.runner import Runner
from fedjax_lite.core.tree import PyTree


@flax.struct.dataclass
class MimeServerState:
  """Mime's and MimeLite's finalizer state (``ServerState.finalizer_state``).

  Attributes:
    server_optimizer: the server optimizer's optax state (applied to the mean delta).
    base_optimizer: the base optimizer's state ``s``, frozen on the clients and updated on the server from the
      mean full gradient.
  """

  server_optimizer: PyTree
  base_optimizer: PyTree


def frozen_state(base_optimizer: optax.GradientTransformation, state: PyTree) -> optax.GradientTransformation:
  """``base_optimizer`` with its state held at ``state``: every update is ``base.update(g, state, params)``."""

  def update(updates, _, params=None):
    return base_optimizer.update(updates, state, params)[0], optax.EmptyState()

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _mime_finalizer(base_optimizer, server_optimizer) -> Finalizer:
  """Model: ``server_opt(x, delta)``; base state: ``B.update(g, s, x).state`` (both kept when the aggregate is
  non-finite: the template's rule)."""

  def init(params) -> MimeServerState:
    return MimeServerState(server_optimizer=server_optimizer.init(params),
                           base_optimizer=base_optimizer.init(params))

  def apply(state: MimeServerState, params, aggregate):
    updates, opt_state = server_optimizer.update(aggregate["delta"], state.server_optimizer, params)
    _, base_state = base_optimizer.update(aggregate["full_gradient"], state.base_optimizer, params)
    return FinalizerOutput(state=MimeServerState(server_optimizer=opt_state, base_optimizer=base_state),
                           params=optax.apply_updates(params, updates))

  return Finalizer(init, apply)


def mime_lite(
    model: Model,
    base_optimizer: optax.GradientTransformation,
    *,
    server_optimizer: optax.GradientTransformation | None = None,
    weighting: str = "num_examples",
    aggregator: Aggregator | None = None,
    full_gradient_aggregator: Aggregator | None = None,
    svrg_correction: bool = False,
    broadcast_encoder: Any | None = None,
    runner: Runner | None = None,
) -> Process:
  """Builds MimeLite, or Mime with ``svrg_correction=True`` (see the module docstring); TFF
  ``build_weighted_mime_lite`` / ``build_unweighted_mime_lite``.

  MimeLite is one pass: every client computes its full gradient and trains with ``s`` frozen. Mime is a round with
  a :class:`~fedjax_lite.algorithms.template.Prepass`: the clients' full gradients are aggregated first, and the
  second stage trains with the correction ``- grad f_i(x; b) + g``. Its metrics gain
  ``client_work/full_gradient_pass`` (the first stage's client metrics).

  Args:
    model: the model.
    base_optimizer: ``B``, e.g. ``optax.sgd(0.1, momentum=0.9)`` or ``optax.adam(0.01)``.
    server_optimizer: applied to the mean delta; default ``optax.sgd(1.0)``.
    weighting: ``'num_examples'`` or ``'uniform'`` (both aggregates use the same weights).
    aggregator: of the deltas; default the (un)weighted mean.
    full_gradient_aggregator: of the full gradients; default the (un)weighted mean.
    svrg_correction: Mime's correction (a pre-pass over the cohort for ``g``); False for MimeLite.
    broadcast_encoder: optional server-to-client compression of the model (as in
      :func:`~fedjax_lite.algorithms.fed_avg`).
    runner: the client runner.

  Returns:
    ``Process(init, next)``; ``state.finalizer_state`` is a :class:`MimeServerState`.
  """
  check_model(model)
  check_optimizer("base_optimizer", base_optimizer)
  server_optimizer = optax.sgd(1.0) if server_optimizer is None else server_optimizer
  check_optimizer("server_optimizer", server_optimizer)
  validation.check_choice("weighting", weighting, WEIGHTINGS)
  if not isinstance(svrg_correction, bool):
    raise TypeError(f"svrg_correction must be a bool, got {type(svrg_correction).__name__}.")
  weighted = weighting == "num_examples"
  aggregators = {"delta": resolve_aggregator(aggregator, weighted),
                 "full_gradient": resolve_aggregator(full_gradient_aggregator, weighted)}
  common = dict(distributor=model_distributor(extra=lambda state: state.finalizer_state.base_optimizer),
                finalizer=_mime_finalizer(base_optimizer, server_optimizer), broadcast_encoder=broadcast_encoder,
                runner=runner)

  if not svrg_correction:
    def client_work(broadcast: Broadcast, client_data, client_state, rng) -> ClientOutput:
      x, base_state = broadcast.params, broadcast.extra
      full_gradient, _ = client_gradient(model, x, client_data, jax.random.fold_in(rng, 1))
      y, metric_sums = train_locally(model, frozen_state(base_optimizer, base_state), x, client_data, rng)
      return ClientOutput(update={"delta": jax.tree.map(jnp.subtract, x, y), "full_gradient": full_gradient},
                          weight=client_weight(weighting, metric_sums), metrics=metric_sums)

    return build_round(client_work, aggregator=aggregators, **common)

  def full_gradient_work(broadcast: Broadcast, client_data, client_state, rng) -> ClientOutput:
    gradient, sums = client_gradient(model, broadcast.params, client_data, rng)
    return ClientOutput(update={"full_gradient": gradient}, weight=client_weight(weighting, sums), metrics=sums)

  def training_work(broadcast: Broadcast, client_data, client_state, rng) -> ClientOutput:
    x = broadcast.params
    y, sums = svrg_corrected_training(model, base_optimizer, broadcast.extra, x,
                                      broadcast.prepass["full_gradient"], client_data, rng)
    return ClientOutput(update={"delta": jax.tree.map(jnp.subtract, x, y)}, weight=client_weight(weighting, sums),
                        metrics=sums)

  return build_round(
      training_work,                                                                     # 2. training, corrected
      aggregator={"delta": aggregators["delta"]},                                         # 3. mean delta
      prepass=Prepass(full_gradient_work, {"full_gradient": aggregators["full_gradient"]},  # 2-3 first: g
                      name="full_gradient_pass"),
      **common)


def svrg_corrected_training(model: Model, base_optimizer, base_state, x, full_gradient, client_data, rng):
  """Mime's local steps ``y <- y + B.update(grad f(y; b) - grad f(x; b) + g, s)`` with ``s`` frozen; returns
  ``(y, metric sums)``. The correction needs the step's batch (the gradient at ``x`` on the same batch), so the
  step is written out rather than chained as an optax transformation."""
  steps, num_steps = split_steps(client_data)
  optimizer = frozen_state(base_optimizer, base_state)

  def step_fn(step, batch, carry):
    y, opt_state, sums = carry
    mask = batch.pop("mask")
    step_rng = jax.random.fold_in(rng, step)

    def loss_fn(p):
      return masked_loss_and_metric_sums(model, p, batch, mask, step_rng, True)

    (_, batch_sums), grad_y = jax.value_and_grad(loss_fn, has_aux=True)(y)
    grad_x = jax.grad(lambda p: loss_fn(p)[0])(x)
    corrected = jax.tree.map(lambda gy, gx, g: gy - gx + g, grad_y, grad_x, full_gradient)
    updates, opt_state = optimizer.update(corrected, opt_state, y)
    return optax.apply_updates(y, updates), opt_state, add_metric_sums(sums, batch_sums)

  y, _, sums = step_loop(steps, num_steps, step_fn, (x, optimizer.init(x), zero_metric_sums(model)))
  return y, sums


def mime(model: Model, base_optimizer: optax.GradientTransformation, **options) -> Process:
  """Builds Mime: :func:`mime_lite` with ``svrg_correction=True`` -- MimeLite plus the SVRG-style correction
  ``- grad f_i(x; b) + g`` of every local gradient, with ``g`` the cohort's mean full gradient at ``x`` (a pre-pass
  over the clients; see the module docstring). ``options``: every keyword of :func:`mime_lite` but
  ``svrg_correction``.
  """
  if "svrg_correction" in options:
    raise TypeError("mime() sets svrg_correction=True itself; use mime_lite(..., svrg_correction=...) to choose.")
  return mime_lite(model, base_optimizer, svrg_correction=True, **options)
