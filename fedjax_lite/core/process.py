"""The process template: a pair of pure functions ``(init, next)``.

Everything stateful in a federated round is written this way, after TFF's ``IterativeProcess`` and optax's
``GradientTransformation``: an algorithm is a ``Process`` whose ``next`` maps ``(state, round_data, rng)`` to a new
state and metrics; an aggregator's ``next`` returns a ``MeasuredOutput(state, result, measurements)``. State,
results and measurements are pytrees, so every ``next`` can be ``jax.jit``-ed, ``vmap``-ped or scanned.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from fedjax_lite.core.tree import PyTree


class MeasuredOutput(NamedTuple):
  """What one step of a measured process returns.

  Attributes:
    state: the process state for the next round.
    result: the value the step computed (for an aggregator: the aggregate).
    measurements: a (nested) dict of scalars describing the step, with the reference system's key names.
  """

  state: PyTree
  result: PyTree
  measurements: PyTree


class Process(NamedTuple):
  """A stateful computation as two pure functions.

  Attributes:
    init: builds the initial state (its arguments depend on the process; for an algorithm, the initial
      parameters).
    next: advances the state by one round; for an algorithm ``next(state, round_data, rng) -> (state,
      metrics)``, or ``(state, metrics, new_client_states)`` when ``client_state`` is set.
    client_state: for algorithms with per-client state (e.g. SCAFFOLD): ``client_state(params) -> ONE
      client's initial state``. Such a process reads the cohort's states from ``round_data['client_state']``
      (stacked, see :class:`fedjax_lite.core.ClientStateStore`) and returns their new states. None when the
      clients are stateless.
  """

  init: Callable[..., PyTree]
  next: Callable[..., Any]
  client_state: Callable[[PyTree], PyTree] | None = None
