"""``algorithms.q_ffl`` (q-FedAvg, Li et al. 2020, Algorithm 2) equals a float64 NumPy re-derivation
(``reference_impl.q_ffl_round``) on ragged clients over two rounds; ``q = 0`` is FedAvg with uniform weights; and
``algorithms.fairness_metrics`` gives exact values on a hand-made distribution."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from fedjax_lite import algorithms
from tests.algorithms import reference_impl as ref
from tests.algorithms.family_setup import CLIENT_LR, RTOL, assert_close_to_reference, make_setup, to_reference


@pytest.mark.parametrize("q, lipschitz", [(2.0, None), (0.0, 4.0)])
def test_q_ffl_equals_numpy_on_ragged_clients(q, lipschitz):
  _, model, params, rounds = make_setup()  # clients of 15, 12, 10, 7, 7, 3 examples: 1 to 4 local steps
  process = algorithms.q_ffl(model, q, lipschitz=lipschitz, client_learning_rate=CLIENT_LR)
  step = jax.jit(process.next)
  state = process.init(params)
  expected = to_reference(params)
  for r, round_data in enumerate(rounds):
    losses = [ref.client_mean_loss(expected, round_data, slot) for slot in ref.client_slots(round_data)]
    fed_avg = ref.fed_avg_round(expected, round_data, client_learning_rate=CLIENT_LR, server=ref.ServerSGD(1.0),
                                weighting="uniform")
    expected = ref.q_ffl_round(expected, round_data, client_learning_rate=CLIENT_LR, q=q, lipschitz=lipschitz)
    state, metrics, _ = step(state, round_data, jax.random.key(r))
    # family_setup.RTOL (~170 float32 roundings of the parameters' scale); q-FedAvg adds a handful per client
    # (the loss pass, F^q, the squared norm, the ratio of the two means).
    assert_close_to_reference(state.params, expected, what=f"round {r + 1} params")
    weights = np.array([ref.client_weight(round_data, s, "num_examples") for s in ref.client_slots(round_data)])
    np.testing.assert_allclose(float(metrics["client_work"]["train"]["initial_loss"]),
                               weights @ np.array(losses) / weights.sum(), rtol=1e-5)
    gap = max(float(np.max(np.abs(expected[key] - fed_avg[key]))) for key in expected)
    scale = max(float(np.max(np.abs(expected[key]))) for key in expected)
    if q == 0.0:  # q = 0: the unweighted mean of the clients' models, whatever L (it cancels)
      assert gap <= RTOL * scale, gap
    else:  # not vacuous: the loss powers move the model away from FedAvg's
      assert gap > 1e2 * RTOL * scale, gap


def test_q_ffl_arguments():
  _, model, _, _ = make_setup()
  with pytest.raises(ValueError, match="q must be"):
    algorithms.q_ffl(model, -1.0, client_learning_rate=0.1)
  with pytest.raises(ValueError, match="lipschitz"):
    algorithms.q_ffl(model, 1.0, lipschitz=0.0, client_learning_rate=0.1)
  with pytest.raises(TypeError, match="weighting"):
    algorithms.q_ffl(model, 1.0, client_learning_rate=0.1, weighting="uniform")
  with pytest.raises(ValueError, match="Lipschitz"):
    algorithms.q_ffl(model, 1.0, client_optimizer=optax.sgd(0.1))
  algorithms.q_ffl(model, 1.0, client_optimizer=optax.sgd(0.1), lipschitz=10.0)  # its own L: fine


def test_fairness_metrics_exact_values():
  # 12 slots: 10 clients with examples, 2 padding slots (NaN accuracy, 0 examples) left out.
  accuracy = [0.5, 1.0, 0.25, 0.75, 0.0, 1.0, 0.5, 0.75, 0.25, 0.5, np.nan, np.nan]
  per_client = {"accuracy": np.array(accuracy), "num_examples": np.array([3] * 10 + [0, 0])}
  got = algorithms.fairness_metrics(per_client)
  # Values 0, .25, .25, .5, .5, .5, .75, .75, 1, 1: mean 5.5 / 10; 10% of 10 clients is 1 client each side.
  # The mean and the tails come from client_distribution, in float32: 5.5 / 10 is one float32 rounding of 0.55.
  assert got == {"client_mean": pytest.approx(0.55, rel=2 ** -23), "variance": pytest.approx(0.0975, rel=2 ** -50),
                 "worst_10_percent": 0.0, "best_10_percent": 1.0, "num_clients": 10}
  # variance: squared deviations from 0.55 sum to 0.3025 + 2 x 0.09 + 3 x 0.0025 + 2 x 0.04 + 2 x 0.2025 = 0.975;
  # the mean 0.55 is not exact in binary, so the sums carry a few float64 roundings: relative 2^-50 (~9 ulps).
  tails = algorithms.fairness_metrics(per_client, percent=25)  # ceil(2.5) = 3 clients each side
  # Sums of quarters are exact in float32; the division by 3 is one rounding.
  assert tails["worst_25_percent"] == pytest.approx((0.0 + 0.25 + 0.25) / 3, rel=2 ** -23)
  assert tails["best_25_percent"] == pytest.approx((0.75 + 1.0 + 1.0) / 3, rel=2 ** -23)


def test_fairness_metrics_refuses_bad_input():
  with pytest.raises(ValueError, match="no client has examples"):
    algorithms.fairness_metrics({"accuracy": np.array([np.nan]), "num_examples": np.array([0])})
  with pytest.raises(ValueError, match="not finite .* slots \\[1\\]"):
    algorithms.fairness_metrics({"accuracy": np.array([0.5, np.nan]), "num_examples": np.array([2, 3])})
  with pytest.raises(ValueError, match="has no 'loss_x'"):
    algorithms.fairness_metrics({"accuracy": np.array([0.5]), "num_examples": np.array([2])}, metric="loss_x")
  with pytest.raises(ValueError, match="percent"):
    algorithms.fairness_metrics({"accuracy": np.array([0.5]), "num_examples": np.array([2])}, percent=0)


def test_fairness_metrics_of_a_federated_evaluation(population, tiny_model, tiny_params):
  from fedjax_lite.core.packing import pack_clients
  round_data = pack_clients(population, [0, 1, 2], batch_size=4, cohort_size=4)
  per_client = jax.device_get(algorithms.evaluate_clients(tiny_model, tiny_params, round_data)["per_client"])
  got = algorithms.fairness_metrics(per_client)
  accuracies = np.asarray(per_client["accuracy"][:3], np.float64)
  assert got["num_clients"] == 3 and got["client_mean"] == pytest.approx(accuracies.mean(), rel=2 ** -22)
  assert got["worst_10_percent"] == accuracies.min() and got["best_10_percent"] == accuracies.max()
