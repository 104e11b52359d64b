"""Client optimizers whose hyperparameters the server sets each round, on ``optax.inject_hyperparams``.

A client optimizer is either an optax ``GradientTransformation`` (used as is), or a function of the learning rate
such as ``optax.sgd`` or ``optax.adam`` together with a learning rate that is a float or an optax schedule of the
ROUND number (TFF ``build_weighted_fed_avg_with_optimizer_schedule``). In the second case the optimizer is
``optax.inject_hyperparams(factory)``: the distributor evaluates the schedule at the server's round number and
broadcasts ``{'learning_rate': lr}``, and each client starts from ``optax.tree_utils.tree_set(init(params),
learning_rate=lr)``. Gradient clipping is ``optax.clip_by_global_norm`` chained in front.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lite.core import validation
from fedjax_lite.core.tree import PyTree

OptimizerFactory = Callable[..., optax.GradientTransformation]


class ScheduledOptimizer(NamedTuple):
  """A client optimizer and the hyperparameters the server broadcasts for it each round.

  Attributes:
    transformation: the optax transformation the clients run.
    hparams: ``round_num -> {'learning_rate': lr}`` (empty when the optimizer has fixed hyperparameters).
  """

  transformation: optax.GradientTransformation
  hparams: Callable[[jax.Array], dict[str, jax.Array]]

  def init(self, params: PyTree, hparams: dict[str, jax.Array]) -> PyTree:
    """The client's starting optimizer state for the broadcast ``hparams``."""
    state = self.transformation.init(params)
    return optax.tree_utils.tree_set(state, **hparams) if hparams else state


def scheduled_optimizer(
    optimizer: optax.GradientTransformation | OptimizerFactory,
    learning_rate: float | optax.Schedule | None = None,
    *,
    grad_clip_norm: float | None = None,
    name: str = "client_optimizer",
    learning_rate_name: str = "client_learning_rate",
) -> ScheduledOptimizer:
  """Resolves ``(optimizer, learning_rate)`` into a :class:`ScheduledOptimizer` (see the module docstring).

  Args:
    optimizer: an optax transformation, or a function of the learning rate (``optax.sgd``, ``optax.adam``...).
    learning_rate: with a function: a positive float or a schedule ``round_num -> rate``; must be None with a
      transformation (which has its own rate).
    grad_clip_norm: optional clip of each local gradient's global L2 norm (``optax.clip_by_global_norm``).
    name, learning_rate_name: the arguments' names in error messages.
  """
  validation.check_positive(f"{name.replace('optimizer', 'grad_clip_norm')}", grad_clip_norm, allow_none=True)
  if isinstance(optimizer, optax.GradientTransformation):
    if learning_rate is not None:
      raise ValueError(f"{name} is an optax GradientTransformation with its own learning rate; pass "
                       f"{learning_rate_name} only with a function of the learning rate such as optax.sgd.")
    transformation, hparams = optimizer, (lambda round_num: {})
  elif callable(optimizer):
    if learning_rate is None:
      raise ValueError(f"{name} is a function of the learning rate; the learning rate is required "
                       f"({learning_rate_name}).")
    if not callable(learning_rate):
      validation.check_positive(learning_rate_name, learning_rate)
    schedule = learning_rate if callable(learning_rate) else (lambda round_num: learning_rate)
    transformation = optax.inject_hyperparams(optimizer)(learning_rate=schedule(0))
    hparams = lambda round_num: {"learning_rate": jnp.asarray(schedule(round_num), jnp.float32)}
  else:
    raise TypeError(f"{name} must be an optax GradientTransformation or a function learning_rate -> one, got "
                    f"{type(optimizer).__name__}.")
  if grad_clip_norm is not None:
    transformation = optax.chain(optax.clip_by_global_norm(grad_clip_norm), transformation)
  return ScheduledOptimizer(transformation, hparams)
