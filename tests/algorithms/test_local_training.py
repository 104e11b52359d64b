"""Local training's step loop: the real steps only forward, a static loop for differentiation.

``step_loop`` runs a client's real steps in a ``while_loop`` (padding steps cost nothing: on XLA:CPU a skipped step
of the static loop copied the carried parameters) and differentiates through a custom JVP whose rule is the same
steps in a static-length loop with ``lax.cond``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lite.algorithms.local_training import client_gradient, train_locally
from fedjax_lite.core.packing import pack_clients
from tests.conftest import make_population
from tests.tolerances import float_atol


def primitives(jaxpr) -> set[str]:
  """The primitives of a closed jaxpr and every jaxpr nested in it."""
  names = set()
  for equation in jaxpr.eqns:
    names.add(equation.primitive.name)
    for value in equation.params.values():
      for sub in (value if isinstance(value, (list, tuple)) else [value]):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          names |= primitives(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          names |= primitives(sub)
  return names


def one_client(num_steps=8):
  """Client 0 of the population (15 examples, 4 real batches of 4) padded to ``num_steps`` steps."""
  data = pack_clients(make_population(), [0], batch_size=4, num_steps=num_steps, shuffle=False)
  return jax.tree.map(lambda x: jnp.asarray(x[0]), data)


def test_padding_steps_change_nothing_and_are_not_run(tiny_model, tiny_params):
  client = one_client(8)
  trained, sums = train_locally(tiny_model, optax.sgd(0.1), tiny_params, client, jax.random.key(0))
  unpadded, unpadded_sums = train_locally(tiny_model, optax.sgd(0.1), tiny_params, one_client(4),
                                          jax.random.key(0))
  chex.assert_trees_all_equal(trained, unpadded)  # the same 4 steps, the same operations
  chex.assert_trees_all_equal(sums, unpadded_sums)
  assert int(sums["num_batches"]) == 4
  # Forward: a while loop over the real steps, no per-step conditional (which copied the carry).
  forward = jax.make_jaxpr(lambda p: train_locally(tiny_model, optax.sgd(0.1), p, client, jax.random.key(0)))
  names = primitives(forward(tiny_params).jaxpr)
  assert "while" in names and "cond" not in names, names


def test_reverse_mode_goes_through_the_static_loop(tiny_model, tiny_params):
  """``jax.grad`` of the trained parameters' loss with respect to the learning rate: the custom JVP's static loop
  (with ``cond``) is what gets transposed; the value equals central finite differences of the forward loop."""
  client = one_client(8)
  probe = jax.tree.map(lambda p: jnp.ones_like(p) / p.size, tiny_params)

  def objective(learning_rate):
    trained, _ = train_locally(tiny_model, optax.sgd(learning_rate), tiny_params, client, jax.random.key(0))
    return sum(jnp.sum(p * q) for p, q in zip(jax.tree.leaves(trained), jax.tree.leaves(probe)))

  gradient = jax.jit(jax.grad(objective))(0.1)
  assert "cond" in primitives(jax.make_jaxpr(jax.grad(objective))(0.1).jaxpr)
  step = 1e-2
  numeric = (objective(0.1 + step) - objective(0.1 - step)) / (2 * step)
  # Central differences of a smooth function of the rate: error ~ step^2 times the third derivative, plus the
  # float32 rounding of the two objectives divided by 2 step.
  assert abs(float(gradient) - float(numeric)) <= 1e-3 * max(1.0, abs(float(numeric))) + float_atol(
      100, abs(float(objective(0.1)))) / step


def test_client_gradient_skips_padding_too(tiny_model, tiny_params):
  gradient, sums = client_gradient(tiny_model, tiny_params, one_client(8), jax.random.key(0))
  expected, expected_sums = client_gradient(tiny_model, tiny_params, one_client(4), jax.random.key(0))
  chex.assert_trees_all_equal(gradient, expected)
  chex.assert_trees_all_equal(sums, expected_sums)
  assert np.isfinite(float(sums["loss"]))


def test_a_step_budget_stops_local_training_after_the_budgeted_steps(tiny_model, tiny_params):
  """The local loop of a client packed with ``step_budget=k`` runs exactly k steps: the same parameters and sums as
  the client's first k batches alone, ``num_batches == k`` (a straggler's partial work, FedProx's variable work)."""
  population = make_population()
  full = pack_clients(population, [0], batch_size=4, num_steps=8, shuffle=False)
  budgeted = pack_clients(population, [0], batch_size=4, num_steps=8, shuffle=False, step_budget=np.array([2]))
  first_two = {key: (value[:, :2] if value.ndim > 1 else value) for key, value in full.items()}
  first_two["num_examples"] = np.array([8], np.int32)
  run = lambda data: train_locally(tiny_model, optax.sgd(0.1), tiny_params,
                                   jax.tree.map(lambda x: jnp.asarray(x[0]), data), jax.random.key(0))
  trained, sums = run(budgeted)
  expected, expected_sums = run(first_two)
  chex.assert_trees_all_equal(trained, expected)
  chex.assert_trees_all_equal(sums, expected_sums)
  assert int(sums["num_batches"]) == 2 and int(sums["num_examples"]) == 8 == int(budgeted["num_examples"][0])
