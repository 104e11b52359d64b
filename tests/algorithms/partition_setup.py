"""The shared setup of the partitioned-round tests: a two-layer perceptron whose body (``'body'``, 4 -> 4) and
head (``'head'``, 4 -> 4 classes) have 20 parameters each -- a half-local model -- on ``make_population``'s ragged
clients (batches of 4), three rounds of three clients in four slots (one padding slot), client 2 in every round
so that its local head carries over.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lite.core.client_state import ClientStateStore
from fedjax_lite.core.packing import max_num_steps, pack_clients
from fedjax_lite.models.adapter import from_flax
from tests.conftest import make_population

NUM_CLIENTS, NUM_FEATURES, HIDDEN, NUM_CLASSES, BATCH_SIZE, SLOTS = 6, 4, 4, 4, 4, 4
COHORTS = (np.array([0, 2, 5]), np.array([1, 3, 2]), np.array([2, 0, 4]))
CLIENT_LR = 0.1
# Tolerance relative to each leaf's scale: float32 (u = 6e-8) against float64, at most 3 rounds x (4 steps x 2
# head epochs + 4 body steps) = 36 sequential SGD steps per parameter, each adding a few tens of roundings
# (4-example batches of 4-term products, tanh, softmax) -- ~36 x 30 u = 6.5e-5 in the worst case, errors of
# independent roundings adding like a random walk (~sqrt(36 x 30) u = 2e-6); 2e-5 holds with margin, while an
# algorithmic difference (a step on the wrong part, a wrong weight) is of order CLIENT_LR x gradient ~ 1e-2.
RTOL = 2e-5


def head_is_local(path) -> str:
  return "local" if path[0] == "head" else "global"


class TwoLayer(nn.Module):
  """``logits = head(tanh(body(x)))``."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Dense(NUM_CLASSES, name="head")(jnp.tanh(nn.Dense(HIDDEN, name="body")(x)))


def to_reference(params):
  return {"W1": params["body"]["kernel"], "b1": params["body"]["bias"],
          "W2": params["head"]["kernel"], "b2": params["head"]["bias"]}


def assert_close(actual, expected, what):
  for key, value in expected.items():
    scale = float(np.max(np.abs(value)))
    error = float(np.max(np.abs(np.asarray(actual[key], np.float64) - value)))
    assert error <= RTOL * scale, f"{what}[{key}]: max error {error:.3g} > {RTOL} x scale {scale:.3g}"


@functools.lru_cache(maxsize=None)
def make_setup():
  """``(population, model, initial params, [round data per cohort])``; callers must not modify them."""
  population = make_population(num_clients=NUM_CLIENTS, num_features=NUM_FEATURES, num_classes=NUM_CLASSES)
  model = from_flax(TwoLayer(), np.zeros((1, NUM_FEATURES), np.float32))
  rng = np.random.default_rng(7)
  params = {"body": {"kernel": (0.5 * rng.normal(size=(NUM_FEATURES, HIDDEN))).astype(np.float32),
                     "bias": (0.1 * rng.normal(size=(HIDDEN,))).astype(np.float32)},
            "head": {"kernel": (0.5 * rng.normal(size=(HIDDEN, NUM_CLASSES))).astype(np.float32),
                     "bias": (0.1 * rng.normal(size=(NUM_CLASSES,))).astype(np.float32)}}
  num_steps = max_num_steps(population, batch_size=BATCH_SIZE)
  rounds = [pack_clients(population, cohort, batch_size=BATCH_SIZE, num_steps=num_steps, cohort_size=SLOTS,
                         seed=5, round_num=r) for r, cohort in enumerate(COHORTS)]
  return population, model, params, rounds


def run_rounds(process, params, rounds):
  """Runs ``process`` over the rounds with a client-state store; returns ``(server state, store, metrics)``."""
  state = process.init(params)
  store = ClientStateStore(process.client_state(params), NUM_CLIENTS)
  step = jax.jit(process.next)
  metrics = []
  for r, (cohort, round_data) in enumerate(zip(COHORTS, rounds)):
    output = step(state, round_data, jax.random.key(r), store.gather(cohort, SLOTS))
    store.scatter(cohort, output.client_states)
    state = output.state
    metrics.append(output.metrics)
  return state, store, metrics
