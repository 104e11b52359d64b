"""Federated k-means against a NumPy re-derivation of TFF's rule, and personalization evaluation against its
definition (baseline = evaluation of the global model; a zero-rate fine-tune = the baseline)."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from fedjax_lite.algorithms import evaluate_clients, fed_kmeans, initial_centroids, personalization_evaluation
from fedjax_lite.core.federated_data import FederatedData
from fedjax_lite.core.packing import pack_clients
from tests.conftest import make_population
from tests.tolerances import assert_trees_close_to_rounding


def numpy_kmeans_round(centroids, weights, clients):
  """TFF build_fed_kmeans: nearest centroid per point; W' = W + c; C' = (W C + S) / W' where c > 0."""
  centroids = centroids.astype(np.float64)
  sums, counts = np.zeros_like(centroids), np.zeros(len(centroids))
  for points in clients:
    nearest = np.argmin(((points[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    for k in range(len(centroids)):
      sums[k] += points[nearest == k].sum(0)
      counts[k] += np.sum(nearest == k)
  new_weights = weights + counts
  moved = (weights[:, None] * centroids + sums) / new_weights[:, None]
  return np.where(counts[:, None] > 0, moved, centroids), new_weights


def test_fed_kmeans_two_rounds_equal_numpy_with_padding_slots():
  rng = np.random.default_rng(0)
  clients = [(rng.normal(size=(3 + 2 * i, 2)) + [3.0 * (i % 2), -1.0]).astype(np.float32) for i in range(4)]
  data = FederatedData.from_clients({f"c{i}": {"x": x} for i, x in enumerate(clients)})
  process = fed_kmeans(3, (2,))
  state = process.init(initial_centroids(3, (2,), seed=1))
  expected_centroids, expected_weights = np.asarray(state.params), np.ones(3)
  step = jax.jit(process.next)
  for round_num, cohort in enumerate([[0, 1, 2], [1, 3]]):
    round_data = pack_clients(data, cohort, batch_size=3, cohort_size=4, round_num=round_num)  # padding slots
    state, metrics, _ = step(state, round_data, jax.random.key(round_num))
    expected_centroids, expected_weights = numpy_kmeans_round(expected_centroids, expected_weights,
                                                              [clients[i] for i in cohort])
    # float32 sums of at most 9 points of magnitude < 6, divided once: a few ulps times the terms.
    np.testing.assert_allclose(np.asarray(state.params), expected_centroids, rtol=0,
                               atol=4 * 10 * np.finfo(np.float32).eps * 6)
    np.testing.assert_array_equal(np.asarray(state.finalizer_state.weights), expected_weights)
    assert int(metrics["client_work"]["train"]["num_examples"]) == sum(len(clients[i]) for i in cohort)


def test_fed_kmeans_bad_arguments():
  with pytest.raises(ValueError, match="num_clusters"):
    fed_kmeans(0, (2,))
  with pytest.raises(ValueError, match="data_shape"):
    fed_kmeans(2, (0,))
  with pytest.raises(ValueError, match="centroids must have shape"):
    fed_kmeans(2, (2,)).init(np.zeros((3, 2), np.float32))


def test_personalization_baseline_and_zero_rate_fine_tune(tiny_model, tiny_params):
  train, test = make_population(seed=0), make_population(seed=1)
  cohort = [0, 2, 4]
  train_data = pack_clients(train, cohort, batch_size=4, cohort_size=4)
  test_data = pack_clients(test, cohort, batch_size=4, cohort_size=4)
  evaluate = personalization_evaluation(tiny_model, {"frozen": (optax.sgd(0.0), 2), "sgd": (optax.sgd(0.5), 2)})
  out = evaluate(tiny_params, train_data, test_data)
  assert set(out) == {"baseline_metrics", "frozen", "sgd"}
  direct = evaluate_clients(tiny_model, tiny_params, test_data)
  # The same sums in two compiled programs (fusion may reorder them): a few ulps times a client's examples.
  max_examples = int(np.max(direct["per_client"]["num_examples"]))
  assert_trees_close_to_rounding(out["baseline_metrics"], direct, num_terms=max_examples + 2)
  assert_trees_close_to_rounding(out["frozen"], out["baseline_metrics"], num_terms=max_examples + 2)
  assert out["sgd"]["per_client"]["num_examples"].tolist() == direct["per_client"]["num_examples"].tolist()
  assert np.isnan(out["sgd"]["per_client"]["loss"][3])  # the padding slot
  # Fine-tuning on each client's own train split lowers its TRAIN loss: evaluate on the train split as test.
  tuned_on_train = evaluate(tiny_params, train_data, train_data)
  assert float(tuned_on_train["sgd"]["aggregate"]["loss"]) < float(tuned_on_train["baseline_metrics"]["aggregate"]["loss"])


def test_personalization_bad_strategies(tiny_model):
  with pytest.raises(ValueError, match="non-empty"):
    personalization_evaluation(tiny_model, {})
  with pytest.raises(TypeError, match="strategies"):
    personalization_evaluation(tiny_model, {"a": (optax.sgd(0.1),)})
  with pytest.raises(ValueError, match="num_epochs"):
    personalization_evaluation(tiny_model, {"a": (optax.sgd(0.1), 0)})


def test_round_data_errors_name_the_input_when_next_is_called_directly(tiny_model, tiny_params):
  from fedjax_lite.algorithms import fed_avg

  round_data = pack_clients(make_population(), [0, 1], batch_size=4)
  process = fed_avg(tiny_model, client_learning_rate=0.1)
  state = process.init(tiny_params)
  missing_mask = {key: value for key, value in round_data.items() if key != "mask"}
  with pytest.raises(ValueError, match="has no 'mask'"):
    jax.jit(process.next)(state, missing_mask, jax.random.key(0))
  short = dict(round_data, y=round_data["y"][:1])
  with pytest.raises(ValueError, match=r"\['y'\] has 1 clients, 'mask' has 2"):
    jax.jit(process.next)(state, short, jax.random.key(0))


def test_an_update_that_does_not_match_the_aggregators_template_is_an_error(tiny_model, tiny_params):
  """Regression (issue 10, section 2): a value tree that does not match the aggregator's template was accepted."""
  import jax.numpy as jnp

  from fedjax_lite import aggregators
  from fedjax_lite.algorithms import build_round, optimizer_finalizer
  from fedjax_lite.core import ClientOutput

  def first_leaf_only(broadcast, client_data, client_state, rng):  # drops all but one leaf of the model
    leaf = jax.tree.leaves(broadcast.params)[0]
    return ClientOutput(update={"only": leaf}, weight=jnp.float32(1.0), metrics={"num_examples": jnp.int32(1)})

  def wrong_dtype(broadcast, client_data, client_state, rng):
    update = jax.tree.map(lambda p: p.astype(jnp.bfloat16), broadcast.params)
    return ClientOutput(update=update, weight=jnp.float32(1.0), metrics={"num_examples": jnp.int32(1)})

  round_data = pack_clients(make_population(), [0, 1], batch_size=4)
  for work, match in ((first_leaf_only, "update has tree"), (wrong_dtype, "bfloat16")):
    process = build_round(work, aggregator=aggregators.mean(), finalizer=optimizer_finalizer(optax.sgd(1.0)))
    with pytest.raises(ValueError, match=match):
      jax.jit(process.next)(process.init(tiny_params), round_data, jax.random.key(0))
