"""Immutable records exchanged within a round."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

PyTree = Any


class ClientOutput(NamedTuple):
  """What one client's update function returns.

  Attributes:
    update: the model delta ``initial_params - final_params`` (a pseudo-gradient), or for FedSGD the gradient.
    weight: the client's aggregation weight (float32 scalar): examples processed, 1.0, or 0.0 when rejected.
    metrics: a pytree of per-client metric SUMS (summed over clients, then finalized on the server).
  """

  update: PyTree
  weight: jax.Array
  metrics: PyTree
