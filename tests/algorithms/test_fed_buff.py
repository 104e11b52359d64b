"""FedBuff (algorithms.fed_buff, systems.BufferedSchedule, training.run_fed_buff) against two independent
re-derivations:

(a) with ``concurrency == K == cohort size`` and equal task durations every server step is a synchronous FedAvg
    round (same cohorts, packing, keys and optimizers): the params and the server optimizer's state equal
    ``algorithms.fed_avg``'s bit for bit over 3 rounds;
(b) with unequal durations (stale and dropped arrivals), the params equal a NumPy event-driven re-implementation (a
    priority queue of finish times, written here from the paper's Algorithm 1 and the documented tie rules) in
    float64, within the rounding tolerance of ``tests/tolerances.py``;
(c) every argument is validated with a message naming it.
"""

from __future__ import annotations

import heapq

import chex
import dp_accounting
import jax
import numpy as np
import optax
import pytest

from fedjax_lite import aggregators, algorithms, privacy, systems
from fedjax_lite.core.device_rounds import round_key
from fedjax_lite.core.packing import ClientSpec
from fedjax_lite.core.sampling import sample_clients
from fedjax_lite.systems.availability import DROPOUT_STREAM
from fedjax_lite.training import run_fed_buff
from tests.algorithms import reference_impl as ref
from tests.algorithms.family_setup import NUM_CLIENTS, make_setup, to_reference
from tests.tolerances import float_atol

SPEC = ClientSpec(batch_size=4)
SEED = 5


def version_rate(version):
  """A client rate scheduled by the downloaded version (the ring must carry each version's own rate)."""
  return 0.1 / (1.0 + version)


def test_equals_fed_avg_bit_for_bit_without_delays():
  population, model, params, _ = make_setup()
  cohort, rounds = 3, 3
  options = dict(client_learning_rate=version_rate, server_optimizer=optax.sgd(0.7, momentum=0.9))
  buff = algorithms.fed_buff(model, concurrency=cohort, buffer_size=cohort, max_staleness=2, **options)
  run = run_fed_buff(buff, population, params, client_spec=SPEC, seed=SEED, num_server_steps=rounds,
                     task_seconds=np.full(NUM_CLIENTS, 3.0))

  process = algorithms.fed_avg(model, **options)
  state, step = process.init(params), jax.jit(process.next)
  num_steps = SPEC.max_num_steps(population)
  for r in range(rounds):
    clients = sample_clients(NUM_CLIENTS, cohort, seed=SEED, round_num=r)
    round_data = SPEC.pack(population, clients, seed=SEED, round_num=r, num_steps=num_steps, cohort_size=cohort)
    state, metrics, _ = step(state, round_data, round_key(jax.random.key(SEED), r))

  chex.assert_trees_all_equal(run.state.server.params, state.params)
  chex.assert_trees_all_equal(run.state.server.finalizer_state, state.finalizer_state)
  assert int(run.state.version) == rounds
  last = run.history[-1]
  assert last["fedbuff/server_steps"] == rounds and last["fedbuff/mean_staleness"] == 0.0
  assert last["fedbuff/arrivals"] == cohort and last["fedbuff/dropped_stale"] == 0
  assert last["fedbuff/elapsed_seconds"] == 3.0 * rounds
  assert last["client_work/train/loss"] == float(metrics["client_work"]["train"]["loss"])


# ------------------------------------------------------------------------------------- (b) NumPy reference

