"""Client optimizers whose learning rate is set by the server each round.

A client optimizer is given either as an optax ``GradientTransformation`` (used as is) or as a function of the
learning rate, such as ``optax.sgd`` or ``optax.adam``, together with a learning rate that is a float or an optax
schedule of the ROUND number. The schedule's state (the round) lives in the server state, and the round's rate is
broadcast to the clients with the model (TFF ``build_weighted_fed_avg_with_optimizer_schedule``).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from fedjax_lite.core import validation

OptimizerFactory = Callable[[jax.Array], optax.GradientTransformation]


class ClientOptimizer:
  """A client optimizer resolved from ``(optimizer, learning_rate)``; see the module docstring."""

  def __init__(
      self,
      optimizer: optax.GradientTransformation | OptimizerFactory,
      learning_rate: float | optax.Schedule | None,
      *,
      grad_clip_norm: float | None = None,
      name: str = "client_optimizer",
  ):
    if isinstance(optimizer, optax.GradientTransformation):
      if learning_rate is not None:
        raise ValueError(
            f"{name} is an optax GradientTransformation with its own learning rate; pass client_learning_rate "
            f"only with a function of the learning rate such as optax.sgd."
        )
      self._factory = None
      self._fixed = optimizer
    elif callable(optimizer):
      if learning_rate is None:
        raise ValueError(f"{name} is a function of the learning rate; the learning rate is required.")
      if not callable(learning_rate):
        validation.check_positive(f"{name} learning_rate", learning_rate)
      self._factory = optimizer
      self._fixed = None
    else:
      raise TypeError(f"{name} must be an optax GradientTransformation or a function learning_rate -> one, "
                      f"got {type(optimizer).__name__}.")
    validation.check_positive("client_grad_clip_norm", grad_clip_norm, allow_none=True)
    self._learning_rate = learning_rate
    self._grad_clip_norm = grad_clip_norm

  def hparams(self, round_num: jax.Array) -> dict[str, jax.Array]:
    """The values broadcast to clients in round ``round_num`` (the scheduled learning rate)."""
    if self._factory is None:
      return {}
    rate = self._learning_rate(round_num) if callable(self._learning_rate) else self._learning_rate
    return {"learning_rate": jnp.asarray(rate, jnp.float32)}

  def build(self, hparams: dict[str, jax.Array]) -> optax.GradientTransformation:
    """The client's optax transformation for the broadcast ``hparams``."""
    optimizer = self._fixed if self._factory is None else self._factory(hparams["learning_rate"])
    if self._grad_clip_norm is not None:
      optimizer = optax.chain(optax.clip_by_global_norm(self._grad_clip_norm), optimizer)
    return optimizer
