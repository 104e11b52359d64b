"""Local training on one client: optimizer steps over the client's packed batches, in a rolled loop.

The loop (:func:`step_loop`) runs the client's REAL steps only: a ``while_loop`` up to the count of non-empty
batches, so ragged clients padded to a common step axis take the time of their real data (under ``vmap`` the loop
runs to the longest client, masking the others). Reverse-mode differentiation cannot go through a while loop, so
the loop carries a custom JVP: the JVP of the same steps in a loop of static length, the step axis, whose padding
steps are no-ops (``lax.cond``); that one JAX can transpose, so ``jax.grad`` flows through local training and
through whole rounds (e.g. with respect to the client or server learning rate). The static loop alone used to run
forward too; on XLA:CPU each skipped step still copied the carried parameters (~1 ms for the 1.7 M-parameter CNN),
so clients padded from 10 to 32 steps took 0.87x the time with the while loop (``benchmarks/README.md``). The
loop stays rolled, so compile time does not grow with the number of steps; on XLA:CPU this is fast only for
convolutions whose backward pass is canonical (``fedjax_lite.models.Conv``; see ``docs/xla_cpu.md``).

Client work of the algorithms is built from two functions here: :func:`train_locally` (FedAvg, FedProx, SCAFFOLD,
MimeLite, Mime: optimizer steps from the broadcast params) and :func:`client_gradient` (FedSGD, Mime: one gradient
of the client's mean loss at the broadcast params).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from fedjax_lite.algorithms.example_dp import EXAMPLE_NOISE_STREAM, ExampleDp, check_example_dp, private_gradient
from fedjax_lite.core.model import (
    Model,
    masked_loss_and_metric_sums,
    masked_loss_metric_sums_and_state,
    with_model_state,
)
from fedjax_lite.core.tree import PyTree


def split_steps(client_data: PyTree) -> tuple[dict, jax.Array]:
  """``(steps, num_steps)``: the per-step arrays ``[steps, batch, ...]`` and the count of non-empty batches."""
  steps = {key: value for key, value in client_data.items() if key != "num_examples"}
  num_steps = jnp.sum(jnp.any(steps["mask"], axis=-1), dtype=jnp.int32)
  return steps, num_steps


def step_batch(steps: dict, step: jax.Array) -> dict:
  """The batch of local step ``step`` (a dynamic index into the step axis)."""
  return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, step, axis=0, keepdims=False), steps)


def zero_metric_sums(model: Model) -> dict[str, jax.Array]:
  """Zeros for every metric sum a client reports: loss, model metrics, num_examples, num_batches."""
  sums = {"loss": jnp.zeros((), jnp.float32)}
  sums.update({name: jnp.zeros((), jnp.float32) for name in model.metrics})
  sums["num_examples"] = jnp.zeros((), jnp.int32)
  sums["num_batches"] = jnp.zeros((), jnp.int32)
  return sums


def _static_loop(step_fn, steps: dict, num_steps: jax.Array, carry, consts: tuple):
  """The steps in a loop of the step axis' static length, padding steps skipped by ``lax.cond`` (transposable)."""

  def body(step, carry):
    batch = step_batch(steps, step)
    return jax.lax.cond(step < num_steps, lambda c: step_fn(step, batch, c, *consts), lambda c: c, carry)

  return jax.lax.fori_loop(0, steps["mask"].shape[0], body, carry)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _real_steps_loop(step_fn, steps: dict, num_steps: jax.Array, carry, consts: tuple):
  """The real steps only, in a ``while_loop``; differentiated as :func:`_static_loop` (same values)."""

  def body(state):
    step, carry = state
    return step + 1, step_fn(step, step_batch(steps, step), carry, *consts)

  return jax.lax.while_loop(lambda state: state[0] < num_steps, body, (jnp.zeros((), jnp.int32), carry))[1]


@_real_steps_loop.defjvp
def _real_steps_loop_jvp(step_fn, primals, tangents):
  return jax.jvp(functools.partial(_static_loop, step_fn), primals, tangents)


def step_loop(steps: dict, num_steps: jax.Array, step_fn, carry):
  """``carry = step_fn(step, batch, carry)`` for every REAL step ``step < num_steps``, in order.

  Runs the real steps only (a ``while_loop``); differentiable in both modes through a custom JVP that runs the
  same steps in a static-length loop (module docstring). ``step_fn`` may close over traced values (the broadcast
  parameters, a learning rate being differentiated): :func:`jax.closure_convert` makes them explicit inputs, so
  their tangents flow.
  """
  example = (jnp.zeros((), jnp.int32), step_batch(steps, jnp.zeros((), jnp.int32)), carry)
  converted, consts = jax.closure_convert(step_fn, *example)
  return _real_steps_loop(converted, steps, num_steps, carry, tuple(consts))


def add_metric_sums(sums: dict, batch_sums: dict) -> dict:
  return {key: sums[key] + batch_sums[key] for key in batch_sums} | {"num_batches": sums["num_batches"] + 1}


