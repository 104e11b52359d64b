"""Tests for fedjax_lite.core.model: the Model adapter and the one place where padding is excluded.

The central contract: a padded example contributes nothing to the loss, its gradient or any metric. Changing
what is stored in padded slots (even to NaN or Inf) must leave all three bitwise identical.
"""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lite.core.model import (
    Model,
    accuracy_metric,
    finalize_metric_sums,
    masked_loss_and_metric_sums,
    softmax_cross_entropy_loss,
    fill_padding,
)
from fedjax_lite.models.adapter import from_flax


class MLP(nn.Module):
  """A small classifier with dropout, so that ``train`` and ``rng`` matter."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.relu(nn.Dense(8)(x))
    x = nn.Dropout(0.25, deterministic=not train)(x)
    return nn.Dense(3)(x)


class WithBatchNorm(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool):
    return nn.Dense(3)(nn.BatchNorm(use_running_average=not train)(x))


def classifier():
  return from_flax(MLP(), jnp.zeros((1, 5)))


def classification_batch():
  """6 slots, the last 2 padding."""
  rng = np.random.default_rng(0)
  batch = {"x": rng.normal(size=(6, 5)).astype(np.float32), "y": np.array([0, 2, 1, 1, 0, 0], np.int32)}
  mask = np.array([True, True, True, True, False, False])
  return batch, mask


def loss_grad_and_sums(model, params, batch, mask, rng, train):
  def mean_loss(p):
    return masked_loss_and_metric_sums(model, p, batch, mask, rng, train)

  (loss, sums), grad = jax.value_and_grad(mean_loss, has_aux=True)(params)
  return loss, grad, sums


def jitted_loss_grad_and_sums(model, train):
  """One compiled program per (model, train): comparing its outputs bitwise compares like with like."""
  return jax.jit(lambda params, batch, mask, rng: loss_grad_and_sums(model, params, batch, mask, rng, train))


CLASSIFIER = classifier()
CLASSIFIER_PROGRAMS = {train: jitted_loss_grad_and_sums(CLASSIFIER, train) for train in (False, True)}


CLASSIFIER_APPLY = jax.jit(CLASSIFIER.apply, static_argnums=3)


@functools.cache
def classifier_params():
  """Parameters of the classifier's shapes filled from numpy (cheaper than compiling the random init)."""
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(CLASSIFIER.init, jax.random.key(0))
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape).astype(s.dtype)), shapes)


def assert_bitwise_equal(first, second):
  chex.assert_trees_all_equal_structs(first, second)
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# Padding exclusion ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("garbage", [np.nan, np.inf, -np.inf, 1e30], ids=["nan", "+inf", "-inf", "huge"])
def test_padded_examples_change_nothing(train, garbage):
  program = CLASSIFIER_PROGRAMS[train]
  params = classifier_params()
  batch, mask = classification_batch()
  rng = jax.random.key(1)
  reference = program(params, batch, mask, rng)

  changed = {"x": batch["x"].copy(), "y": batch["y"].copy()}
  changed["x"][~mask] = garbage
  changed["y"][~mask] = 2  # a different (valid) label
  result = program(params, changed, mask, rng)
  assert_bitwise_equal(result, reference)
  assert bool(jnp.isfinite(result[0]))
  assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(result[1]))


def regression_model():
  """Linear regression on float targets, so padded labels can be NaN/Inf as well."""

  def apply(params, batch, rng, train):
    return batch["x"] @ params["w"] + params["b"]

  return Model(
      init=lambda rng: {"w": jnp.array([0.5, -1.0]), "b": jnp.float32(0.25)},
      apply=apply,
      loss=lambda batch, predictions: (predictions - batch["target"]) ** 2,
      metrics={"abs_error": lambda batch, predictions: jnp.abs(predictions - batch["target"])},
      name="linear",
  )


REGRESSION = regression_model()
REGRESSION_PROGRAM = jitted_loss_grad_and_sums(REGRESSION, False)


