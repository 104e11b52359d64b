"""Every algorithm of the family equals an independent float64 NumPy re-implementation (``reference_impl.py``).

Softmax regression on ``make_population``'s ragged clients (15, 12, 10, 7, 7, 3 examples; batches of 4, so 1 to 4
local steps with partial last batches), two rounds with different cohorts of 3 clients in 4 slots (one padding
slot), example-weighted and uniform (setup and tolerance in ``family_setup.py``; FedProx's own checks in
``test_fed_prox.py``). Also: the adaptive server steps alone, SCAFFOLD's client-state bookkeeping (never-sampled
clients, padding slots, every runner strategy, the server control variate as the mean of all clients'), and
``jax.grad`` through three FedAvg rounds with respect to the server and client learning rates against central
finite differences.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lite import algorithms
from fedjax_lite.core.client_state import ClientStateStore
from fedjax_lite.core.packing import max_num_steps, pack_clients
from fedjax_lite.core.runner import Runner, client_mesh
from fedjax_lite.models.adapter import from_flax
from tests.algorithms import reference_impl as ref
from tests.algorithms.family_setup import (
    BATCH_SIZE,
    CLIENT_LR,
    COHORT_SIZE,
    COHORTS,
    NUM_CLASSES,
    NUM_FEATURES,
    RTOL,
    SoftmaxRegression,
    assert_close_to_reference,
    compiled,
    decaying_rate,
    make_setup,
    reference_server,
    to_reference,
)
from tests.conftest import make_population


@pytest.fixture(scope="module")
def setup():
  return make_setup()


FED_AVG_FAMILY = ["fed_avg", "fed_avg_schedule", "fed_prox", "fed_avgm", "fed_adam", "fed_yogi", "fed_adagrad"]
# Every algorithm example-weighted; uniform weighting for each distinct client/aggregation code path (the FedOpt
# family shares FedAvg's client work and aggregator and differs only in the server step, checked weighted). One
# compilation per case keeps the file within the test budget.
CASES = ([(name, "num_examples") for name in FED_AVG_FAMILY + ["mime_lite", "mime", "mime_lite_adam"]]
         + [(name, "uniform") for name in ("fed_avg", "fed_prox", "mime_lite", "mime")])


# Adam as Mime's base optimizer normalizes every local step, m-hat / (sqrt(v-hat) + eps): an entry whose gradient
# g_j is small next to the gradient's scale |g| gets the rounding of the gradient's sums (~10 u |g|) amplified by
# |g| / |g_j| in its step. Here the smallest entries are ~1e-3 of the largest (a batch's mean bias gradient near 0),
# so a step's relative error may reach ~10 u x 200 = 1.2e-4 on such an entry; few steps are that ill-conditioned,
# hence 1e-4 on the parameters' scale (measured 2.2e-6). A semantic error (state not frozen, a step count off by
# one, the state updated from the wrong gradient) changes steps by ~lr (1 - b1) = 1e-2.
RTOL_ADAM = 1e-4


@pytest.mark.parametrize("name, weighting", CASES)
def test_two_rounds_equal_numpy_reference(setup, name, weighting):
  _, model, params, rounds = setup
  process, step = compiled(name, model, weighting)
  state = process.init(params)
  expected = to_reference(params)
  server = None if name.startswith("mime") else reference_server(name)
  if name == "mime_lite_adam":  # with optax's float32 bias correction (see reference_impl.BaseAdam)
    base, rtol = ref.BaseAdam(CLIENT_LR, bias_correction_dtype=np.float32), RTOL_ADAM
  else:
    base, rtol = ref.BaseMomentum(CLIENT_LR, 0.9), RTOL
  base_state = base.init(expected)
  for r, round_data in enumerate(rounds):
    state, metrics, _ = step(state, round_data, jax.random.key(r))
    if name.startswith("mime"):
      expected, base_state = ref.mime_round(expected, base_state, round_data, base=base, weighting=weighting,
                                            svrg=name == "mime")
    else:
      client_lr = decaying_rate(r) if name == "fed_avg_schedule" else CLIENT_LR
      expected = ref.fed_avg_round(expected, round_data, client_learning_rate=client_lr, server=server,
                                   weighting=weighting, proximal_strength=0.5 if name == "fed_prox" else 0.0)
    assert_close_to_reference(state.params, expected, rtol, what=f"round {r + 1} params")
    assert int(metrics["client_work"]["train"]["num_examples"]) == int(round_data["num_examples"].sum())
  # The base optimizer's state, updated on the server from the mean full gradient (optax's state layout).
  if name in ("mime_lite", "mime"):
    trace = state.finalizer_state.base_optimizer[0].trace
    assert_close_to_reference(to_reference(trace), base_state, what="base optimizer momentum")
  elif name == "mime_lite_adam":
    adam_state = state.finalizer_state.base_optimizer[0]
    assert int(adam_state.count) == base_state[0] == len(rounds)
    assert_close_to_reference(to_reference(adam_state.mu), base_state[1], rtol, what="base Adam first moment")
    assert_close_to_reference(to_reference(adam_state.nu), base_state[2], rtol, what="base Adam second moment")
  # The rounds moved the model by much more than the tolerance: the comparison is not vacuous.
  moved = max(float(np.max(np.abs(to_reference(state.params)[k] - to_reference(params)[k]))) for k in expected)
  assert moved > 1e3 * RTOL


@pytest.mark.parametrize("kind, bias_correction", [("adagrad", False), ("adam", False), ("adam", True),
                                                    ("yogi", False), ("yogi", True)])
def test_adaptive_server_step_equals_reference(kind, bias_correction):
  """``adaptive_server_optimizer`` for 4 steps with a nonzero initial accumulator (as TFF's FedAdagrad/FedYogi
  start), against Reddi et al.'s Algorithm 2 in float64; optionally with TFF/optax's bias correction
  ``sqrt(1 - beta2^t) / (1 - beta1^t)``."""
  beta1, beta2, tau, eta, v0 = 0.9, 0.99, 1e-3, 0.05, 0.01
  optimizer = algorithms.adaptive_server_optimizer(kind, eta, beta1=beta1, beta2=beta2, adaptivity=tau,
                                                   initial_accumulator=v0, bias_correction=bias_correction)
  server = ref.ServerAdaptive(kind, eta, beta1=beta1, beta2=beta2, tau=tau, initial_accumulator=v0,
                              bias_correction=bias_correction)
  rng = np.random.default_rng(1)
  params = {"W": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=(2,)).astype(np.float32)}
  expected = ref.as_float64(params)
  state = optimizer.init(params)
  for _ in range(4):
    delta = {key: (0.1 * rng.normal(size=value.shape)).astype(np.float32) for key, value in params.items()}
    updates, state = optimizer.update(delta, state, params)
    params = optax.apply_updates(params, updates)
    expected = server.step(expected, ref.as_float64(delta))
  # A few roundings per step on parameters of scale ~1 (steps <= eta / (1 - beta1) = 0.5): ~1e-7 relative.
  assert_close_to_reference(params, expected)


# ----------------------------------------------------------------------------------------------- SCAFFOLD

def run_scaffold_round(step, state, store, cohort, round_data, rng):
  gathered = store.gather(np.asarray(cohort), COHORT_SIZE)
  state, metrics, new_states = step(state, round_data, rng, gathered)
  store.scatter(np.asarray(cohort), new_states, round_data["num_examples"])
  return state, metrics, new_states, gathered


@pytest.mark.parametrize("weighting, runner", [
    ("uniform", None), ("num_examples", None),
    # The client states come back stacked in slot order whatever the strategy (a mesh deals clients by size).
    ("uniform", Runner("sequential", mesh=client_mesh(1))), ("uniform", Runner("vmap")),
    ("uniform", Runner("chunked", chunk_size=3)),
], ids=["uniform", "num_examples", "sequential_mesh1", "vmap", "chunked3"])
def test_scaffold_two_rounds_equal_numpy_reference(setup, weighting, runner):
  population, model, params, rounds = setup
  n = population.num_clients
  process, step = compiled("scaffold", model, weighting, runner)
  state = process.init(params)
  store = ClientStateStore(process.client_state(params), n)
  expected = to_reference(params)
  server_control = ref.zeros_like(expected)
  client_controls = {i: ref.zeros_like(expected) for i in range(n)}
  for r, (cohort, round_data) in enumerate(zip(COHORTS, rounds)):
    row0_before = jax.tree.map(lambda a: np.array(a[0]), store.arrays)
    state, _, new_states, gathered = run_scaffold_round(step, state, store, cohort, round_data, jax.random.key(r))
    expected, server_control = ref.scaffold_round(
        expected, server_control, client_controls, cohort, round_data, client_learning_rate=CLIENT_LR,
        server_learning_rate=1.0, num_clients=n, weighting=weighting)
    assert_close_to_reference(state.params, expected, what=f"round {r + 1} params")
    assert_close_to_reference(to_reference(state.finalizer_state.control_variate), server_control,
                              what=f"round {r + 1} server control")
    for client in sorted(set(sum(COHORTS[:r + 1], []))):  # every client sampled so far
      assert_close_to_reference(to_reference(jax.tree.map(lambda a: a[client], store.arrays)),
                                client_controls[client], what=f"round {r + 1} client {client} control")
    # Padding slot 3: the template hands back its gathered state unchanged, and the store never writes it.
    chex.assert_trees_all_equal(jax.tree.map(lambda a: np.asarray(a[3]), new_states),
                                jax.tree.map(lambda a: np.asarray(a[3]), gathered))
    if 0 not in cohort:
      chex.assert_trees_all_equal(jax.tree.map(lambda a: np.array(a[0]), store.arrays), row0_before)
    # Never-sampled clients keep their initial (zero) state.
    for client in set(range(n)) - set(sum(COHORTS[:r + 1], [])):
      chex.assert_trees_all_equal(jax.tree.map(lambda a: np.asarray(a[client]), store.arrays),
                                  jax.tree.map(np.zeros_like, process.client_state(params)))
    # The |S|/N rule keeps c the mean of all N clients' c_i (sum of <= 6 float32 terms, same roundings).
    mean_control = jax.tree.map(lambda a: np.mean(np.asarray(a, np.float64), axis=0), store.arrays)
    assert_close_to_reference(to_reference(state.finalizer_state.control_variate), to_reference(mean_control),
                              what=f"round {r + 1} c vs mean c_i")
  sampled = set(sum(COHORTS, []))
  assert 4 not in sampled and 0 in sampled  # the setup exercises both kinds of clients


def test_scaffold_rejects_a_non_finite_client_and_keeps_its_state(setup):
  """A client whose local training gives NaN is rejected (TFF's rule): it adds nothing to the deltas or to c,
  its c_i stays as it was, and c remains the mean of the c_i. The reference simply leaves that client out.

  Example-weighted: a rejected client has weight 0. (Under uniform weighting the unweighted mean counts every
  real slot, as TFF's ``UnweightedMeanFactory`` does, so a rejected client's zero delta stays in the denominator.)
  """
  population, model, params, rounds = setup
  n = population.num_clients
  process, step = compiled("scaffold", model, "num_examples")
  state = process.init(params)
  store = ClientStateStore(process.client_state(params), n)
  expected = to_reference(params)
  server_control = ref.zeros_like(expected)
  client_controls = {i: ref.zeros_like(expected) for i in range(n)}
  poisoned = dict(rounds[1], x=rounds[1]["x"].copy())
  poisoned["x"][2, 0, 0, 0] = np.nan  # slot 2 of round 2 is client 2, which has a c_i from round 1
  without_client = dict(rounds[1], num_examples=np.where(np.arange(COHORT_SIZE) == 2, 0, rounds[1]["num_examples"]))
  for r, (round_data, reference_data) in enumerate([(rounds[0], rounds[0]), (poisoned, without_client)]):
    state_before = jax.tree.map(lambda a: np.array(a[2]), store.arrays)
    state, metrics, _, _ = run_scaffold_round(step, state, store, COHORTS[r], round_data, jax.random.key(r))
    expected, server_control = ref.scaffold_round(
        expected, server_control, client_controls, COHORTS[r], reference_data, client_learning_rate=CLIENT_LR,
        server_learning_rate=1.0, num_clients=n, weighting="num_examples")
    assert int(metrics["client_work"]["num_non_finite_clients"]) == r
    assert_close_to_reference(state.params, expected, what=f"round {r + 1} params")
    assert_close_to_reference(to_reference(state.finalizer_state.control_variate), server_control,
                              what=f"round {r + 1} server control")
  chex.assert_trees_all_equal(jax.tree.map(lambda a: np.array(a[2]), store.arrays), state_before)
  assert np.any(state_before["Dense_0"]["kernel"] != 0)
  mean_control = jax.tree.map(lambda a: np.mean(np.asarray(a, np.float64), axis=0), store.arrays)
  assert_close_to_reference(to_reference(state.finalizer_state.control_variate), to_reference(mean_control),
                            what="c vs mean c_i")


def test_scaffold_refuses_a_client_twice_in_a_cohort(setup):
  """Regression: with replacement a client could fill two slots; the finalizer added (1/N) Delta c_i for both
  while the store kept one state, so c drifted from mean_i c_i (0.059 at |c| = 0.15 with cohort [1, 1, 2]). A
  client holds one state per round: the store and run_training refuse repeated clients."""
  population, model, params, rounds = setup
  process, _ = compiled("scaffold", model, "uniform")
  store = ClientStateStore(process.client_state(params), population.num_clients)
  with pytest.raises(ValueError, match="sample without replacement"):
    store.gather(np.asarray([1, 1, 2]), COHORT_SIZE)
  from fedjax_lite.core.packing import ClientSpec
  from fedjax_lite.training import run_training

  with pytest.raises(ValueError, match="without replacement"):
    run_training(process, population, params, client_spec=ClientSpec(batch_size=BATCH_SIZE), clients_per_round=2,
                 num_rounds=1, sample_with_replacement=True, progress=False)


def test_scaffold_with_every_client_of_a_two_client_population():
  population = make_population(num_clients=2, seed=4, min_size=5, max_size=11)
  model = from_flax(SoftmaxRegression(), np.zeros((1, NUM_FEATURES), np.float32))
  params = model.init(jax.random.key(2))
  # A scheduled client rate (option II divides by the ROUND's K eta_l) and a global step size eta_g = 0.8
  # (the paper's x <- x + eta_g mean(Delta y)).
  process = algorithms.scaffold(model, num_clients=2, client_learning_rate=decaying_rate,
                                server_optimizer=optax.sgd(0.8))
  step = jax.jit(process.next)
  state = process.init(params)
  store = ClientStateStore(process.client_state(params), 2)
  expected = to_reference(params)
  server_control = ref.zeros_like(expected)
  client_controls = {0: ref.zeros_like(expected), 1: ref.zeros_like(expected)}
  num_steps = max_num_steps(population, batch_size=BATCH_SIZE)
  for r in range(4):
    round_data = pack_clients(population, [0, 1], batch_size=BATCH_SIZE, num_steps=num_steps, seed=1, round_num=r)
    state, _, new_states = step(state, round_data, jax.random.key(r), store.gather(np.array([0, 1])))
    store.scatter(np.array([0, 1]), new_states, round_data["num_examples"])
    expected, server_control = ref.scaffold_round(
        expected, server_control, client_controls, [0, 1], round_data, client_learning_rate=decaying_rate(r),
        server_learning_rate=0.8, num_clients=2, weighting="uniform")
    # Four rounds: up to 4 x 3 sequential steps, twice the error budget of the two-round comparison.
    assert_close_to_reference(state.params, expected, rtol=2 * RTOL, what=f"round {r + 1} params")
    for client in (0, 1):
      assert_close_to_reference(to_reference(jax.tree.map(lambda a: a[client], store.arrays)),
                                client_controls[client], rtol=2 * RTOL, what=f"client {client} control")
    # Full participation: c is the mean of both c_i, i.e. c <- c + (1/2) sum Delta c_i = mean(c_i+).
    mean_control = jax.tree.map(lambda a: np.mean(np.asarray(a, np.float64), axis=0), store.arrays)
    assert_close_to_reference(to_reference(state.finalizer_state.control_variate), to_reference(mean_control),
                              what=f"round {r + 1} c vs mean c_i")
  assert float(np.max(np.abs(server_control["W"]))) > 1e-3  # the control variates are not trivially zero


# ------------------------------------------------------------------------------ gradients through rounds

def test_grad_of_loss_after_three_fed_avg_rounds_matches_finite_differences(setup):
  """``d loss(x_3) / d(server lr, client lr)`` by reverse mode through 3 rounds vs central differences, x64."""
  population, model, _, _ = setup
  with jax.enable_x64(True):
    rng = np.random.default_rng(11)
    params = {"Dense_0": {"kernel": jnp.asarray(0.3 * rng.normal(size=(NUM_FEATURES, NUM_CLASSES))),
                          "bias": jnp.asarray(0.1 * rng.normal(size=(NUM_CLASSES,)))}}
    num_steps = max_num_steps(population, batch_size=BATCH_SIZE)
    rounds = []
    for r, cohort in enumerate(([0, 1, 2], [3, 4, 5], [0, 3, 5])):
      data = pack_clients(population, cohort, batch_size=BATCH_SIZE, num_steps=num_steps, cohort_size=COHORT_SIZE,
                          seed=2, round_num=r)
      rounds.append(dict(data, x=data["x"].astype(np.float64)))
    x_all = jnp.asarray(population.examples["x"], jnp.float64)
    y_all = jnp.asarray(population.examples["y"])

    def loss_after_rounds(rates):
      server_lr, client_lr = rates[0], rates[1]
      process = algorithms.fed_avg(model, client_optimizer=optax.sgd(client_lr),
                                   server_optimizer=optax.sgd(server_lr))
      state = process.init(params)
      for r, round_data in enumerate(rounds):
        state, _, _ = process.next(state, round_data, jax.random.key(r))
      logits = model.apply(state.params, {"x": x_all}, None, False)
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y_all))

    rates = jnp.array([0.8, 0.3], jnp.float64)
    value, grad = jax.jit(jax.value_and_grad(loss_after_rounds))(rates)
    loss = jax.jit(loss_after_rounds)
    assert value.dtype == jnp.float64
    # Central differences: truncation O(h^2 f''') (measured 4e-8 relative at h = 1e-4; 4e-6 at 1e-3), rounding
    # ~ eps64 |loss| / h = 2e-12: far below the bound 1e-3 (measured |grad - fd| / |fd| <= 5e-8).
    h = 1e-4
    numeric = np.array([(float(loss(rates + h * e)) - float(loss(rates - h * e))) / (2 * h) for e in np.eye(2)])
  np.testing.assert_array_less(np.abs(np.asarray(grad) - numeric), 1e-3 * np.abs(numeric))
  assert np.all(np.abs(numeric) > 1e-3)  # both rates matter: the check is not 0 == 0
