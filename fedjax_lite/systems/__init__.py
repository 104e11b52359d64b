"""Client systems and a simulated clock: how fast, how connected and how available each client is, how long a round
takes in simulated time, and synchronous rounds under realistic conditions (dropout, over-selection with a deadline,
stragglers' partial work).

A layer just above ``core`` (it imports only ``core``), all on the host: a round is planned from the selected
clients' systems and the round's exact per-client bits before it is packed, so the compiled round never changes --
only which clients it holds and how many steps each takes (``core.pack_clients(step_budget=...)``).

* :mod:`~fedjax_lite.systems.population` -- :class:`ClientSystems`, the per-client record of a population;
* :mod:`~fedjax_lite.systems.generators` -- :func:`lognormal_systems` (FedScale's log-normal model and defaults),
  :func:`constant_systems`;
* :mod:`~fedjax_lite.systems.availability` -- :class:`AlwaysOn`, :class:`RandomDropout`,
  :class:`AvailabilityWindows`, :func:`diurnal_availability`;
* :mod:`~fedjax_lite.systems.traces` -- :func:`load_trace`, a user's own trace (CSV/JSON);
* :mod:`~fedjax_lite.systems.clock` -- :func:`client_timings`, :func:`steps_within`, :class:`SimulatedClock`;
* :mod:`~fedjax_lite.systems.buffered` -- :class:`BufferedSchedule`, FedBuff's asynchronous event order (who
  arrives when, from which version; dropouts and on/off windows: only online clients start, a closing window aborts
  a task), :func:`task_seconds_of`;
* :mod:`~fedjax_lite.systems.rounds` -- :class:`RoundPolicy`, :func:`plan_round`, :class:`RoundPlan`,
  :class:`SystemsRounds` (the driver ``training.run_training(systems=...)`` uses), :func:`bits_per_client`.

Example: a round of 10 counted clients out of 13 selected, a 10-minute deadline and partial work::

  >>> import numpy as np
  >>> from fedjax_lite import systems
  >>> population = systems.lognormal_systems(100, seed=0, availability=systems.RandomDropout(0.1))
  >>> policy = systems.RoundPolicy(deadline_seconds=600.0, over_selection=1.3, partial_work=True)
  >>> plan = systems.plan_round(population, np.arange(policy.num_selected(10)), full_steps=np.full(13, 50),
  ...                           num_examples=np.full(13, 1000), batch_size=20, download_bits=8_000_000,
  ...                           upload_bits=8_000_000, policy=policy, target_clients=10, seed=0, round_num=0)
  >>> plan.metrics()["systems/num_counted"] <= 10
  True
"""

from fedjax_lite.systems.availability import (
    AlwaysOn,
    Availability,
    AvailabilityWindows,
    RandomDropout,
    diurnal_availability,
)
from fedjax_lite.systems.buffered import (
    BufferedSchedule,
    BufferedStep,
    default_max_staleness,
    step_metrics,
    task_seconds_of,
)
from fedjax_lite.systems.clock import ClientTimings, SimulatedClock, client_timings, examples_done, steps_within
from fedjax_lite.systems.generators import constant_systems, lognormal_systems
from fedjax_lite.systems.population import ClientSystems
from fedjax_lite.systems.rounds import (
    COUNTED,
    DISCARDED,
    DROPPED_OUT,
    TIMED_OUT,
    RoundPlan,
    RoundPolicy,
    SystemsRounds,
    bits_per_client,
    plan_round,
    round_data_shapes,
)
from fedjax_lite.systems.traces import TraceError, load_trace

__all__ = [
    "BufferedSchedule",
    "BufferedStep",
    "default_max_staleness",
    "step_metrics",
    "task_seconds_of",
    "AlwaysOn",
    "Availability",
    "AvailabilityWindows",
    "ClientSystems",
    "ClientTimings",
    "COUNTED",
    "DISCARDED",
    "DROPPED_OUT",
    "RandomDropout",
    "RoundPlan",
    "RoundPolicy",
    "SimulatedClock",
    "SystemsRounds",
    "TIMED_OUT",
    "TraceError",
    "bits_per_client",
    "client_timings",
    "constant_systems",
    "diurnal_availability",
    "examples_done",
    "lognormal_systems",
    "load_trace",
    "plan_round",
    "round_data_shapes",
    "steps_within",
]