@pytest.mark.parametrize("garbage", [np.nan, np.inf, -np.inf])
def test_padded_float_labels_change_nothing(garbage):
  model = REGRESSION
  params = model.init(None)
  batch = {"x": np.array([[1.0, 2.0], [3.0, 0.0], [0.0, 0.0]], np.float32), "target": np.array([0.0, 1.0, 5.0],
                                                                                                np.float32)}
  mask = np.array([True, True, False])
  program = REGRESSION_PROGRAM
  reference = program(params, batch, mask, None)
  changed = {"x": batch["x"].copy(), "target": batch["target"].copy()}
  changed["x"][2] = garbage
  changed["target"][2] = garbage
  assert_bitwise_equal(program(params, changed, mask, None), reference)


def test_regression_exact_values():
  # predictions: [0.5 - 2 + 0.25, 1.5 + 0.25] = [-1.25, 1.75]; targets [0, 1]; errors [-1.25, 0.75].
  params = REGRESSION.init(None)
  batch = {"x": jnp.array([[1.0, 2.0], [3.0, 0.0], [7.0, 7.0]]), "target": jnp.array([0.0, 1.0, 100.0])}
  mask = jnp.array([True, True, False])
  loss, grad, sums = REGRESSION_PROGRAM(params, batch, mask, None)
  np.testing.assert_allclose(loss, (1.5625 + 0.5625) / 2, rtol=1e-6)
  np.testing.assert_allclose(sums["loss"], 1.5625 + 0.5625, rtol=1e-6)
  np.testing.assert_allclose(sums["abs_error"], 2.0, rtol=1e-6)
  assert sums["num_examples"] == 2 and sums["num_examples"].dtype == jnp.int32
  # d/dw mean((x.w + b - t)^2) = mean(2 e x) = (2 * -1.25 * [1, 2] + 2 * 0.75 * [3, 0]) / 2 = [1.0, -2.5]
  np.testing.assert_allclose(grad["w"], [1.0, -2.5], rtol=1e-6)
  np.testing.assert_allclose(grad["b"], (2 * -1.25 + 2 * 0.75) / 2, rtol=1e-6)


