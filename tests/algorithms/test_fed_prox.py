"""FedProx: ``mu = 0`` is FedAvg bit for bit, and the proximal term is the gradient of ``mu/2 ||w - w0||^2`` (the
paper's sign, not the reference code's ``mu (w0 - w)``; see ``fedjax_lite/algorithms/fed_prox.py``). FedProx with
``mu > 0`` against the NumPy reference is in ``test_algorithm_family.py``."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lite import algorithms
from tests.algorithms.family_setup import compiled, make_setup


@pytest.fixture(scope="module")
def setup():
  return make_setup()


def test_fed_prox_with_zero_strength_is_fed_avg_bit_for_bit(setup):
  _, model, params, rounds = setup
  results = []
  for name in ("fed_avg", "fed_prox_zero"):
    process, step = compiled(name, model, "num_examples")
    state = process.init(params)
    for r, round_data in enumerate(rounds):
      state, _, _ = step(state, round_data, jax.random.key(r))
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
