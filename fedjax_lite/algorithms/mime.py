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
the end of the round, as in the paper. A non-finite aggregate leaves the model, the server optimizer and ``s`` unchanged.
"""

from __future__ import annotations

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
    ServerState,
    apply_optimizer_rejecting_non_finite,
    bits_per_client,
    build_round,
    check_optimizer,
    check_params,
    client_work_and_aggregate,
    model_distributor,
    place_on_mesh,
    round_bits,
)
from fedjax_lite.core import validation
from fedjax_lite.core.model import Model, masked_loss_and_metric_sums
from fedjax_lite.core.process import Process
from fedjax_lite.core.records import ClientOutput
from fedjax_lite.core.runner import Runner
from fedjax_lite.core.tree import PyTree, tree_all_finite, tree_select


def frozen_state(base_optimizer: optax.GradientTransformation, state: PyTree) -> optax.GradientTransformation:
  """``base_optimizer`` with its state held at ``state``: every update is ``base.update(g, state, params)``."""

  def update(updates, _, params=None):
    return base_optimizer.update(updates, state, params)[0], optax.EmptyState()

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _mime_finalizer(base_optimizer, server_optimizer) -> Finalizer:
  """Model: ``server_opt(x, delta)``; base state: ``B.update(g, s, x).state``; both rejected when non-finite."""

  def init(params):
    return {"optimizer": server_optimizer.init(params), "base_optimizer": base_optimizer.init(params)}

  def apply(state, params, aggregate):
    new_params, opt_state, measurements = apply_optimizer_rejecting_non_finite(
        server_optimizer, state["optimizer"], params, aggregate["delta"])
    _, stepped = base_optimizer.update(aggregate["full_gradient"], state["base_optimizer"], params)
    base_state = tree_select(tree_all_finite(aggregate["full_gradient"]), stepped, state["base_optimizer"])
    return new_params, {"optimizer": opt_state, "base_optimizer": base_state}, measurements

  return Finalizer(init, apply)


def _check(model, base_optimizer, server_optimizer, weighting):
  check_model(model)
  check_optimizer("base_optimizer", base_optimizer)
  server_optimizer = optax.sgd(1.0) if server_optimizer is None else server_optimizer
  check_optimizer("server_optimizer", server_optimizer)
  validation.check_choice("weighting", weighting, WEIGHTINGS)
  return server_optimizer


def mime_lite(
    model: Model,
    base_optimizer: optax.GradientTransformation,
    *,
    server_optimizer: optax.GradientTransformation | None = None,
    weighting: str = "num_examples",
    aggregator: Aggregator | None = None,
    full_gradient_aggregator: Aggregator | None = None,
    runner: Runner | None = None,
) -> Process:
  """Builds MimeLite (see the module docstring); TFF ``build_weighted_mime_lite`` / ``build_unweighted_mime_lite``.

  Args:
    model: the model.
    base_optimizer: ``B``, e.g. ``optax.sgd(0.1, momentum=0.9)`` or ``optax.adam(0.01)``.
    server_optimizer: applied to the mean delta; default ``optax.sgd(1.0)``.
    weighting: ``'num_examples'`` or ``'uniform'`` (both aggregates use the same weights).
    aggregator: of the deltas; default the (un)weighted mean.
    full_gradient_aggregator: of the full gradients; default the (un)weighted mean.
    runner: the client runner.
  """
  server_optimizer = _check(model, base_optimizer, server_optimizer, weighting)
  weighted = weighting == "num_examples"

  def client_work(broadcast: Broadcast, client_data, client_state, rng) -> ClientOutput:
    x, base_state = broadcast.params, broadcast.extra
    full_gradient, _ = client_gradient(model, x, client_data, jax.random.fold_in(rng, 1))
    y, metric_sums = train_locally(model, frozen_state(base_optimizer, base_state), x, client_data, rng)
    return ClientOutput(update={"delta": jax.tree.map(jnp.subtract, x, y), "full_gradient": full_gradient},
                        weight=client_weight(weighting, metric_sums), metrics=metric_sums)

  return build_round(
      distributor=model_distributor(extra=lambda state: state.opt_state["base_optimizer"]),
      client_work=client_work,
      aggregator={"delta": resolve_aggregator(aggregator, weighted),
                  "full_gradient": resolve_aggregator(full_gradient_aggregator, weighted)},
      finalizer=_mime_finalizer(base_optimizer, server_optimizer),
      update_template=lambda params: {"delta": params, "full_gradient": params},
      runner=runner,
  )


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


def mime(
    model: Model,
    base_optimizer: optax.GradientTransformation,
    *,
    server_optimizer: optax.GradientTransformation | None = None,
    weighting: str = "num_examples",
    runner: Runner | None = None,
) -> Process:
  """Builds Mime: MimeLite plus the SVRG-style correction ``- grad f_i(x; b) + g`` of every local gradient, with
  ``g`` the cohort's mean full gradient at ``x`` (a first pass over the clients; see the module docstring).

  The round is the template's parts run twice: client work 1 (full gradients) and its mean; then the
  distributor broadcasts ``(s, g)``, client work 2 trains with the correction, the deltas are averaged and the
  Mime finalizer updates the model and ``s``. Metrics are those of the second pass, plus
  ``client_work/full_gradient_pass``.
  """
  server_optimizer = _check(model, base_optimizer, server_optimizer, weighting)
  weighted = weighting == "num_examples"
  full_gradient_mean = resolve_aggregator(None, weighted)
  delta_mean = resolve_aggregator(None, weighted)
  finalizer = _mime_finalizer(base_optimizer, server_optimizer)

  def full_gradient_work(broadcast: Broadcast, client_data, client_state, rng) -> ClientOutput:
    gradient, sums = client_gradient(model, broadcast.params, client_data, rng)
    return ClientOutput(update=gradient, weight=client_weight(weighting, sums), metrics=sums)

  def training_work(broadcast: Broadcast, client_data, client_state, rng) -> ClientOutput:
    base_state, full_gradient = broadcast.extra
    y, sums = svrg_corrected_training(model, base_optimizer, base_state, broadcast.params, full_gradient,
                                      client_data, rng)
    return ClientOutput(update=jax.tree.map(jnp.subtract, broadcast.params, y), weight=client_weight(weighting, sums),
                        metrics=sums)

  def init(params):
    check_params(params)
    params = jax.tree.map(jnp.asarray, params)
    template = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    state = ServerState(params=params, opt_state=finalizer.init(params),
                        aggregator_state={"full_gradient": full_gradient_mean.init(template),
                                          "delta": delta_mean.init(template)},
                        round_num=jnp.zeros((), jnp.int32))
    return place_on_mesh(state, runner)  # in the layout a sharded round returns it: round 2 reuses round 1's program

  def next_fn(state, round_data, rng):
    gradient_key, training_key = jax.random.split(rng)
    # Pass 1: broadcast x; clients compute full gradients; mean.
    first = Broadcast(params=state.params)
    gradients, gradient_metrics, _ = client_work_and_aggregate(
        full_gradient_work, full_gradient_mean, state.aggregator_state["full_gradient"], first, round_data,
        gradient_key, runner)
    # Pass 2: broadcast x, s and g; clients train with the correction; mean of the deltas.
    second = Broadcast(params=state.params, extra=(state.opt_state["base_optimizer"], gradients.result))
    deltas, client_metrics, _ = client_work_and_aggregate(
        training_work, delta_mean, state.aggregator_state["delta"], second, round_data, training_key, runner)
    params, opt_state, finalizer_metrics = finalizer.apply(
        state.opt_state, state.params, {"delta": deltas.result, "full_gradient": gradients.result})
    new_state = state.replace(params=params, opt_state=opt_state, round_num=state.round_num + 1,
                              aggregator_state={"full_gradient": gradients.state, "delta": deltas.state})
    first_bits = bits_per_client(full_gradient_mean, state.aggregator_state["full_gradient"], first, state.params)
    second_bits = bits_per_client(delta_mean, state.aggregator_state["delta"], second, state.params)
    metrics = {
        "distributor": {},
        "client_work": client_metrics | {"full_gradient_pass": gradient_metrics},
        "aggregator": {"full_gradient": gradients.measurements, "delta": deltas.measurements},
        "finalizer": finalizer_metrics,
        **round_bits(first_bits[0] + second_bits[0], first_bits[1] + second_bits[1], round_data),
    }
    return new_state, metrics

  return Process(init=init, next=next_fn)