def reference_event_order(durations, *, concurrency, buffer_size, max_staleness, seed, num_updates, dropout=0.0,
                          windows=None, period=None, idle=None):
  """FedBuff's event order, re-derived: a heap of (finish time, start order); at each instant the arrivals in start
  order (stale ones dropped, an update whenever K are buffered), then one new client per arrival, drawn from the
  clients neither in flight nor in the buffer. With ``dropout``
  ``p``, the clients of the ``b``-th start draw ``u = default_rng([seed, b, DROPOUT_STREAM]).random((2, n))`` and
  those with ``u[0] < p`` go offline at ``u[1] x`` their duration (RandomDropout's documented draws): an event that
  frees the place and brings no update. With ``windows`` (per client a list of ``(start, end)`` within ``[0,
  period)``, none ending at the period), only clients inside a window are drawn; a client whose window closes
  before its task ends goes offline then; places that find no free online client stay idle until the next instant,
  or until the first free client's next window opens. ``idle``, a list, receives the idle places at each update.
  Returns the updates as lists of (client, downloaded version), the number dropped as stale and the number that
  went offline."""
  queue, busy, started, draws = [], set(), 0, 0
  version, buffer, updates, dropped, offline = 0, [], [], 0, 0
  vacant, wake = 0, np.inf

  def phase(t):
    return t % period if period is not None else t

  def remaining(client, t):  # seconds online from t on (0: offline)
    if windows is None:
      return np.inf
    return next((end - phase(t) for start, end in windows[client] if start <= phase(t) < end), 0.0)

  def wait(client, t):  # seconds until the client's next window opens
    waits = [start - phase(t) for start, _ in windows[client] if start > phase(t)]
    if period is not None:
      waits += [period - phase(t) + start for start, _ in windows[client]]
    return min(waits, default=np.inf)

  def start(count, now):
    nonlocal started, draws, vacant, wake
    free = sorted(set(range(len(durations))) - busy)
    online = [client for client in free if now + remaining(client, now) > now]  # a window's end after now
    vacant, wake = count - min(count, len(online)), np.inf
    if vacant:
      wake = now + min((wait(client, now) for client in free if client not in online), default=np.inf)
      wake = wake if wake > now else np.nextafter(now, np.inf)
    count = min(count, len(online))
    if not count:
      return
    chosen = np.random.default_rng([seed, draws, 0x5A3D]).choice(np.array(online), size=count, replace=False)
    u = np.random.default_rng([seed, draws, DROPOUT_STREAM]).random((2, count))
    draws += 1
    for k, client in enumerate(chosen):
      online_for = remaining(client, now)
      goes_offline = u[0, k] < dropout or durations[client] > online_for
      gone = u[1, k] * durations[client] if windows is None else online_for
      finish = now + (gone if goes_offline else durations[client])
      heapq.heappush(queue, (finish, started, int(client), version, not goes_offline))
      busy.add(int(client))
      started += 1

  start(concurrency, 0.0)
  while len(updates) < num_updates:
    now = min(queue[0][0] if queue else np.inf, wake)
    instant = []
    while queue and queue[0][0] == now:
      instant.append(heapq.heappop(queue))
    for _, _, client, downloaded, arrives in instant:
      if not arrives:
        busy.discard(client)
        offline += 1
        continue
      if version - downloaded > max_staleness:
        busy.discard(client)
        dropped += 1
        continue
      buffer.append((client, downloaded))  # the client stays unavailable until its update is applied
      if len(buffer) == buffer_size:
        updates.append(buffer)
        if idle is not None:
          idle.append(vacant)
        busy.difference_update(c for c, _ in buffer)
        buffer, version = [], version + 1
    start(len(instant) + vacant, now)
  if idle is not None:
    del idle[num_updates:]  # the last instant may complete more updates than asked for
  return updates[:num_updates], dropped, offline


