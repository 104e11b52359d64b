"""The round template's API: one return record, client states as next's own argument, the parts run apart.

``RoundParts`` composed by hand (distribute, every client's stacked outputs, aggregation of the stack, finalize)
equal ``next`` up to the order of the cohort's sums -- what an asynchronous driver (FedBuff) relies on when it runs
the client work and the server update in separate steps.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lite import aggregators, algorithms, core
from fedjax_lite.core.client_state import ClientStateStore
from fedjax_lite.core.packing import pack_clients
from tests.conftest import make_population
from tests.tolerances import assert_trees_close_to_rounding, float_atol

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
  forgets_its_state = algorithms.build_round(  # a stateful client work that returns no new_state
      algorithms.local_training_work(tiny_model, algorithms.scheduled_optimizer(optax.sgd(0.1))),
      aggregator=aggregators.mean(), finalizer=algorithms.optimizer_finalizer(optax.sgd(1.0)),
      client_state=lambda params: params)
  with pytest.raises(ValueError, match="must return ClientOutput\\(..., new_state=...\\) shaped like"):
    jax.eval_shape(forgets_its_state.next, forgets_its_state.init(tiny_params), round_data, jax.random.key(1),
                   gathered)


def _plain_finalizer():
  """A researcher's own finalizer with no finiteness check: ``params - scale * aggregate``, the scale its state."""
  return algorithms.Finalizer(
      init=lambda params: jnp.ones((), jnp.float32),
      apply=lambda scale, params, aggregate: algorithms.FinalizerOutput(
          state=scale, params=jax.tree.map(lambda p, a: p - scale * a, params, aggregate)))


def test_the_server_non_finite_rule_holds_for_any_finalizer(tiny_model, tiny_params, population):
  """A NaN aggregate (every client rejected: the mean is 0/0), or a NaN the finalizer makes itself (an infinite
  scale), leaves the model and the finalizer's state as they were and reports ``finalizer/update_non_finite`` --
  the template's rule, which a finalizer of one's own cannot lose (before: NaN parameters)."""
  round_data = pack_clients(population, [0, 1, 2], batch_size=4)
  process = algorithms.build_round(
      algorithms.local_training_work(tiny_model, algorithms.scheduled_optimizer(optax.sgd(0.1))),
      aggregator=aggregators.mean(), finalizer=_plain_finalizer())
  step = jax.jit(process.next)
  start = process.init(tiny_params)
  every_client_rejected = (start, dict(round_data, x=np.full_like(round_data["x"], np.nan)))
  own_step_infinite = (start.replace(finalizer_state=jnp.float32(np.inf)), round_data)
  for state, data in (every_client_rejected, own_step_infinite):
    new_state, metrics, _ = step(state, data, jax.random.key(0))
    chex.assert_trees_all_equal(new_state.params, state.params)
    chex.assert_trees_all_equal(new_state.finalizer_state, state.finalizer_state)
    assert int(metrics["finalizer"]["update_non_finite"]) == 1
    assert int(new_state.round_num) == 1
  new_state, metrics, _ = step(start, round_data, jax.random.key(0))  # and a finite round steps as usual
  assert int(metrics["finalizer"]["update_non_finite"]) == 0
  assert not np.array_equal(new_state.params["Dense_0"]["kernel"], start.params["Dense_0"]["kernel"])


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


def _mean_features_work(weights):
  """Each client uploads the mean of its features under two keys, with the weights ``weights(n)`` per key."""

  def work(broadcast, client_data, client_state, rng):
    count = client_data["num_examples"].astype(np.float32)
    mask = client_data["mask"][..., None]
    mean_x = (client_data["x"] * mask).sum(axis=(0, 1)) / jnp.maximum(count, 1.0)
    return core.ClientOutput(update={"weighted": mean_x, "uniform": mean_x}, weight=weights(count),
                             metrics={"num_examples": client_data["num_examples"]})

  return work


def _reporting_finalizer():
  """Keeps the params; reports the aggregate as the finalizer's measurements."""
  return algorithms.Finalizer(init=lambda params: (),
                              apply=lambda state, params, aggregate: algorithms.FinalizerOutput(state, params,
                                                                                                dict(aggregate)))


def test_a_dict_of_aggregators_may_weight_each_key_differently(tiny_params, population):
  round_data = pack_clients(population, [0, 2, 5], batch_size=4, cohort_size=4)  # one padding slot
  template = {key: jax.ShapeDtypeStruct((8,), np.float32) for key in ("weighted", "uniform")}
  process = algorithms.build_round(
      _mean_features_work(lambda count: {"weighted": count, "uniform": np.float32(1.0)}),
      aggregator={"weighted": aggregators.mean(), "uniform": aggregators.mean()},
      finalizer=_reporting_finalizer(), update_template=lambda params: template)
  _, metrics, _ = jax.jit(process.next)(process.init(tiny_params), round_data, jax.random.key(0))
  counts = round_data["num_examples"][:3].astype(np.float64)
  means = np.stack([(round_data["x"][k] * round_data["mask"][k][..., None]).sum(axis=(0, 1)) / counts[k]
                    for k in range(3)])
  # float32 sums of <= 17 examples, then of 3 clients, and one division: a few ulps per term.
  atol = float_atol(17 + 3 + 2, float(np.abs(means).max()))
  np.testing.assert_allclose(metrics["finalizer"]["weighted"], counts @ means / counts.sum(), rtol=0, atol=atol)
  np.testing.assert_allclose(metrics["finalizer"]["uniform"], means.mean(axis=0), rtol=0, atol=atol)
  assert not np.allclose(counts @ means / counts.sum(), means.mean(axis=0), atol=1e3 * atol)  # weights matter


def test_a_dict_of_aggregators_without_update_template_says_what_to_pass(tiny_params, population):
  """Before: a bare ``KeyError: 'weighted'`` from ``process.init``; now one error naming ``update_template``."""
  round_data = pack_clients(population, [0, 2], batch_size=4)
  work = _mean_features_work(lambda count: count)
  dict_of = {"weighted": aggregators.mean(), "uniform": aggregators.mean()}
  process = algorithms.build_round(work, aggregator=dict_of, finalizer=_reporting_finalizer())
  with pytest.raises(ValueError, match=r"client_work's update.*pass update_template= to build_round"):
    jax.eval_shape(process.next, process.init(tiny_params), round_data, jax.random.key(0))
  wrong_keys = algorithms.build_round(work, aggregator=dict_of, finalizer=_reporting_finalizer(),
                                      update_template=lambda params: {"weighted": params})
  with pytest.raises(ValueError, match=r"keys \['uniform', 'weighted'\].*has no \['uniform'\]: pass update_templ"):
    wrong_keys.init(tiny_params)
