"""The process template: a pair of pure functions ``(init, next)``, and the records their steps return.

Everything stateful in a federated round is written this way, after TFF's ``IterativeProcess`` and optax's
``GradientTransformation``: an algorithm is a ``Process`` whose ``next(state, round_data, rng, client_states=None)``
returns ONE record, :class:`RoundOutput` ``(state, metrics, client_states)``, whether or not the algorithm keeps
per-client state; an aggregator's ``next`` returns a ``MeasuredOutput(state, result, measurements)``. State,
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


class RoundOutput(NamedTuple):
  """What one round of an algorithm returns: ``next(state, round_data, rng, client_states=None) -> RoundOutput``.

  Attributes:
    state: the server state after the round.
    metrics: the round's metrics, a nested dict (grouped ``distributor``, ``client_work``, ``aggregator``,
      ``finalizer``, plus the communication sizes, for algorithms built on the round template).
    client_states: the cohort's new per-client states, stacked ``[client slots, ...]`` in slot order (padding
      slots hand back the state they were given), to scatter back into the population's store
      (:class:`fedjax_lite.core.ClientStateStore`); None for an algorithm whose clients keep no state.
  """

  state: PyTree
  metrics: PyTree
  client_states: PyTree = None


class Process(NamedTuple):
  """A stateful computation as two pure functions.

  Attributes:
    init: builds the initial state (its arguments depend on the process; for an algorithm, the initial
      parameters).
    next: advances the state by one round; for an algorithm ``next(state, round_data, rng, client_states=None)
      -> RoundOutput(state, metrics, client_states)``.
    client_state: for algorithms with per-client state (e.g. SCAFFOLD): ``client_state(params) -> ONE client's
      initial state``. ``next`` then needs the cohort's states (stacked ``[client slots, ...]``, gathered from a
      :class:`fedjax_lite.core.ClientStateStore`) as its ``client_states`` argument and returns their new states
      in ``RoundOutput.client_states``. None when the clients are stateless (``next`` refuses client states).
    parts: for processes built by ``fedjax_lite.algorithms.build_round``: the round's parts as separate functions
      (``algorithms.RoundParts``), for drivers that run them apart (e.g. client work and server update in
      different steps); None otherwise.
  """

  init: Callable[..., PyTree]
  next: Callable[..., RoundOutput]
  client_state: Callable[[PyTree], PyTree] | None = None
  parts: Any = None