def reference_fed_buff(params, population, updates, *, client_learning_rate, server_learning_rate, clip=None):
  """Algorithm 1 of Nguyen et al. 2022 in float64: each update ``x <- x - eta_g / K sum_i delta_i / sqrt(1 +
  tau_i)``, ``delta_i`` the local SGD of arrival ``i`` from the version it downloaded; with ``clip``, each scaled
  update clipped to L2 norm ``clip`` (over all leaves) before the sum (a DP aggregator inside the buffer)."""
  num_steps = SPEC.max_num_steps(population)
  versions = [to_reference(params)]
  for step, arrivals in enumerate(updates):
    clients = [client for client, _ in arrivals]
    round_data = SPEC.pack(population, clients, seed=SEED, round_num=step, num_steps=num_steps,
                           cohort_size=len(clients))
    total = ref.zeros_like(versions[-1])
    for slot, (_, downloaded) in enumerate(arrivals):
      start = versions[downloaded]
      delta = ref.tree_map(np.subtract, start, ref.local_sgd(start, round_data, slot, client_learning_rate))
      weight = 1.0 / np.sqrt(1.0 + (step - downloaded))
      scaled = ref.tree_map(lambda d: weight * d, delta)
      if clip is not None:
        norm = np.sqrt(sum(float(np.sum(leaf ** 2)) for leaf in scaled.values()))
        scaled = ref.tree_map(lambda d: d * min(1.0, clip / norm), scaled)
      total = ref.tree_map(np.add, total, scaled)
    versions.append(ref.tree_map(lambda x, a: x - server_learning_rate * a / len(arrivals), versions[-1], total))
  return versions[-1]


@pytest.mark.parametrize("clip", [None, 0.05])
def test_equals_numpy_event_driven_reference_with_delays(clip):
  """``clip``: a DP aggregator (fixed clip, noise 0 so the reference is exact) runs inside the buffer: it clips
  each staleness-scaled update of the K arrivals and averages over K."""
  population, model, params, _ = make_setup()
  durations = np.array([1.0, 2.5, 1.3, 4.0, 0.7, 9.0])
  config = dict(concurrency=4, buffer_size=2, max_staleness=1)
  num_updates = 5
  dp = {} if clip is None else {"aggregator": aggregators.gaussian_fixed(0.0, config["buffer_size"], clip)}
  buff = algorithms.fed_buff(model, **config, client_learning_rate=0.1, server_optimizer=optax.sgd(0.8),
                             weighting="uniform", **dp)
  run = run_fed_buff(buff, population, params, client_spec=SPEC, seed=SEED, num_server_steps=num_updates,
                     task_seconds=durations)
  updates, dropped, _ = reference_event_order(durations, **config, seed=SEED, num_updates=num_updates)

  staleness = [[step - version for _, version in arrivals] for step, arrivals in enumerate(updates)]
  assert max(map(max, staleness)) > 0, "the example must exercise stale arrivals"
  assert dropped > 0, "the example must exercise a dropped arrival"
  assert sum(record["fedbuff/dropped_stale"] for record in run.history) == dropped
  assert [record["fedbuff/mean_staleness"] for record in run.history] == [float(np.mean(s)) for s in staleness]

  expected = reference_fed_buff(params, population, updates, client_learning_rate=0.1, server_learning_rate=0.8,
                                clip=clip)
  actual = to_reference(run.state.server.params)
  # Error budget (float32 vs float64): a param after 5 server steps has gone through at most 5 chained versions,
  # each of <= 4 local steps of ~20 roundings (a 9-term dot product, softmax, update) plus ~10 for the weighted
  # sum, the clip and the server step: 5 x (4 x 20 + 10) = 450 roundings of the params' scale.
  for key in expected:
    atol = float_atol(450, float(np.max(np.abs(expected[key]))))
    np.testing.assert_allclose(actual[key], expected[key], rtol=0, atol=atol, err_msg=key)


