"""Every algorithm of the family equals an independent float64 NumPy re-implementation (``reference_impl.py``).

Softmax regression on ``make_population``'s ragged clients (15, 12, 10, 7, 7, 3 examples; batches of 4, so 1 to 4
local steps with partial last batches), two rounds with different cohorts of 3 clients in 4 slots (one padding
slot), example-weighted and uniform. Also: FedProx with ``mu = 0`` is FedAvg bit for bit, the proximal term is the
gradient of ``mu/2 ||w - w0||^2``, SCAFFOLD's client-state bookkeeping (never-sampled clients, padding slots, the
server control variate as the mean of all clients'), and ``jax.grad`` through three FedAvg rounds with respect to
the server and client learning rates against central finite differences.
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lite import algorithms
from fedjax_lite.core.client_state import ClientStateStore
from fedjax_lite.models.adapter import from_flax
from fedjax_lite.core.packing import max_num_steps, pack_clients
from tests.algorithms import reference_impl as ref
from tests.conftest import make_population

NUM_FEATURES, NUM_CLASSES, BATCH_SIZE, COHORT_SIZE = 8, 4, 4, 4
COHORTS = ([0, 2, 5], [1, 3, 2])  # round 1 and round 2: 3 real clients in 4 slots; client 4 is never sampled
CLIENT_LR = 0.1

# Tolerance, per leaf: max |library - reference| <= RTOL * max |reference|. The library runs in float32 (unit
# roundoff u = 2^-24 = 6e-8), the reference in float64 (exact by comparison). A parameter after two rounds is the
# result of at most 2 x 4 sequential local steps per client; each step's gradient is a sum of <= 4 examples x
# (8 features + 1) products plus a softmax, so each step adds at most ~(9 + 4 + a few) u of relative error to the
# parameters, and the weighted mean over 3 clients, the server step (adaptive ones: m / (sqrt(v) + tau), a few
# more roundings) add a few u per round. Worst case about 2 x 4 x 20 u + 2 x 10 u = 180 u = 1.1e-5 relative to
# the parameters' scale; errors of independent roundings add like a random walk, so 1e-5 (~170 u) holds with
# margin while any algorithmic difference (a wrong sign, weight or step count) is of order CLIENT_LR = 0.1.
RTOL = 1e-5


class SoftmaxRegression(nn.Module):
  """``logits = x @ W + b`` on flattened ``x``."""

  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


def to_reference(params):
  return ref.as_float64({"W": params["Dense_0"]["kernel"], "b": params["Dense_0"]["bias"]})


def assert_close_to_reference(params, expected, rtol=RTOL, what="params"):
  actual = to_reference(params) if "Dense_0" in params else ref.as_float64(params)
  for key in expected:
    scale = float(np.max(np.abs(expected[key])))
    error = float(np.max(np.abs(actual[key] - expected[key])))
    assert error <= rtol * scale, f"{what}[{key}]: max error {error:.3g} > {rtol} x scale {scale:.3g}"


def make_setup():
  """``(population, model, initial params, [round 1 data, round 2 data])``."""
  population = make_population(num_features=NUM_FEATURES, num_classes=NUM_CLASSES)
  model = from_flax(SoftmaxRegression(), np.zeros((1, NUM_FEATURES), np.float32))
  rng = np.random.default_rng(3)
  params = {"Dense_0": {"kernel": (0.3 * rng.normal(size=(NUM_FEATURES, NUM_CLASSES))).astype(np.float32),
                        "bias": (0.1 * rng.normal(size=(NUM_CLASSES,))).astype(np.float32)}}
  num_steps = max_num_steps(population, batch_size=BATCH_SIZE)  # one shape for both rounds: compile once
  rounds = [pack_clients(population, cohort, batch_size=BATCH_SIZE, num_steps=num_steps, cohort_size=COHORT_SIZE,
                         seed=5, round_num=r) for r, cohort in enumerate(COHORTS)]
  return population, model, params, rounds


@pytest.fixture(scope="module")
def setup():
  return make_setup()


def build(name, model, weighting):
  """The library's process for ``name`` and a function returning the reference's server step."""
  lr = CLIENT_LR
  if name == "fed_avg":
    return algorithms.fed_avg(model, client_learning_rate=lr, weighting=weighting)
  if name == "fed_avg_server_lr":
    return algorithms.fed_avg(model, client_learning_rate=lr, server_optimizer=optax.sgd(0.7), weighting=weighting)
  if name == "fed_prox":
    return algorithms.fed_prox(model, 0.5, client_learning_rate=lr, weighting=weighting)
  if name == "fed_avgm":
    return algorithms.fed_avgm(model, client_learning_rate=lr, weighting=weighting)
  if name == "fed_adam":
    return algorithms.fed_adam(model, server_learning_rate=0.05, client_learning_rate=lr, weighting=weighting)
  if name == "fed_yogi":
    return algorithms.fed_yogi(model, server_learning_rate=0.05, client_learning_rate=lr, weighting=weighting)
  if name == "fed_adagrad":
    return algorithms.fed_adagrad(model, server_learning_rate=0.05, client_learning_rate=lr, weighting=weighting)
  if name == "mime_lite":
    return algorithms.mime_lite(model, optax.sgd(lr, momentum=0.9), weighting=weighting)
  if name == "mime":
    return algorithms.mime(model, optax.sgd(lr, momentum=0.9), weighting=weighting)
  raise AssertionError(name)


def reference_server(name):
  """The paper's server step with the library's defaults (Reddi et al.: tau 1e-3, beta1 0.9, beta2 0.99; FedAdagrad
  beta1 0; FedAvgM momentum 0.9, rate 1)."""
  if name in ("fed_avg", "fed_prox"):
    return ref.ServerSGD(1.0)
  if name == "fed_avg_server_lr":
    return ref.ServerSGD(0.7)
  if name == "fed_avgm":
    return ref.ServerSGD(1.0, momentum=0.9)
  if name == "fed_adam":
    return ref.ServerAdaptive("adam", 0.05, beta1=0.9, beta2=0.99, tau=1e-3)
  if name == "fed_yogi":
    return ref.ServerAdaptive("yogi", 0.05, beta1=0.9, beta2=0.99, tau=1e-3)
  if name == "fed_adagrad":
    return ref.ServerAdaptive("adagrad", 0.05, beta1=0.0, beta2=0.0, tau=1e-3)
  raise AssertionError(name)


FED_AVG_FAMILY = ["fed_avg", "fed_avg_server_lr", "fed_prox", "fed_avgm", "fed_adam", "fed_yogi", "fed_adagrad"]


@pytest.mark.parametrize("weighting", ["num_examples", "uniform"])
@pytest.mark.parametrize("name", FED_AVG_FAMILY + ["mime_lite", "mime"])
def test_two_rounds_equal_numpy_reference(setup, name, weighting):
  _, model, params, rounds = setup
  process = build(name, model, weighting)
  step = jax.jit(process.next)
  state = process.init(params)
  expected = to_reference(params)
  server = None if name.startswith("mime") else reference_server(name)
  momentum = ref.zeros_like(expected)
  for r, round_data in enumerate(rounds):
    state, metrics = step(state, round_data, jax.random.key(r))
    if name.startswith("mime"):
      expected, momentum = ref.mime_round(expected, momentum, round_data, learning_rate=CLIENT_LR, beta=0.9,
                                          weighting=weighting, svrg=name == "mime")
    else:
      expected = ref.fed_avg_round(expected, round_data, client_learning_rate=CLIENT_LR, server=server,
                                   weighting=weighting, proximal_strength=0.5 if name == "fed_prox" else 0.0)
    assert_close_to_reference(state.params, expected, what=f"round {r + 1} params")
    assert int(metrics["client_work"]["train"]["num_examples"]) == int(round_data["num_examples"].sum())
  if name.startswith("mime"):  # the base optimizer's momentum, updated on the server from the full gradient
    trace = state.opt_state["base_optimizer"][0].trace
    assert_close_to_reference(to_reference(trace), momentum, what="base optimizer momentum")
  # The rounds moved the model by much more than the tolerance: the comparison is not vacuous.
  moved = max(float(np.max(np.abs(to_reference(state.params)[k] - to_reference(params)[k]))) for k in expected)
  assert moved > 1e3 * RTOL


# ------------------------------------------------------------------------------------------------ FedProx

@pytest.mark.parametrize("weighting", ["num_examples", "uniform"])
def test_fed_prox_with_zero_strength_is_fed_avg_bit_for_bit(setup, weighting):
  _, model, params, rounds = setup
  results = []
  for process in (algorithms.fed_avg(model, client_learning_rate=CLIENT_LR, weighting=weighting),
                  algorithms.fed_prox(model, 0.0, client_learning_rate=CLIENT_LR, weighting=weighting)):
    step = jax.jit(process.next)
    state = process.init(params)
    for r, round_data in enumerate(rounds):
      state, _ = step(state, round_data, jax.random.key(r))
    results.append(state.params)
  chex.assert_trees_all_equal(results[0], results[1])


def test_proximal_term_is_the_gradient_of_the_proximal_objective():
  """``proximal_term(mu)`` adds ``grad_w mu/2 ||w - w0||^2`` (central finite differences, float64 NumPy)."""
  mu = 0.7
  rng = np.random.default_rng(0)
  w0 = {"a": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=(2,)).astype(np.float32)}
  w = {"a": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=(2,)).astype(np.float32)}
  loss_grad = {"a": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=(2,)).astype(np.float32)}
  term = algorithms.proximal_term(mu)
  corrected, _ = term.update(loss_grad, term.init(w0), w)

  def proximal(flat_w):  # mu/2 ||w - w0||^2 over both leaves, in float64
    anchor = np.concatenate([np.ravel(w0["a"]), np.ravel(w0["b"])]).astype(np.float64)
    return 0.5 * mu * np.sum((flat_w - anchor) ** 2)

  flat = np.concatenate([np.ravel(w["a"]), np.ravel(w["b"])]).astype(np.float64)
  h = 1e-4  # a quadratic: central differences are exact up to float64 rounding (~1e-16 / 1e-4 = 1e-12)
  numeric = np.array([(proximal(flat + h * e) - proximal(flat - h * e)) / (2 * h) for e in np.eye(flat.size)])
  added = np.concatenate([np.ravel(np.asarray(corrected[k], np.float64) - np.asarray(loss_grad[k], np.float64))
                          for k in ("a", "b")])
  # float32 terms of magnitude <= |g| + mu |w - w0| ~ 5: a few float32 ulps of that.
  np.testing.assert_allclose(added, numeric, rtol=0, atol=4 * 5 * np.finfo(np.float32).eps * 5)
  assert np.all(np.sign(added) == np.sign(flat - np.concatenate([np.ravel(w0["a"]), np.ravel(w0["b"])])))


def test_one_proximal_step_with_zero_loss_gradient_moves_towards_the_anchor():
  mu, lr = 0.5, 0.1
  w0 = {"w": jnp.array([1.0, -2.0, 0.5])}
  w = {"w": jnp.array([3.0, -1.0, 0.5])}
  optimizer = optax.chain(algorithms.proximal_term(mu), optax.sgd(lr))
  updates, _ = optimizer.update({"w": jnp.zeros(3)}, optimizer.init(w0), w)
  stepped = optax.apply_updates(w, updates)
  # w - lr mu (w - w0) = w - 0.05 (w - w0): exact in float32 for these values up to one rounding each.
  np.testing.assert_allclose(stepped["w"], [2.9, -1.05, 0.5], rtol=2 * np.finfo(np.float32).eps)
  assert float(jnp.linalg.norm(stepped["w"] - w0["w"])) < float(jnp.linalg.norm(w["w"] - w0["w"]))


# ----------------------------------------------------------------------------------------------- SCAFFOLD

def run_scaffold_round(step, state, store, cohort, round_data, rng):
  with_state = dict(round_data, client_state=store.gather(np.asarray(cohort), COHORT_SIZE))
  state, metrics, new_states = step(state, with_state, rng)
  store.scatter(np.asarray(cohort), new_states, round_data["num_examples"])
  return state, metrics, new_states, with_state["client_state"]


@pytest.mark.parametrize("weighting", ["uniform", "num_examples"])
def test_scaffold_two_rounds_equal_numpy_reference(setup, weighting):
  population, model, params, rounds = setup
  n = population.num_clients
  process = algorithms.scaffold(model, num_clients=n, client_learning_rate=CLIENT_LR, weighting=weighting)
  step = jax.jit(process.next)
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
    assert_close_to_reference(to_reference(state.opt_state["control_variate"]), server_control,
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
    assert_close_to_reference(to_reference(state.opt_state["control_variate"]), to_reference(mean_control),
                              what=f"round {r + 1} c vs mean c_i")
  sampled = set(sum(COHORTS, []))
  assert 4 not in sampled and 0 in sampled  # the setup exercises both kinds of clients


def test_scaffold_with_every_client_of_a_two_client_population():
  population = make_population(num_clients=2, seed=4, min_size=5, max_size=11)
  model = from_flax(SoftmaxRegression(), np.zeros((1, NUM_FEATURES), np.float32))
  params = model.init(jax.random.key(2))
  process = algorithms.scaffold(model, num_clients=2, client_learning_rate=CLIENT_LR)
  step = jax.jit(process.next)
  state = process.init(params)
  store = ClientStateStore(process.client_state(params), 2)
  expected = to_reference(params)
  server_control = ref.zeros_like(expected)
  client_controls = {0: ref.zeros_like(expected), 1: ref.zeros_like(expected)}
  num_steps = max_num_steps(population, batch_size=BATCH_SIZE)
  for r in range(4):
    round_data = pack_clients(population, [0, 1], batch_size=BATCH_SIZE, num_steps=num_steps, seed=1, round_num=r)
    with_state = dict(round_data, client_state=store.gather(np.array([0, 1])))
    state, _, new_states = step(state, with_state, jax.random.key(r))
    store.scatter(np.array([0, 1]), new_states, round_data["num_examples"])
    expected, server_control = ref.scaffold_round(
        expected, server_control, client_controls, [0, 1], round_data, client_learning_rate=CLIENT_LR,
        server_learning_rate=1.0, num_clients=2, weighting="uniform")
    # Four rounds: up to 4 x 3 sequential steps, twice the error budget of the two-round comparison.
    assert_close_to_reference(state.params, expected, rtol=2 * RTOL, what=f"round {r + 1} params")
    for client in (0, 1):
      assert_close_to_reference(to_reference(jax.tree.map(lambda a: a[client], store.arrays)),
                                client_controls[client], rtol=2 * RTOL, what=f"client {client} control")
    # Full participation: c is the mean of both c_i, i.e. c <- c + (1/2) sum Delta c_i = mean(c_i+).
    mean_control = jax.tree.map(lambda a: np.mean(np.asarray(a, np.float64), axis=0), store.arrays)
    assert_close_to_reference(to_reference(state.opt_state["control_variate"]), to_reference(mean_control),
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
        state, _ = process.next(state, round_data, jax.random.key(r))
      logits = model.apply(state.params, {"x": x_all}, None, False)
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y_all))

    rates = jnp.array([0.8, 0.3], jnp.float64)
    value, grad = jax.jit(jax.value_and_grad(loss_after_rounds))(rates)
    loss = jax.jit(loss_after_rounds)
    assert value.dtype == jnp.float64
    h = 1e-4  # central differences: truncation O(h^2 f''') ~ 1e-8 relative, rounding ~ eps(loss) / h
    numeric = np.array([(float(loss(rates + h * e)) - float(loss(rates - h * e))) / (2 * h) for e in np.eye(2)])
  np.testing.assert_array_less(np.abs(np.asarray(grad) - numeric), 1e-3 * np.abs(numeric))
  assert np.all(np.abs(numeric) > 1e-3)  # both rates matter: the check is not 0 == 0
