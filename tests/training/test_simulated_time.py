"""``run_training(systems=...)``: synchronous rounds with client systems on the simulated clock.

Checked: with ideal systems (always on, no deadline, no over-selection) the run equals the run without systems
metric for metric, and its clock equals an independent NumPy computation of every round's duration; with dropout,
over-selection, a deadline and partial work the counted clients, their steps and examples in the round's own
metrics equal the plan's; a resumed run continues the clock bit for bit; SCAFFOLD's per-client state follows the
counted clients; what cannot be combined is refused.
"""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

from fedjax_lite import systems
from fedjax_lite.algorithms.fed_avg import fed_avg
from fedjax_lite.algorithms.scaffold import scaffold
from fedjax_lite.core.client_state import ClientStateStore
from fedjax_lite.core.packing import ClientSpec
from fedjax_lite.core.process import Process
from fedjax_lite.core.sampling import PoissonSampler, sample_clients
from fedjax_lite.core.tree import tree_size_bits
from fedjax_lite.training.loop import run_training
from fedjax_lite.training.plotting import plot_history

from tests.conftest import make_population

SPEC = ClientSpec(batch_size=4, num_epochs=2)
WALL_TIMES = ("round_time_in_seconds", "evaluation_time_in_seconds")


def without_times(history):
  return [{key: value for key, value in record.items() if key not in WALL_TIMES} for record in history]


def test_ideal_systems_change_nothing_and_the_clock_matches_numpy(tiny_model, tiny_params):
  data = make_population(num_clients=12, seed=2)
  population = systems.lognormal_systems(12, seed=4)
  process = fed_avg(tiny_model, client_learning_rate=0.1)
  plain = run_training(process, data, tiny_params, client_spec=SPEC, clients_per_round=4, num_rounds=3, seed=5,
                       progress=False)
  rounds = systems.SystemsRounds(population)
  traces = []

  def counted_next(*args):
    traces.append(1)
    return process.next(*args)

  timed = run_training(Process(process.init, counted_next, process.client_state), data, tiny_params,
                       client_spec=SPEC, clients_per_round=4, num_rounds=3, seed=5, progress=False, systems=rounds)
  assert len(traces) == 1  # the round traced once: reading its bits reused the jitted round's trace
  for before, after in zip(without_times(plain.history), without_times(timed.history)):
    assert {key: value for key, value in after.items() if not key.startswith("systems/")} == before
  # The bits (read from jax.eval_shape of the round): FedAvg with the mean sends the float32 model and the round's
  # learning rate, and receives the model delta and the client's weight: 32 bits each.
  model_bits = tree_size_bits(tiny_params) + 32
  assert rounds.bits == (model_bits, model_bits)
  assert all(r["broadcasted_bits"] == 4 * model_bits == r["aggregated_bits"] for r in timed.history)
  # The clock, from NumPy: every selected client downloads, trains its E * n examples, uploads; the round lasts
  # as long as its slowest client.
  elapsed = 0.0
  for record in timed.history:
    cohort = sample_clients(12, 4, seed=5, round_num=record["round"])
    examples = data.client_sizes[cohort] * 2
    seconds = (model_bits / population.download_bits_per_second[cohort]
               + (np.ceil(examples / 4) * 0.0 + examples * population.seconds_per_example[cohort])
               + model_bits / population.upload_bits_per_second[cohort])
    assert record["systems/round_seconds"] == seconds.max()
    elapsed += seconds.max()
    assert record["systems/elapsed_seconds"] == elapsed
    assert record["systems/elapsed_hours"] == elapsed / 3600
    assert record["systems/num_counted"] == 4 and record["systems/num_selected"] == 4


def test_realistic_rounds_count_what_the_plan_says(tiny_model, tiny_params, tmp_path):
  data = make_population(num_clients=30, seed=6, min_size=5, max_size=40)
  population = systems.lognormal_systems(30, seed=1, seconds_per_example_median=2.0,
                                         availability=systems.RandomDropout(0.2))
  policy = systems.RoundPolicy(deadline_seconds=60.0, over_selection=1.5, partial_work=True)
  rounds = systems.SystemsRounds(population, policy, record_client_steps=True)
  path = tmp_path / "metrics.jsonl"
  result = run_training(fed_avg(tiny_model, client_learning_rate=0.1), data, tiny_params, client_spec=SPEC,
                        clients_per_round=6, num_rounds=6, seed=3, progress=False, systems=rounds,
                        metrics_path=path)
  records = [json.loads(line) for line in path.read_text().splitlines()]
  assert [r["round"] for r in records] == list(range(6))  # the metrics file has the systems' metrics too
  assert all(r["systems/elapsed_hours"] == h["systems/elapsed_hours"] for r, h in zip(records, result.history))
  replay = systems.SystemsRounds(population, policy, download_bits=rounds.bits[0], upload_bits=rounds.bits[1])
  totals = {"partial": 0, "dropped": 0, "timed_out": 0, "discarded": 0}
  for record in result.history:
    selected = sample_clients(30, 9, seed=3, round_num=record["round"])
    plan = replay.plan(data, SPEC, selected, seed=3, round_num=record["round"], target_clients=6)
    counted = plan.counted
    assert record["systems/num_selected"] == 9 and record["systems/num_counted"] == counted.sum() <= 6
    assert record["systems/client_steps"] == plan.counted_steps.tolist()
    # The round's own metrics count exactly the counted clients' steps and examples.
    assert record["client_work/train/num_batches"] == record["systems/steps_done"] == plan.steps[counted].sum()
    assert record["client_work/train/num_examples"] == plan.num_examples[counted].sum()
    assert record["aggregated_bits"] == counted.sum() * rounds.bits[1]
    assert record["systems/elapsed_seconds"] == replay.clock.elapsed_seconds
    totals["partial"] += record["systems/num_partial"]
    totals["dropped"] += record["systems/num_dropped_out"]
    totals["timed_out"] += record["systems/num_timed_out"]
    totals["discarded"] += record["systems/num_discarded"]
  assert totals["partial"] > 0 and totals["dropped"] > 0 and totals["discarded"] > 0  # the case exercises them
  plot = tmp_path / "hours.png"
  plot_history(result.history, plot, x_key="systems/elapsed_hours")
  assert plot.stat().st_size > 1000


