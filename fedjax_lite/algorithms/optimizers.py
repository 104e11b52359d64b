"""Client optimizers whose hyperparameters the server sets each round, on ``optax.inject_hyperparams``.

A client optimizer is either an optax ``GradientTransformation`` (used as is), or a function of the learning rate
such as ``optax.sgd`` or ``optax.adam`` together with a learning rate that is a float or an optax schedule of the
ROUND number (TFF ``build_weighted_fed_avg_with_optimizer_schedule``). In the second case the optimizer is
``optax.inject_hyperparams(factory)`` and its learning rate is set by the server every round:

* the round template threads it: ``build_round(..., client_optimizer=optimizer)`` evaluates the schedule at the
  server's round number and broadcasts ``{'learning_rate': lr}`` in ``broadcast.hparams``;
* the client work takes the round's optimizer with :meth:`ScheduledOptimizer.for_round`, whose ``init`` starts
  from ``optax.tree_utils.tree_set(init(params), learning_rate=lr)``; gradient corrections (FedProx's proximal
  term, SCAFFOLD's control variates) are chained before it there, so the chained state is built by ``optax.chain``.

A broadcast that lacks a hyperparameter the optimizer needs is an error (the former silent path: a schedule that
stayed at its round-0 value). Gradient clipping is ``optax.clip_by_global_norm`` chained in front.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lite.core import validation
from fedjax_lite.core.tree import PyTree

OptimizerFactory = Callable[..., optax.GradientTransformation]


class ScheduledOptimizer(NamedTuple):
  """A client optimizer and the hyperparameters the server broadcasts for it each round.

  Attributes:
    transformation: the optax transformation the clients run (for a scheduled one, its injected hyperparameters
      hold the round-0 value until :meth:`for_round` sets the round's).
    hparams: ``round_num -> {'learning_rate': lr}`` (empty when the optimizer has fixed hyperparameters).
    names: the hyperparameters the server must broadcast (``('learning_rate',)``, or ``()``).
  """

  transformation: optax.GradientTransformation
  hparams: Callable[[jax.Array], dict[str, jax.Array]]
  names: tuple[str, ...] = ()

  def for_round(self, hparams: Mapping[str, jax.Array],
                *corrections: optax.GradientTransformation) -> optax.GradientTransformation:
    """The client optimizer of a round: ``optax.chain(*corrections, optimizer)`` whose ``init(params)`` sets the
    round's broadcast hyperparameters ``hparams`` (``broadcast.hparams``) in the optimizer's state.

    Raises:
      ValueError: ``hparams`` lacks a hyperparameter the optimizer needs -- the round was built without
        ``build_round(..., client_optimizer=...)``, which broadcasts them.
    """
    hparams = dict(hparams) if isinstance(hparams, Mapping) else {}
    missing = [name for name in self.names if name not in hparams]
    if missing:
      raise ValueError(
          f"the client optimizer's hyperparameters {missing} are set by the server every round (from a schedule "
          f"of the round number), but the round's broadcast carries {sorted(hparams)}: build the round with "
          "build_round(..., client_optimizer=<this ScheduledOptimizer>), which broadcasts them (otherwise the "
          "schedule would silently stay at its round-0 value).")
    optimizer = self.transformation
    if self.names:
      values = {name: hparams[name] for name in self.names}
      optimizer = optax.GradientTransformation(
          lambda params: optax.tree_utils.tree_set(self.transformation.init(params), **values),
          self.transformation.update)
    return optax.chain(*corrections, optimizer) if corrections else optimizer

  def init(self, params: PyTree, hparams: Mapping[str, jax.Array]) -> PyTree:
    """The client's starting optimizer state for the broadcast ``hparams`` (``for_round(hparams).init``)."""
    return self.for_round(hparams).init(params)


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
    transformation, hparams, names = optimizer, (lambda round_num: {}), ()
  elif callable(optimizer):
    if learning_rate is None:
      raise ValueError(f"{name} is a function of the learning rate; the learning rate is required "
                       f"({learning_rate_name}).")
    if not callable(learning_rate):
      validation.check_positive(learning_rate_name, learning_rate)
    schedule = learning_rate if callable(learning_rate) else (lambda round_num: learning_rate)
    transformation = optax.inject_hyperparams(optimizer)(learning_rate=schedule(0))
    hparams = lambda round_num: {"learning_rate": jnp.asarray(schedule(round_num), jnp.float32)}
    names = ("learning_rate",)
  else:
    raise TypeError(f"{name} must be an optax GradientTransformation or a function learning_rate -> one, got "
                    f"{type(optimizer).__name__}.")
  if grad_clip_norm is not None:
    transformation = optax.chain(optax.clip_by_global_norm(grad_clip_norm), transformation)
  return ScheduledOptimizer(transformation, hparams, names)
