"""The host driver of synchronous rounds with systems: plan on the clock, pack the counted clients, in order."""

from __future__ import annotations

import numpy as np
import pytest

from fedjax_lite import systems
from fedjax_lite.core.packing import ClientSpec, pack_clients
from tests.conftest import make_population

SPEC = ClientSpec(batch_size=3, num_epochs=2)


def driver(**policy):
  population = systems.lognormal_systems(12, seed=0, seconds_per_example_median=0.5,
                                         availability=systems.RandomDropout(0.25))
  return systems.SystemsRounds(population, systems.RoundPolicy(**policy), download_bits=10**6, upload_bits=10**6)


def test_prepare_packs_the_counted_clients_with_their_budgets_and_advances_the_clock():
  data = make_population(num_clients=12, seed=1)
  rounds = driver(deadline_seconds=8.0, over_selection=1.5, partial_work=True)
  elapsed = 0.0
  for round_num in range(4):
    selected = np.arange(round_num, round_num + 6)
    packed, plan = rounds.prepare(data, SPEC, selected, seed=3, round_num=round_num, target_clients=4, num_steps=16,
                                  cohort_size=4)
    expected = pack_clients(data, plan.counted_clients, batch_size=3, num_epochs=2, num_steps=16, cohort_size=4,
                            seed=3, round_num=round_num, step_budget=plan.counted_steps)
    assert packed.keys() == expected.keys()
    for key in packed:
      np.testing.assert_array_equal(packed[key], expected[key])
    np.testing.assert_array_equal(packed["num_examples"][:plan.counted.sum()], plan.num_examples[plan.counted])
    assert plan.start_seconds == elapsed
    elapsed += plan.duration_seconds
    assert rounds.clock.elapsed_seconds == elapsed
    metrics = rounds.metrics(plan)
    assert metrics["systems/elapsed_seconds"] == elapsed and metrics["systems/round_seconds"] == plan.duration_seconds


def test_rounds_in_order_restore_and_bits():
  data = make_population(num_clients=12, seed=1)
  rounds = driver()
  rounds.plan(data, SPEC, [0, 1], seed=0, round_num=0)
  with pytest.raises(ValueError, match="expected round 1, got 3"):
    rounds.plan(data, SPEC, [0, 1], seed=0, round_num=3)
  rounds.restore([{"round": 2, "systems/elapsed_seconds": 1234.5}])
  assert rounds.clock.elapsed_seconds == 1234.5
  assert rounds.plan(data, SPEC, [0, 1], seed=0, round_num=3).start_seconds == 1234.5
  with pytest.raises(ValueError, match="not run with systems"):
    rounds.restore([{"round": 0}])
  rounds.restore([])
  assert rounds.clock.elapsed_seconds == 0.0
  bare = systems.SystemsRounds(systems.constant_systems(12))
  with pytest.raises(ValueError, match="per-client bits first"):
    bare.plan(data, SPEC, [0], seed=0, round_num=0)
  with pytest.raises(ValueError, match="both download_bits and upload_bits"):
    systems.SystemsRounds(systems.constant_systems(12), download_bits=5)
  with pytest.raises(ValueError, match="population has 5"):
    driver().plan(make_population(num_clients=5), SPEC, [0], seed=0, round_num=0)
  with pytest.raises(ValueError, match="no 'broadcasted_bits'"):
    systems.bits_per_client({"aggregated_bits": 5})
  shapes = systems.round_data_shapes(data, SPEC, num_steps=8, cohort_size=3)
  assert shapes["x"].shape == (3, 8, 3, 8) and shapes["mask"].dtype == np.bool_
  described = rounds.describe()
  assert described["policy"]["over_selection"] == 1.0 and len(described["systems_sha256"]) == 64


def test_a_round_where_everyone_drops_out_packs_empty_slots():
  data = make_population(num_clients=12, seed=1)
  rounds = systems.SystemsRounds(systems.constant_systems(12, availability=systems.RandomDropout(1.0)),
                                 download_bits=10, upload_bits=10)
  packed, plan = rounds.prepare(data, SPEC, [0, 1, 2], seed=0, round_num=0, target_clients=3, num_steps=16)
  assert packed["mask"].shape[:2] == (3, 16) and not packed["mask"].any()
  np.testing.assert_array_equal(packed["num_examples"], [0, 0, 0])
  assert plan.metrics()["systems/num_dropped_out"] == 3
  assert 0 < plan.duration_seconds == plan.offline_seconds.max()  # the server waited for the last drop