def test_a_resumed_run_continues_the_clock(tiny_model, tiny_params, tmp_path):
  data = make_population(num_clients=10, seed=1)
  population = systems.lognormal_systems(10, seed=2, availability=systems.RandomDropout(0.3))
  policy = systems.RoundPolicy(deadline_seconds=5.0, partial_work=True)
  kwargs = dict(client_spec=SPEC, clients_per_round=3, seed=0, progress=False)
  process = fed_avg(tiny_model, client_learning_rate=0.1)
  whole = run_training(process, data, tiny_params, num_rounds=4, systems=systems.SystemsRounds(population, policy),
                       **kwargs)
  run_training(process, data, tiny_params, num_rounds=2, systems=systems.SystemsRounds(population, policy),
               checkpoint_dir=tmp_path / "ckpt", checkpoint_every=2, **kwargs)
  resumed = run_training(process, data, tiny_params, num_rounds=4, systems=systems.SystemsRounds(population, policy),
                         checkpoint_dir=tmp_path / "ckpt", resume=True, **kwargs)
  assert without_times(resumed.history) == without_times(whole.history)
  # Other systems: refused on resume, naming the difference.
  with pytest.raises(Exception, match="systems"):
    run_training(process, data, tiny_params, num_rounds=4, resume=True, checkpoint_dir=tmp_path / "ckpt",
                 systems=systems.SystemsRounds(population.replace(availability=systems.AlwaysOn()), policy),
                 **kwargs)


def test_per_client_state_follows_the_counted_clients(tiny_model, tiny_params):
  """SCAFFOLD's control variates are gathered and written back for the counted clients only: a client that was
  selected but dropped out every time keeps its initial state."""
  data = make_population(num_clients=10, seed=4)
  population = systems.constant_systems(10, availability=systems.RandomDropout(0.5))
  process = scaffold(tiny_model, num_clients=10, client_learning_rate=0.1)
  store = ClientStateStore(process.client_state(tiny_params), 10)
  initial = jax.tree.leaves(store.gather(np.arange(10)))
  rounds = systems.SystemsRounds(population)
  result = run_training(process, data, tiny_params, client_spec=SPEC, clients_per_round=4, num_rounds=3, seed=2,
                        progress=False, systems=rounds, client_states=store)
  replay = systems.SystemsRounds(population, download_bits=rounds.bits[0], upload_bits=rounds.bits[1])
  ever_counted = set()
  for record in result.history:
    plan = replay.plan(data, SPEC, sample_clients(10, 4, seed=2, round_num=record["round"]), seed=2,
                       round_num=record["round"], target_clients=4)
    ever_counted |= set(plan.counted_clients.tolist())
    assert record["systems/num_counted"] == plan.counted.sum()
  assert 0 < len(ever_counted) < 10
  final = jax.tree.leaves(store.gather(np.arange(10)))
  for client in range(10):
    unchanged = all(np.array_equal(a[client], b[client]) for a, b in zip(initial, final))
    assert unchanged == (client not in ever_counted), client


def test_refusals(tiny_model, tiny_params):
  data = make_population(num_clients=6)
  process = fed_avg(tiny_model, client_learning_rate=0.1)
  rounds = systems.SystemsRounds(systems.constant_systems(6), systems.RoundPolicy(over_selection=2.0))
  base = dict(client_spec=SPEC, num_rounds=1, progress=False)
  with pytest.raises(ValueError, match="rounds_per_dispatch"):
    run_training(process, data, tiny_params, clients_per_round=2, rounds_per_dispatch=2, systems=rounds, **base)
  with pytest.raises(ValueError, match="need clients_per_round"):
    run_training(process, data, tiny_params, sampler=PoissonSampler(6, 0.5), systems=rounds, **base)
  with pytest.raises(ValueError, match="over-selection: 8 clients"):
    run_training(process, data, tiny_params, clients_per_round=4, systems=rounds, **base)
  with pytest.raises(ValueError, match="7 clients but the population has 6"):
    run_training(process, data, tiny_params, clients_per_round=2, systems=systems.SystemsRounds(
        systems.constant_systems(7)), **base)
  with pytest.raises(ValueError, match="privacy ledger with over-selection"):
    import dp_accounting
    from fedjax_lite.privacy import PrivacyLedger, sampled_run_events

    events = sampled_run_events(dp_accounting.GaussianDpEvent(1.0), sampling="without_replacement", num_clients=6,
                                clients_per_round=2)
    run_training(process, data, tiny_params, clients_per_round=2, systems=rounds,
                 privacy=PrivacyLedger(events, 1e-5, "rdp"), **base)
  with pytest.raises(TypeError, match="SystemsRounds"):
    run_training(process, data, tiny_params, clients_per_round=2, systems=systems.constant_systems(6), **base)
