"""Simulated time in the training loop: what :func:`~fedjax_lite.training.run_training` calls with ``systems=``.

:class:`SimulatedTimeDriver` is the loop's side of :class:`fedjax_lite.systems.SystemsRounds` (synchronous rounds
with client systems: dropout, over-selection with a deadline, partial work, a simulated clock), kept out of the
loop's body so that the loop calls it at three points only:

1. at the start: :meth:`SimulatedTimeDriver.start` -- the per-client bits of the round, read once from
   ``jax.eval_shape`` of the round (static: they depend on shapes only), and the run's configuration extended with
   the systems' description (resuming with other systems is refused); then :meth:`~SimulatedTimeDriver.restore`
   sets the clock from the history (0 for a fresh run, the last round's ``systems/elapsed_seconds`` on resume);
2. preparing round ``r`` (host side, overlapping the device's round ``r - 1``): :meth:`~SimulatedTimeDriver.prepare`
   -- the over-selected cohort of ``(seed, r)``, its plan on the clock, the counted clients packed with their step
   budgets; returns what the loop's own packing returns;
3. recording round ``r``: :meth:`~SimulatedTimeDriver.metrics` -- its ``systems/`` metrics (``round_seconds``,
   ``elapsed_hours``, the counts of dropped, timed-out and discarded clients, ...), merged into the round's record,
   so the metrics file, the trackers and the plot see them (:func:`~fedjax_lite.training.plotting.plot_history`
   with ``x_key='systems/elapsed_hours'`` plots accuracy against simulated hours).

With ``clients_per_round=m`` the loop selects ``ceil(f * m)`` clients per round (uniformly, from ``(seed,
round)``) and the compiled round has ``m`` client slots; with a ``sampler`` (no over-selection) its cohort is the
selection and its ``cohort_capacity`` the slots.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import numpy as np

from fedjax_lite.core.client_state import ClientStateStore
from fedjax_lite.core.federated_data import FederatedData
from fedjax_lite.core.packing import ClientSpec
from fedjax_lite.core.sampling import UniformSampler
from fedjax_lite.systems.rounds import SystemsRounds, bits_per_client, round_data_shapes

PyTree = Any


class SimulatedTimeDriver:
  """The training loop's use of a :class:`~fedjax_lite.systems.SystemsRounds` (module docstring).

  Args:
    rounds: the systems and the round policy.
    train_data: the population; ``client_spec``: its local work.
    clients_per_round: the target ``m`` (give this or ``sampler``); ``sampler``: a sampler whose cohort is the
      selection (over-selection then refused).
    seed: the run's seed; ``sample_with_replacement``: as ``run_training``'s.
    privacy: ``run_training``'s privacy ledger, if any: refused with over-selection.
  """

  def __init__(self, rounds: SystemsRounds, *, train_data: FederatedData, client_spec: ClientSpec,
               clients_per_round: int | None, sampler: Callable[[int], np.ndarray] | None, seed: int,
               sample_with_replacement: bool = False, privacy: Any = None):
    if not isinstance(rounds, SystemsRounds):
      raise TypeError(f"systems must be a fedjax_lite.systems.SystemsRounds, got {type(rounds).__name__}.")
    rounds.systems.check_population(train_data.num_clients, train_data.client_ids)
    if privacy is not None and rounds.policy.over_selection != 1.0:
      raise ValueError("a privacy ledger with over-selection: each round selects ceil(f * m) clients, more than the "
                       "m the ledger's sampling assumes, so its epsilon would be too small; run DP without "
                       "over_selection (dropout and deadlines only remove clients from the sampled cohort).")
    self.rounds = rounds
    self.train_data = train_data
    self.client_spec = client_spec
    self.seed = seed
    if clients_per_round is not None:
      selected = rounds.policy.num_selected(clients_per_round)
      if selected > train_data.num_clients and not sample_with_replacement:
        raise ValueError(f"over-selection: {selected} clients per round (ceil({rounds.policy.over_selection} * "
                         f"{clients_per_round})) but the population has {train_data.num_clients}.")
      self.sampler = UniformSampler(train_data.num_clients, selected, seed, sample_with_replacement)
      self.target = clients_per_round
      self.capacity = clients_per_round
    else:
      if rounds.policy.over_selection != 1.0:
        raise ValueError("systems with over_selection need clients_per_round (the target m; the loop selects "
                         "ceil(f * m) clients), not a sampler.")
      self.sampler = sampler
      self.target = None
      self.capacity = int(sampler.cohort_capacity)
    self._metrics: dict[int, dict] = {}

  def start(self, trace_round: Callable[[dict, PyTree], Any], *, num_steps: int,
            client_states: ClientStateStore | None, config: Mapping[str, Any] | None) -> dict:
    """Reads the round's per-client bits (unless the ``SystemsRounds`` was given them) from the round's output
    shapes; returns ``config`` with the systems' description under ``'systems'`` (what a checkpoint compares on
    resume).

    ``trace_round(round_data_shapes, client_state_shapes)`` returns the round's outputs (or their shapes) for those
    input shapes (``client_state_shapes`` is None without per-client state), as the loop calls its round: e.g.
    ``next_fn.trace(state, round_data_shapes, key).out_info`` for the loop's jitted ``process.next``, whose first
    call then reuses that trace, or ``jax.eval_shape``. The metrics are its ``.metrics`` or its second element.
    """
    if self.rounds.bits is None:
      shapes = round_data_shapes(self.train_data, self.client_spec, num_steps=num_steps, cohort_size=self.capacity)
      state_shapes = None
      if client_states is not None:
        state_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                    client_states.gather([], self.capacity))
      outputs = trace_round(shapes, state_shapes)
      metrics = outputs.metrics if hasattr(outputs, "metrics") else outputs[1]
      self.rounds.set_bits(*bits_per_client(metrics))
    if config is not None and "systems" in config:
      raise ValueError("config must not use the key 'systems' (run_training records the systems' description "
                       "there).")
    return dict(config or {}, systems=self.rounds.describe())

  def restore(self, history: list[Mapping[str, Any]]) -> None:
    """Sets the clock after the rounds of ``history`` (a fresh run: 0; a resumed one: its last round's
    ``systems/elapsed_seconds``)."""
    self.rounds.restore(list(history))
    self._metrics.clear()

  def prepare(self, round_num: int, *, num_steps: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Round ``round_num``'s data (numpy, the counted clients in ``capacity`` slots) and its counted clients."""
    packed, plan = self.rounds.prepare(self.train_data, self.client_spec, self.sampler(round_num), seed=self.seed,
                                       round_num=round_num, target_clients=self.target, num_steps=num_steps,
                                       cohort_size=self.capacity)
    self._metrics[round_num] = self.rounds.metrics(plan)
    return packed, plan.counted_clients

  def metrics(self, round_num: int) -> dict[str, Any]:
    """The ``systems/`` metrics of round ``round_num`` (prepared before)."""
    return self._metrics.pop(round_num)