def train_locally(
    model: Model,
    optimizer: optax.GradientTransformation,
    params: PyTree,
    client_data: PyTree,
    rng: jax.Array,
    *,
    opt_state: PyTree | None = None,
    example_dp: ExampleDp | None = None,
) -> tuple[PyTree, dict[str, jax.Array]]:
  """Runs ``optimizer`` over the client's batches from ``params``; returns ``(final_params, metric_sums)``.

  Each step differentiates the batch's mean loss over real examples:
  ``g_t = grad (1/|B_t|) sum_{i in B_t} loss_i(w_t)``, ``w_{t+1} = w_t + optimizer(g_t)``. The metric sums are
  accumulated from the forward pass of each step (before that step's update, as TFF's training metrics are), over
  real examples only. Algorithm-specific gradient corrections (FedProx's proximal term, SCAFFOLD's control
  variates) are optax transformations chained before the optimizer.

  A model with non-trainable state (BatchNorm statistics, :attr:`Model.state_collections`) gets it from the
  step's forward pass: after the optimizer step the state collections are overwritten with the value
  :attr:`Model.train_apply` returned (whatever the optimizer did to them), so batch statistics follow the
  client's data and never the gradient. To keep some parameters out of the carried loop entirely (a frozen base
  shared by every client under ``vmap``), train a :func:`fedjax_lite.core.partial_model`.

  Args:
    model: the model.
    optimizer: the client optimizer.
    params: the starting (server) parameters.
    client_data: one client's packed data: features ``[steps, batch, ...]``, ``mask`` ``[steps, batch]``.
    rng: the client's key; step ``t`` uses ``fold_in(rng, t)`` (dropout etc.).
    opt_state: the optimizer's starting state; default ``optimizer.init(params)`` (fresh on each client, as in
      the reference).
    example_dp: optional :class:`~fedjax_lite.algorithms.ExampleDp`: every step's gradient is DP-SGD's (per-example
      clip, Gaussian noise, divided by the batch size; :mod:`fedjax_lite.algorithms.example_dp`) instead of the
      batch's mean gradient.

  Returns:
    ``(final_params, metric_sums)``, the sums over the client's REAL examples and steps (int32 counts, float32
    sums), to be summed over clients and finalized once on the server (:func:`fedjax_lite.core.finalize_metric_sums`):

    * ``loss``: the sum of the per-example losses (each step's forward pass, before its update);
    * one entry per model metric (``model.metrics``, e.g. ``accuracy``): the sum of its per-example values;
    * ``num_examples``: the real examples processed, over every epoch packed (the FedAvg weight ``n_i``);
    * ``num_batches``: the local steps actually taken, ``tau_i`` (non-empty batches; padding steps are not run),
      e.g. SCAFFOLD's ``K`` and FedNova's normalizer.
  """
  check_example_dp(example_dp, model)
  steps, num_steps = split_steps(client_data)
  noise_rng = jax.random.fold_in(rng, EXAMPLE_NOISE_STREAM)

  def step_fn(step, batch, carry):
    params, opt_state, sums = carry
    mask = batch.pop("mask")

    def loss_fn(p):
      return masked_loss_metric_sums_and_state(model, p, batch, mask, jax.random.fold_in(rng, step))

    if example_dp is None:
      (_, (batch_sums, new_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    else:  # DP-SGD: per-example clipped gradients plus noise (a model without state: new_state is {})
      grads, batch_sums = private_gradient(model, params, batch, mask, jax.random.fold_in(rng, step),
                                           jax.random.fold_in(noise_rng, step), example_dp)
      new_state = {}
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = with_model_state(model, optax.apply_updates(params, updates), new_state)
    return params, opt_state, add_metric_sums(sums, batch_sums)

  opt_state = optimizer.init(params) if opt_state is None else opt_state
  final_params, _, sums = step_loop(steps, num_steps, step_fn, (params, opt_state, zero_metric_sums(model)))
  return final_params, sums


def client_gradient(model: Model, params: PyTree, client_data: PyTree, rng: jax.Array) -> tuple[PyTree, dict]:
  """``(gradient of the client's mean loss at params, metric sums)``: ``g = sum_b grad(sum of losses of batch b)
  / n`` over the client's ``n`` real examples (0 when it has none), one batch at a time in a rolled loop."""
  steps, num_steps = split_steps(client_data)

  def step_fn(step, batch, carry):
    grad_sum, sums = carry
    mask = batch.pop("mask")

    def summed_loss(p):
      mean_loss, batch_sums = masked_loss_and_metric_sums(model, p, batch, mask, jax.random.fold_in(rng, step), True)
      return mean_loss * batch_sums["num_examples"].astype(jnp.float32), batch_sums

    grads, batch_sums = jax.grad(summed_loss, has_aux=True)(params)
    return jax.tree.map(jnp.add, grad_sum, grads), add_metric_sums(sums, batch_sums)

  grad_sum, sums = step_loop(steps, num_steps, step_fn,
                                     (jax.tree.map(jnp.zeros_like, params), zero_metric_sums(model)))
  count = jnp.maximum(sums["num_examples"], 1).astype(jnp.float32)
  return jax.tree.map(lambda g: g / count, grad_sum), sums
