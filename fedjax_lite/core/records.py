"""Immutable records exchanged within a round."""

from __future__ import annotations

from typing import NamedTuple

import jax

from fedjax_lite.core.tree import PyTree


class ClientOutput(NamedTuple):
  """What one client's work function returns.

  Attributes:
    update: what the client uploads to the aggregator: the model delta ``initial_params - final_params`` (a
      pseudo-gradient), FedSGD's gradient, or a dict of several quantities when the round has one aggregator per
      key (e.g. SCAFFOLD's ``{'delta': ..., 'control': ...}``).
    weight: the client's aggregation weight (float32 scalar): examples processed, 1.0, or 0.0 when rejected; or,
      with a dict of aggregators, a dict of such scalars with the same keys (one weight per uploaded quantity).
      Padding slots get weight 0 from the round template, whatever the client work returns.
    metrics: a pytree of per-client metric SUMS (summed over clients, then finalized on the server).
    new_state: the client's state after the round (stateful algorithms, e.g. SCAFFOLD's control variate);
      None for stateless ones. Scattered back into the population's store; padding slots never write.
  """

  update: PyTree
  weight: jax.Array
  metrics: PyTree
  new_state: PyTree = None
