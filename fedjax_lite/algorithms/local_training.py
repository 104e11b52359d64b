"""Local training on one client: optimizer steps over the client's packed batches, in a rolled loop.

The loop runs exactly as many steps as the client has non-empty batches (a ``lax.fori_loop`` with a dynamic trip
count, i.e. a ``while`` loop): padding steps cost neither compute nor effect, so ragged clients padded to a common
step axis take the time of their real data. The loop stays rolled, so compile time does not grow with the number
of steps; on XLA:CPU this is fast only for convolutions whose backward pass is canonical
(``fedjax_lite.models.Conv``; see ``../shared/reference/xla-cpu.md``).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from fedjax_lite.core.model import Model, masked_loss_and_metric_sums

PyTree = Any
GradHook = Callable[[PyTree, PyTree, PyTree], PyTree]


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


def train_locally(
    model: Model,
    optimizer: optax.GradientTransformation,
    params: PyTree,
    client_data: PyTree,
    rng: jax.Array,
    *,
    grad_hook: GradHook | None = None,
) -> tuple[PyTree, dict[str, jax.Array]]:
  """Runs ``optimizer`` over the client's batches from ``params``; returns ``(final_params, metric_sums)``.

  Each step differentiates the batch's mean loss over real examples. The metric sums are accumulated from the
  forward pass of each step (before that step's update, as TFF's training metrics are), over real examples only.
  The optimizer state is initialized fresh for the client, as in the reference.

  Args:
    model: the model.
    optimizer: the client optimizer.
    params: the starting (server) parameters.
    client_data: one client's packed data: features ``[steps, batch, ...]``, ``mask`` ``[steps, batch]``.
    rng: the client's key; step ``t`` uses ``fold_in(rng, t)`` (dropout etc.).
    grad_hook: optional ``grad_hook(grads, params, initial_params) -> grads`` (e.g. a proximal term).
  """
  steps, num_steps = split_steps(client_data)
  initial_params = params

  def body(step, carry):
    params, opt_state, sums = carry
    batch = step_batch(steps, step)
    mask = batch.pop("mask")

    def loss_fn(p):
      return masked_loss_and_metric_sums(model, p, batch, mask, jax.random.fold_in(rng, step), True)

    (_, batch_sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    if grad_hook is not None:
      grads = grad_hook(grads, params, initial_params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    sums = {key: sums[key] + batch_sums[key] for key in batch_sums} | {"num_batches": sums["num_batches"] + 1}
    return params, opt_state, sums

  final_params, _, sums = jax.lax.fori_loop(
      0, num_steps, body, (params, optimizer.init(params), zero_metric_sums(model))
  )
  return final_params, sums