def test_masked_sums_match_real_examples_only():
  model = CLASSIFIER
  program = CLASSIFIER_PROGRAMS[False]
  params = classifier_params()
  batch, mask = classification_batch()
  loss, grad, sums = program(params, batch, mask, None)
  real = {key: value[mask] for key, value in batch.items()}
  real_loss, real_grad, real_sums = program(params, real, np.ones(4, bool), None)
  assert int(sums["num_examples"]) == 4
  chex.assert_trees_all_close(sums, real_sums, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(grad, real_grad, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loss, real_loss, rtol=1e-6)
  np.testing.assert_allclose(loss, sums["loss"] / 4, rtol=1e-6)
  # The sums are of per-example values (cross-entropy and accuracy recomputed in numpy).
  logits = np.asarray(CLASSIFIER_APPLY(params, real, None, False), np.float64)
  log_normalizer = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
  per_example = log_normalizer - logits[np.arange(4), real["y"]]
  np.testing.assert_allclose(sums["loss"], per_example.sum(), rtol=1e-5)
  assert float(sums["accuracy"]) == np.sum(np.argmax(logits, -1) == real["y"])


def test_all_padding_batch_is_zero_not_nan():
  model = CLASSIFIER
  program = CLASSIFIER_PROGRAMS[False]
  params = classifier_params()
  batch, _ = classification_batch()
  loss, grad, sums = program(params, batch, np.zeros(6, bool), None)
  assert float(loss) == 0.0
  assert int(sums["num_examples"]) == 0
  assert float(sums["loss"]) == 0.0 and float(sums["accuracy"]) == 0.0
  chex.assert_trees_all_equal(grad, jax.tree.map(jnp.zeros_like, params))


def test_mask_entry_in_batch_is_ignored():
  batch = {"x": jnp.array([[1.0, 2.0], [3.0, 0.0], [7.0, 7.0]]), "target": jnp.array([0.0, 1.0, 100.0])}
  mask = jnp.array([True, False, True])
  with_mask = dict(batch, mask=jnp.array([False, True, False]))  # a stale mask in the batch is not used
  assert_bitwise_equal(
      REGRESSION_PROGRAM(REGRESSION.init(None), with_mask, mask, None),
      REGRESSION_PROGRAM(REGRESSION.init(None), batch, mask, None),
  )


def test_padding_cannot_make_gradient_nan_for_input_normalizing_model():
  def apply(params, batch, rng, train):
    x = batch["x"] / jnp.linalg.norm(batch["x"], axis=-1, keepdims=True)
    return x @ params["w"]

  model = Model(init=lambda rng: {"w": jnp.ones(3)}, apply=apply, loss=lambda b, p: (p - b["y"]) ** 2)
  params = model.init(None)
  batch = {"x": jnp.array([[1.0, 2.0, 3.0], [0.5, 0.1, 0.2], [9.0, 9.0, 9.0]]), "y": jnp.array([1.0, 0.0, 0.0])}
  mask = jnp.array([True, True, False])
  program = jitted_loss_grad_and_sums(model, False)
  _, grad, _ = program(params, batch, mask, None)
  _, real_grad, _ = program(params, {k: v[:2] for k, v in batch.items()}, mask[:2], None)
  assert bool(jnp.all(jnp.isfinite(real_grad["w"])))
  chex.assert_trees_all_close(grad, real_grad, rtol=1e-5)


# fill_padding ---------------------------------------------------------------------------------------------------------


def test_fill_padding_copies_the_first_real_example_into_padded_slots():
  mask = jnp.array([False, True, False, True])
  batch = {
      "x": jnp.array([[np.nan, np.nan], [1.0, 2.0], [np.inf, 0.0], [3.0, 4.0]]),
      "y": jnp.array([7, 1, 8, 3], jnp.int32),
      "other": jnp.arange(3.0),  # leading shape does not match the mask: left as is
  }
  out = fill_padding(batch, mask)
  np.testing.assert_array_equal(out["x"], [[1.0, 2.0], [1.0, 2.0], [1.0, 2.0], [3.0, 4.0]])
  np.testing.assert_array_equal(out["y"], [1, 1, 1, 3])
  np.testing.assert_array_equal(out["other"], [0.0, 1.0, 2.0])
  assert out["y"].dtype == jnp.int32


def test_fill_padding_of_an_all_padding_batch_is_zeros():
  out = fill_padding({"x": jnp.full((2, 3), np.nan)}, jnp.array([False, False]))
  np.testing.assert_array_equal(out["x"], np.zeros((2, 3)))


# finalize_metric_sums -------------------------------------------------------------------------------------------------


def test_finalize_metric_sums_exact():
  sums = {"loss": jnp.float32(6.0), "accuracy": jnp.float32(3.0), "num_examples": jnp.int32(4),
          "num_batches": jnp.int32(2)}
  out = finalize_metric_sums(sums)
  assert set(out) == set(sums)
  assert float(out["loss"]) == 1.5
  assert float(out["accuracy"]) == 0.75
  assert int(out["num_examples"]) == 4 and out["num_examples"].dtype == jnp.int32
  assert int(out["num_batches"]) == 2


def test_finalize_metric_sums_with_no_examples_is_nan():
  out = finalize_metric_sums({"loss": jnp.float32(0.0), "num_examples": jnp.int32(0)})
  assert np.isnan(float(out["loss"]))
  assert int(out["num_examples"]) == 0


def test_finalize_after_masked_sums_gives_example_weighted_means():
  batch = {"x": jnp.array([[1.0, 2.0], [3.0, 0.0], [7.0, 7.0]]), "target": jnp.array([0.0, 1.0, 100.0])}
  _, _, sums = REGRESSION_PROGRAM(REGRESSION.init(None), batch, jnp.array([True, True, False]), None)
  out = finalize_metric_sums(sums)
  np.testing.assert_allclose(out["loss"], 1.0625, rtol=1e-6)
  np.testing.assert_allclose(out["abs_error"], 1.0, rtol=1e-6)


def test_metric_named_like_a_counter_is_averaged_or_rejected():
  # Either fix is acceptable: reject the name at construction, or average it like any other metric.
  try:
    model = Model(
        init=lambda rng: {"w": jnp.zeros(2)},
        apply=lambda params, batch, rng, train: batch["x"] @ params["w"],
        loss=lambda batch, predictions: predictions**2,
        metrics={"num_correct": lambda batch, predictions: jnp.ones_like(predictions)},
    )
  except ValueError as error:
    assert "num_correct" in str(error)
    return
  batch = {"x": jnp.ones((4, 2))}
  _, sums = masked_loss_and_metric_sums(model, model.init(None), batch, jnp.array([1, 1, 1, 0], bool), None, False)
  assert float(finalize_metric_sums(sums)["num_correct"]) == 1.0


# Model and from_flax --------------------------------------------------------------------------------------------------


def test_from_flax_defaults():
  model = CLASSIFIER
  assert model.name == "MLP"
  assert set(model.metrics) == {"accuracy"}
  params = classifier_params()
  assert set(params) == {"Dense_0", "Dense_1"}  # only the 'params' collection, unwrapped
  chex.assert_shape(params["Dense_0"]["kernel"], (5, 8))
  logits = CLASSIFIER_APPLY(params, {"x": jnp.ones((4, 5))}, None, False)
  chex.assert_shape(logits, (4, 3))
  # Evaluation ignores the key (no dropout).
  chex.assert_trees_all_equal(logits, CLASSIFIER_APPLY(params, {"x": jnp.ones((4, 5))}, jax.random.key(3), False))


def test_training_applies_dropout_with_the_key():
  params = classifier_params()
  batch, mask = classification_batch()
  evaluation = CLASSIFIER_PROGRAMS[False](params, batch, mask, jax.random.key(3))
  training = CLASSIFIER_PROGRAMS[True](params, batch, mask, jax.random.key(3))
  again = CLASSIFIER_PROGRAMS[True](params, batch, mask, jax.random.key(3))
  other_key = CLASSIFIER_PROGRAMS[True](params, batch, mask, jax.random.key(4))
  assert float(training[0]) != float(evaluation[0])
  assert_bitwise_equal(training, again)
  assert float(other_key[0]) != float(training[0])


def test_from_flax_custom_keys_loss_metrics_and_name():
  model = from_flax(
      MLP(), jnp.zeros((2, 5)), input_key="features", label_key="target", name="custom",
      metrics={"mean_logit": lambda batch, logits: jnp.mean(logits, axis=-1)},
  )
  assert model.name == "custom" and set(model.metrics) == {"mean_logit"}
  params = jax.eval_shape(model.init, jax.random.key(0))
  batch = {"features": jnp.ones((3, 5)), "target": jnp.array([0, 1, 2])}
  loss, sums = jax.eval_shape(lambda p: masked_loss_and_metric_sums(model, p, batch, jnp.ones(3, bool), None, False),
                              params)
  assert set(sums) == {"loss", "mean_logit", "num_examples"}
  assert loss.shape == () and sums["mean_logit"].dtype == jnp.float32


def test_from_flax_refuses_batch_stats_that_padding_would_enter():
  # Batch statistics are supported (tests/models/test_adapter.py), but only with the example mask: this module
  # takes none, so its training statistics would include padded slots.
  with pytest.raises(ValueError, match="batch_stats.*mask"):
    from_flax(WithBatchNorm(), jnp.zeros((1, 4)))


def test_from_flax_rejects_non_module_and_scalar_input():
  with pytest.raises(TypeError, match="module"):
    from_flax(lambda x, train: x, jnp.zeros((1, 4)))
  with pytest.raises(ValueError, match="sample_input"):
    from_flax(MLP(), jnp.float32(0.0))


@pytest.mark.parametrize("name", ["loss", "num_examples", "num_batches"])
def test_model_rejects_reserved_metric_names(name):
  with pytest.raises(ValueError, match=name):
    Model(init=lambda rng: {}, apply=lambda *args: None, loss=lambda b, p: p, metrics={name: lambda b, p: p})


@pytest.mark.parametrize("field", ["init", "apply", "loss"])
def test_model_rejects_non_callables(field):
  kwargs = dict(init=lambda rng: {}, apply=lambda *args: None, loss=lambda b, p: p)
  kwargs[field] = "not callable"
  with pytest.raises(TypeError, match=f"Model.{field}"):
    Model(**kwargs)


def test_model_rejects_non_callable_metric():
  with pytest.raises(TypeError, match="accuracy"):
    Model(init=lambda rng: {}, apply=lambda *args: None, loss=lambda b, p: p, metrics={"accuracy": 1.0})


def test_model_is_frozen():
  model = regression_model()
  with pytest.raises(AttributeError):
    model.name = "other"


def test_loss_and_accuracy_exact_values():
  logits = jnp.array([[0.0, 0.0], [3.0, 1.0], [0.0, 5.0]])
  batch = {"y": jnp.array([1, 1, 1])}
  np.testing.assert_allclose(
      softmax_cross_entropy_loss()(batch, logits), [np.log(2.0), np.log1p(np.exp(2.0)), np.log1p(np.exp(-5.0))],
      rtol=1e-5,
  )
  # argmax of a tie picks the first class.
  np.testing.assert_array_equal(accuracy_metric()(batch, logits), [0.0, 0.0, 1.0])
  np.testing.assert_array_equal(accuracy_metric("label")({"label": jnp.array([0.0, 0.0, 1.0])}, logits),
                                [1.0, 1.0, 1.0])


class NoTrainArgument(nn.Module):
  """A module whose ``__call__`` has no ``train`` argument (most flax examples)."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(x)


def test_from_flax_accepts_a_module_without_train_argument():
  model = from_flax(NoTrainArgument(), jnp.zeros((1, 4)))
  params = model.init(jax.random.key(0))
  batch = {"x": jnp.ones((2, 4)), "y": jnp.array([0, 2])}
  for train in (False, True):
    logits = model.apply(params, batch, jax.random.key(1), train)
    chex.assert_shape(logits, (2, 3))


def test_core_does_not_import_flax():
  """Layering: core, privacy and aggregators never import flax (the adapter lives in models) nor the models."""
  import ast
  import pathlib

  import fedjax_lite

  root = pathlib.Path(fedjax_lite.__file__).parent
  for package in ("core", "privacy", "aggregators"):
    for path in (root / package).glob("*.py"):
      for node in ast.walk(ast.parse(path.read_text())):
        names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                 [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        assert not any(name == "flax" or name.startswith("flax.") or name.startswith("fedjax_lite.models")
                       for name in names), f"{path.relative_to(root)} imports {names}"


def test_aggregators_import_only_downward():
  """No import cycle inside aggregators/ (and no function-level imports working around one): the package's import
  graph, read from the source, is acyclic, with every intra-package import at module level."""
  import ast
  import pathlib

  import fedjax_lite

  package = pathlib.Path(fedjax_lite.__file__).parent / "aggregators"
  graph = {}
  for path in package.glob("*.py"):
    if path.stem == "__init__":
      continue
    tree = ast.parse(path.read_text())
    top_level = set(tree.body)
    edges = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fedjax_lite.aggregators"):
        names = ([node.module.split(".")[2]] if node.module.count(".") >= 2
                 else [alias.name for alias in node.names])
        assert node in top_level, f"aggregators/{path.name} imports {names} inside a function"
        edges.update(names)
    graph[path.stem] = edges & {p.stem for p in package.glob("*.py")}
  visiting, done = set(), set()

  def visit(module, trail):
    assert module not in visiting, f"import cycle: {' -> '.join(trail + [module])}"
    if module in done:
      return
    visiting.add(module)
    for imported in graph.get(module, ()):
      visit(imported, trail + [module])
    visiting.discard(module)
    done.add(module)

  for module in graph:
    visit(module, [])