def test_availability_windows_equal_the_numpy_reference():
  """On/off windows through the driver: the task durations from the clients' systems, the event order (online
  clients only, aborted tasks, idle places) and the params equal the NumPy re-derivations'."""
  population, model, params, _ = make_setup()
  period = 30.0
  windows = [[(0.0, 25.0)], [(2.0, 9.0)], [(0.0, 4.0), (12.0, 28.0)], [(5.0, 29.0)], [(1.0, 3.0)], [(0.0, 14.0)]]
  availability = systems.AvailabilityWindows.from_windows(windows, period_seconds=period)
  clients = systems.constant_systems(NUM_CLIENTS, seconds_per_example=0.25, download_bits_per_second=1e4,
                                     availability=availability)
  config = dict(concurrency=3, buffer_size=2, max_staleness=2)
  buff = algorithms.fed_buff(model, **config, client_learning_rate=0.1, server_optimizer=optax.sgd(0.8),
                             weighting="uniform")
  run = run_fed_buff(buff, population, params, client_spec=SPEC, seed=SEED, num_server_steps=6, systems=clients)
  download, upload = buff.bits_per_client(params)
  durations = systems.task_seconds_of(clients, population, SPEC, download_bits=download, upload_bits=upload)
  updates, _, offline = reference_event_order(durations, **config, seed=SEED, num_updates=6, windows=windows,
                                              period=period)
  assert offline > 0 and sum(record["fedbuff/dropped_offline"] for record in run.history) == offline
  expected = reference_fed_buff(params, population, updates, client_learning_rate=0.1, server_learning_rate=0.8)
  actual = to_reference(run.state.server.params)
  for key in expected:  # the error budget of test_equals_numpy_event_driven_reference_with_delays, 6 steps
    atol = float_atol(6 * (4 * 20 + 10), float(np.max(np.abs(expected[key]))))
    np.testing.assert_allclose(actual[key], expected[key], rtol=0, atol=atol, err_msg=key)


def test_simulated_time_budget_and_systems_durations():
  population, model, params, _ = make_setup()
  buff = algorithms.fed_buff(model, concurrency=3, buffer_size=2, max_staleness=3, client_learning_rate=0.1)
  clients = systems.constant_systems(NUM_CLIENTS, seconds_per_example=0.5, download_bits_per_second=1e6)
  run = run_fed_buff(buff, population, params, client_spec=SPEC, seed=1, simulated_seconds=12.0, systems=clients)
  times = [record["fedbuff/elapsed_seconds"] for record in run.history]
  assert run.history and times == sorted(times) and times[-1] <= 12.0 < run.schedule.peek_time()
  download, upload = buff.bits_per_client(params)
  assert download == upload == 32 * (8 * 4 + 4 + 1)  # the model (or delta) and the learning rate (or weight)
  assert run.history[0]["aggregated_bits"] == 2 * upload
  assert len(run.schedule.in_flight["clients"]) == 3


# ----------------------------------------------------------------------------------------- (c) validation

@pytest.mark.parametrize("kwargs, error, match", [
    (dict(concurrency=0), ValueError, "concurrency"),
    (dict(buffer_size=0), ValueError, "buffer_size"),
    (dict(max_staleness=-1), ValueError, "max_staleness"),
    (dict(staleness_weight=0.5), TypeError, "staleness_weight must be a function"),
    (dict(staleness_weight=lambda s: s[:1] * 1.0), ValueError, "same shape"),
    (dict(staleness_weight=lambda s: 1.0 / s), ValueError, "finite and >= 0"),
    (dict(client_work_wrapper=lambda w: w), TypeError, "unexpected keyword"),
    (dict(local_state=True), ValueError, "does not support fed_avg's \\['local_state'\\]"),
])
def test_fed_buff_arguments(kwargs, error, match):
  _, model, _, _ = make_setup()
  config = dict(concurrency=2, buffer_size=2, max_staleness=1, client_learning_rate=0.1)
  with pytest.raises(error, match=match):
    algorithms.fed_buff(model, **{**config, **kwargs})


