"""The shared setup of the algorithm-vs-reference tests: data, model, tolerance, and one compiled process per
configuration (module-level cache, so a process used by several test files compiles once per session).

Softmax regression on ``make_population``'s ragged clients (15, 12, 10, 7, 7, 3 examples; batches of 4, so 1 to 4
local steps with partial last batches), two rounds with different cohorts of 3 clients in 4 slots (one padding
slot each round).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import numpy as np
import optax

from fedjax_lite import algorithms
from fedjax_lite.core.packing import max_num_steps, pack_clients
from fedjax_lite.models.adapter import from_flax
from tests.algorithms import reference_impl as ref
from tests.conftest import make_population

NUM_CLIENTS, NUM_FEATURES, NUM_CLASSES, BATCH_SIZE, COHORT_SIZE = 6, 8, 4, 4, 4
COHORTS = ([0, 2, 5], [1, 3, 2])  # round 1 and round 2: 3 real clients in 4 slots; client 4 is never sampled
CLIENT_LR = 0.1


def decaying_rate(round_num):
  """A client learning-rate schedule of the round (TFF ``build_weighted_fed_avg_with_optimizer_schedule``)."""
  return CLIENT_LR / (1.0 + round_num)


# Tolerance, per leaf: max |library - reference| <= RTOL * max |reference|. The library runs in float32 (unit
# roundoff u = 2^-24 = 6e-8), the reference in float64 (exact by comparison). A parameter after two rounds is the
# result of at most 2 x 4 sequential local steps per client; each step's gradient is a sum of <= 4 examples x
# (8 features + 1) products plus a softmax, so each step adds at most ~(9 + 4 + a few) u of relative error to the
# parameters, and the weighted mean over 3 clients, the server step (adaptive ones: m / (sqrt(v) + tau), a few
# more roundings) add a few u per round. Worst case about 2 x 4 x 20 u + 2 x 10 u = 180 u = 1.1e-5 relative to
# the parameters' scale; errors of independent roundings add like a random walk, so 1e-5 (~170 u) holds with
# margin while any algorithmic difference (a wrong sign, weight or step count) is of order CLIENT_LR = 0.1.
# SCAFFOLD's control variates c_i = (x - y_i) / (K eta) cancel: their absolute error is that of x and y, u |x|,
# so relative to |c_i| it is u |x| / |x - y_i| (about 10 u here), still far inside RTOL. Measured on x86-64:
# at most 1.1e-7 for the parameters of every algorithm, 8.5e-7 for SCAFFOLD's control variates.
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


@functools.lru_cache(maxsize=None)
def make_setup():
  """``(population, model, initial params, [round 1 data, round 2 data])``, the same objects for every caller (so
  that :func:`compiled` reuses processes across test files). Callers must not modify them."""
  population = make_population(num_clients=NUM_CLIENTS, num_features=NUM_FEATURES, num_classes=NUM_CLASSES)
  model = from_flax(SoftmaxRegression(), np.zeros((1, NUM_FEATURES), np.float32))
  rng = np.random.default_rng(3)
  params = {"Dense_0": {"kernel": (0.3 * rng.normal(size=(NUM_FEATURES, NUM_CLASSES))).astype(np.float32),
                        "bias": (0.1 * rng.normal(size=(NUM_CLASSES,))).astype(np.float32)}}
  num_steps = max_num_steps(population, batch_size=BATCH_SIZE)  # one shape for both rounds: compile once
  rounds = [pack_clients(population, cohort, batch_size=BATCH_SIZE, num_steps=num_steps, cohort_size=COHORT_SIZE,
                         seed=5, round_num=r) for r, cohort in enumerate(COHORTS)]
  return population, model, params, rounds


_COMPILED = {}


def compiled(name, model, weighting, runner=None):
  """``(process, jax.jit(process.next))`` for ``name``, built and jitted once per session (tests reuse it)."""
  key = (name, weighting, id(model), runner)
  if key not in _COMPILED:
    process = build(name, model, weighting, runner)
    _COMPILED[key] = (process, jax.jit(process.next))
  return _COMPILED[key]


def build(name, model, weighting, runner=None):
  """The library's process for ``name``: client SGD(0.1), the algorithm's defaults otherwise."""
  lr, common = CLIENT_LR, {"weighting": weighting, "runner": runner}
  if name == "fed_avg":
    return algorithms.fed_avg(model, client_learning_rate=lr, **common)
  if name == "fed_avg_schedule":  # a client rate scheduled by round, and a server rate other than 1
    return algorithms.fed_avg(model, client_learning_rate=decaying_rate, server_optimizer=optax.sgd(0.7), **common)
  if name == "fed_prox_zero":
    return algorithms.fed_prox(model, 0.0, client_learning_rate=lr, **common)
  if name == "fed_prox":
    return algorithms.fed_prox(model, 0.5, client_learning_rate=lr, **common)
  if name == "fed_avgm":
    return algorithms.fed_avgm(model, client_learning_rate=lr, **common)
  if name == "fed_adam":
    return algorithms.fed_adam(model, server_learning_rate=0.05, client_learning_rate=lr, **common)
  if name == "fed_yogi":
    return algorithms.fed_yogi(model, server_learning_rate=0.05, client_learning_rate=lr, **common)
  if name == "fed_adagrad":
    return algorithms.fed_adagrad(model, server_learning_rate=0.05, client_learning_rate=lr, **common)
  if name == "mime_lite":
    return algorithms.mime_lite(model, optax.sgd(lr, momentum=0.9), **common)
  if name == "mime_lite_adam":  # a base optimizer with more state (moments, step count)
    return algorithms.mime_lite(model, optax.adam(lr), **common)
  if name == "mime":
    return algorithms.mime(model, optax.sgd(lr, momentum=0.9), **common)
  if name == "scaffold":
    return algorithms.scaffold(model, num_clients=NUM_CLIENTS, client_learning_rate=lr, **common)
  raise AssertionError(name)


def reference_server(name):
  """The paper's server step with the library's defaults (Reddi et al.: tau 1e-3, beta1 0.9, beta2 0.99; FedAdagrad
  beta1 0; FedAvgM momentum 0.9, rate 1)."""
  if name in ("fed_avg", "fed_prox"):
    return ref.ServerSGD(1.0)
  if name == "fed_avg_schedule":
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
