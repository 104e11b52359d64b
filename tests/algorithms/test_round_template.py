"""The round template's API: one return record, client states as next's own argument, the parts run apart.

``RoundParts`` composed by hand (distribute, every client's stacked outputs, aggregation of the stack, finalize)
equal ``next`` up to the order of the cohort's sums -- what an asynchronous driver (FedBuff) relies on when it runs
the client work and the server update in separate steps.
"""

from __future__ import annotations

import chex
import jax
import numpy as np
import optax
import pytest

from fedjax_lite import aggregators, algorithms, core
from fedjax_lite.core.client_state import ClientStateStore
from fedjax_lite.core.packing import pack_clients
from tests.conftest import make_population
from tests.tolerances import assert_trees_close_to_rounding

COHORT, SLOTS = np.array([4, 1, 3]), 4  # three clients in four slots: one padding slot


@pytest.fixture(scope="module")
def scaffold_round(tiny_model, tiny_params):
  population = make_population(num_clients=6)
  process = algorithms.scaffold(tiny_model, num_clients=6, client_learning_rate=0.1)
  store = ClientStateStore(process.client_state(tiny_params), 6)
  round_data = pack_clients(population, COHORT, batch_size=4, cohort_size=SLOTS)
  return process, process.init(tiny_params), round_data, store.gather(COHORT, SLOTS)


def test_next_returns_one_record_with_the_client_states(scaffold_round):
  process, state, round_data, gathered = scaffold_round
  output = jax.jit(process.next)(state, round_data, jax.random.key(1), gathered)
  assert isinstance(output, core.RoundOutput)
  assert isinstance(output.state.finalizer_state, algorithms.ScaffoldServerState)
  chex.assert_trees_all_equal_shapes_and_dtypes(output.client_states, gathered)
  # The padding slot hands back the state it was given.
  chex.assert_trees_all_equal(jax.tree.map(lambda x: x[3], output.client_states),
                              jax.tree.map(lambda x: x[3], gathered))


def test_the_parts_run_apart_equal_next(scaffold_round):
  """Client work kept per client, then aggregated from the stack, then the server update: ``next``'s round."""
  process, state, round_data, gathered = scaffold_round
  parts, rng = process.parts, jax.random.key(1)

  @jax.jit
  def by_parts(state, round_data, client_states):
    broadcast = parts.distribute(state, rng)
    outputs = parts.client_outputs(broadcast, round_data, rng, client_states)
    aggregate = parts.aggregate(state, outputs, rng, round_data["num_examples"] > 0)
    new_state, measurements = parts.finalize(state, aggregate)
    return new_state, measurements, outputs

  new_state, measurements, outputs = by_parts(state, round_data, gathered)
  expected = jax.jit(process.next)(state, round_data, rng, gathered)
  assert outputs.weight.shape == (SLOTS,) and float(outputs.weight[3]) == 0.0  # padding: weight 0
  # Same client computations; the stacked sums run in another order than the streamed ones (3 real terms).
  assert_trees_close_to_rounding(new_state.params, expected.state.params, num_terms=3 + 2)
  assert_trees_close_to_rounding(new_state.finalizer_state, expected.state.finalizer_state, num_terms=3 + 2)
  chex.assert_trees_all_equal(outputs.new_state, expected.client_states)  # per client: no sum, bit for bit
  assert int(new_state.round_num) == 1
  assert measurements == expected.metrics["finalizer"]


def test_client_states_are_next_s_own_argument(scaffold_round, tiny_model, tiny_params):
  process, state, round_data, gathered = scaffold_round
  with pytest.raises(ValueError, match="keeps per-client state: pass the cohort's states"):
    process.next(state, round_data, jax.random.key(1))
  with pytest.raises(ValueError, match="not part of the round data"):
    process.next(state, dict(round_data, client_state=gathered), jax.random.key(1), gathered)
  with pytest.raises(ValueError, match=r"client_states\['Dense_0'\]\['bias'\] has shape \[3, 4\].*4 client slots"):
    process.next(state, round_data, jax.random.key(1), jax.tree.map(lambda x: x[:3], gathered))
  stateless = algorithms.fed_avg(tiny_model, client_learning_rate=0.1)
  with pytest.raises(ValueError, match="keeps no per-client state"):
    stateless.next(stateless.init(tiny_params), round_data, jax.random.key(1), gathered)


def _plain_finalizer(scale):
  """A researcher's own finalizer with no finiteness check: ``params - scale * aggregate``."""
  return algorithms.Finalizer(
      init=lambda params: (),
      apply=lambda state, params, aggregate: (
          jax.tree.map(lambda p, a: p - scale * a, params, aggregate), state, {}))


@pytest.mark.parametrize("case", ["every client rejected", "the finalizer's own step"])
def test_the_server_non_finite_rule_holds_for_any_finalizer(case, tiny_model, tiny_params, population):
  """A NaN aggregate (every client rejected: the mean is 0/0), or a NaN the finalizer makes itself, leaves the
  model as it was and reports ``finalizer/update_non_finite`` -- the template's rule, which a finalizer of one's own
  cannot lose (before: NaN parameters)."""
  round_data = pack_clients(population, [0, 1, 2], batch_size=4)
  scale = 1.0
  if case == "every client rejected":
    round_data["x"] = np.full_like(round_data["x"], np.nan)
  else:
    scale = np.inf
  process = algorithms.build_round(
      algorithms.local_training_work(tiny_model, algorithms.scheduled_optimizer(optax.sgd(0.1))),
      aggregator=aggregators.mean(), finalizer=_plain_finalizer(scale))
  state, metrics, _ = jax.jit(process.next)(process.init(tiny_params), round_data, jax.random.key(0))
  chex.assert_trees_all_equal(state.params, process.init(tiny_params).params)
  assert int(metrics["finalizer"]["update_non_finite"]) == 1
  assert int(state.round_num) == 1


def test_a_schedule_the_round_does_not_broadcast_is_an_error(tiny_model, tiny_params, population):
  """The schedule's wiring, forgotten: a round whose broadcast lacks the client optimizer's learning rate. Before,
  every round silently trained at the schedule's round-0 rate; now the client work refuses, naming the fix."""
  optimizer = algorithms.scheduled_optimizer(optax.sgd, lambda round_num: 0.1 / (1.0 + round_num))
  forgotten = algorithms.build_round(
      algorithms.local_training_work(tiny_model, optimizer), aggregator=aggregators.mean(),
      finalizer=algorithms.optimizer_finalizer(optax.sgd(1.0)), distributor=algorithms.model_distributor())
  round_data = pack_clients(population, [0, 1], batch_size=4)
  with pytest.raises(ValueError, match=r"\['learning_rate'\] are set by the server.*client_optimizer="):
    jax.eval_shape(forgotten.next, forgotten.init(tiny_params), round_data, jax.random.key(0))
  with pytest.raises(ValueError, match="client_optimizer="):  # a client work of one's own, same rule
    optimizer.init(tiny_params, {})