def test_driver_and_schedule_arguments():
  population, model, params, _ = make_setup()
  buff = algorithms.fed_buff(model, concurrency=2, buffer_size=2, max_staleness=1, client_learning_rate=0.1)
  durations = np.ones(NUM_CLIENTS)
  with pytest.raises(ValueError, match="num_server_steps or simulated_seconds"):
    run_fed_buff(buff, population, params, client_spec=SPEC, task_seconds=durations)
  with pytest.raises(ValueError, match="exactly one of systems"):
    run_fed_buff(buff, population, params, client_spec=SPEC, num_server_steps=1)
  with pytest.raises(ValueError, match="one duration per client"):
    run_fed_buff(buff, population, params, client_spec=SPEC, num_server_steps=1, task_seconds=np.ones(3))
  with pytest.raises(TypeError, match="FedBuff"):
    run_fed_buff(algorithms.fed_avg(model, client_learning_rate=0.1), population, params, client_spec=SPEC,
                 num_server_steps=1, task_seconds=durations)
  with pytest.raises(ValueError, match="positive, finite"):
    systems.BufferedSchedule([1.0, 0.0], concurrency=1, buffer_size=1, max_staleness=0)
  with pytest.raises(ValueError, match=r"concurrency \+ buffer_size - 1 \(3 \+ 1 - 1\) must be <= the number of "
                                       r"clients \(2\)"):
    systems.BufferedSchedule([1.0, 2.0], concurrency=3, buffer_size=1, max_staleness=0)


def test_a_non_finite_arrival_is_rejected_and_counted():
  """A client whose data makes its update NaN gets weight 0 in the buffer (the template's client rule), the step
  stays finite, and stale or future rows given to ``next`` are padding."""
  population, model, params, _ = make_setup()
  buff = algorithms.fed_buff(model, concurrency=3, buffer_size=3, max_staleness=1, client_learning_rate=0.1)
  round_data = SPEC.pack(population, [0, 1, 2], seed=0, round_num=0, num_steps=SPEC.max_num_steps(population),
                         cohort_size=3)
  round_data["x"] = round_data["x"].copy()
  round_data["x"][1, 0, 0, 0] = np.nan  # client slot 1's first example
  step = jax.jit(buff.next)
  out = step(buff.init(params), round_data, jax.random.key(0), np.zeros(3, np.int32))
  assert int(out.metrics["client_work"]["num_non_finite_clients"]) == 1
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(out.state.server.params))
  assert int(out.metrics["fedbuff"]["num_applied"]) == 3 and int(out.state.version) == 1
  # Version 1 now: a row from version 5 (the future) is padding, like a row staler than max_staleness would be.
  out = step(out.state, round_data, jax.random.key(1), np.array([1, 0, 5], np.int32))
  assert int(out.metrics["fedbuff"]["num_applied"]) == 2 and int(out.metrics["fedbuff"]["max_staleness"]) == 1
  assert int(out.metrics["aggregated_bits"]) == 2 * int(out.metrics["aggregated_bits"].bits_per_client)


def test_privacy_ledger_of_the_server_steps():
  """The documented accounting: the DP aggregator's per-step event from the state after a step, composed over the
  server steps with every client in every step (no sampling amplification), as dp_accounting computes it."""
  population, model, params, _ = make_setup()
  aggregator = aggregators.gaussian_fixed(1.0, 2, 0.1)
  buff = algorithms.fed_buff(model, concurrency=3, buffer_size=2, max_staleness=2, client_learning_rate=0.1,
                             aggregator=aggregator, weighting="uniform")
  run = run_fed_buff(buff, population, params, client_spec=SPEC, seed=1, num_server_steps=2,
                     task_seconds=np.linspace(1.0, 2.0, NUM_CLIENTS))
  event = aggregators.extract_dp_event(aggregator, run.state.server.aggregator_state)
  ledger = privacy.PrivacyLedger(privacy.sampled_run_events(event, sampling="all"), 1e-5)
  expected = dp_accounting.rdp.RdpAccountant().compose(dp_accounting.SelfComposedDpEvent(event, 2)).get_epsilon(1e-5)
  assert np.isclose(ledger.epsilon_after(run.history[-1]["fedbuff/server_steps"]), expected, rtol=1e-9)
