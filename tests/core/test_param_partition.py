"""Tests for fedjax_lite.core.param_partition: labels, split/merge, the optax training mask, partial models.

Split and merge only move leaves, so every round trip is checked bit for bit (chex), with the tree structure; the
optax mask must leave frozen parameters bit-identical through training steps of an optimizer that would otherwise
move them (AdamW's weight decay moves a parameter even with a zero gradient).
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedjax_lite.algorithms.local_training import train_locally
from fedjax_lite.core import param_partition as pp
from fedjax_lite.core.model import Model, masked_loss_and_metric_sums
from fedjax_lite.models.adapter import from_flax
from tests.tolerances import assert_trees_close_to_rounding


class BodyHead(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = False):
    hidden = nn.tanh(nn.Dense(6, name="body")(x))
    return nn.Dense(3, name="head")(hidden)


def head_local(path):
  return "local" if path[0] == "head" else "global"


def model_and_params():
  model = from_flax(BodyHead(), jnp.zeros((1, 4)))
  return model, model.init(jax.random.key(0))


def client_data(num_steps=3, batch=5, seed=0):
  rng = np.random.default_rng(seed)
  mask = np.ones((num_steps, batch), bool)
  mask[-1, 3:] = False
  return {"x": rng.normal(size=(num_steps, batch, 4)).astype(np.float32),
          "y": rng.integers(0, 3, (num_steps, batch)).astype(np.int32), "mask": mask,
          "num_examples": np.int32(mask.sum())}


# labels ---------------------------------------------------------------------------------------------------------------


def test_label_params_by_function_by_tree_and_by_one_label():
  _, params = model_and_params()
  by_function = pp.label_params(params, head_local)
  assert by_function == {"body": {"kernel": "global", "bias": "global"}, "head": {"kernel": "local", "bias": "local"}}
  assert pp.label_params(params, by_function) is by_function
  assert set(jax.tree.leaves(pp.label_params(params, "frozen"))) == {"frozen"}


def test_path_function_sees_names_of_nested_dicts_and_lists():
  seen = []
  pp.label_params({"a": [jnp.ones(1), {"b": jnp.ones(1)}]}, lambda path: seen.append(path) or "global")
  assert seen == [("a", "0"), ("a", "1", "b")]


@pytest.mark.parametrize("labels", ["shared", lambda path: "trainable", {"body": {"kernel": "global", "bias": 3},
                                                                           "head": {"kernel": "local",
                                                                                    "bias": "local"}}])
def test_unknown_label_is_one_error_naming_the_labels(labels):
  _, params = model_and_params()
  with pytest.raises(ValueError, match=r"unknown parameter label .*'global', 'local', 'frozen'"):
    pp.label_params(params, labels)


def test_unknown_label_from_a_function_names_the_parameter():
  _, params = model_and_params()
  with pytest.raises(ValueError, match="head/bias"):
    pp.label_params(params, lambda path: "global" if path[0] == "body" else "personal")


def test_label_tree_not_matching_params_names_the_paths():
  _, params = model_and_params()
  labels = {"body": {"kernel": "global", "bias": "global"}, "head": {"kernel": "local"}}
  with pytest.raises(ValueError, match=r"paths without a label: \['head/bias'\]"):
    pp.label_params(params, labels)
  labels = {"body": {"kernel": "global", "bias": "global", "scale": "global"},
            "head": {"kernel": "local", "bias": "local"}}
  with pytest.raises(ValueError, match=r"labels for no parameter: \['body/scale'\]"):
    pp.split_params(params, labels)


# split / merge --------------------------------------------------------------------------------------------------------


def test_split_merge_round_trip_is_exact_and_keeps_the_structure():
  _, params = model_and_params()
  labels = pp.label_params(params, head_local)
  parts = pp.split_params(params, labels)
  assert set(parts) == {"global", "local", "frozen"}
  assert parts["global"]["head"] == {"kernel": None, "bias": None}
  chex.assert_trees_all_equal(parts["local"]["head"], params["head"])
  assert jax.tree.leaves(parts["frozen"]) == []
  merged = pp.merge_params(parts, labels)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  chex.assert_trees_all_equal(merged, params)


def test_split_and_merge_run_under_jit_and_vmap():
  _, params = model_and_params()
  labels = pp.label_params(params, head_local)
  stacked = jax.tree.map(lambda leaf: jnp.stack([leaf, 2 * leaf]), params)

  @jax.jit
  @jax.vmap
  def round_trip(p):
    parts = pp.split_params(p, labels)
    return pp.merge_params({"global": parts["global"], "local": parts["local"]}, labels), parts["global"]

  merged, global_part = round_trip(stacked)
  chex.assert_trees_all_equal(merged, stacked)
  assert global_part["head"]["kernel"] is None


leaf_shapes = st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple)


@st.composite
def trees_and_labels(draw):
  names = draw(st.lists(st.sampled_from("abcdef"), min_size=1, max_size=4, unique=True))
  tree, labels = {}, {}
  for name in names:
    if draw(st.booleans()):
      inner = draw(st.lists(st.sampled_from("xyz"), min_size=1, max_size=3, unique=True))
      tree[name] = {key: draw(leaf_shapes) for key in inner}
      labels[name] = {key: draw(st.sampled_from(pp.PARAM_LABELS)) for key in inner}
    else:
      tree[name] = [draw(leaf_shapes) for _ in range(draw(st.integers(1, 2)))]
      labels[name] = [draw(st.sampled_from(pp.PARAM_LABELS)) for _ in tree[name]]
  seed = draw(st.integers(0, 2**16))
  keys = iter(jax.random.split(jax.random.key(seed), 64))
  arrays = jax.tree.map(lambda shape: jax.random.normal(next(keys), shape), tree,
                        is_leaf=lambda leaf: isinstance(leaf, tuple))
  return arrays, labels


@settings(max_examples=40, deadline=None, derandomize=True)
@given(trees_and_labels())
def test_property_split_then_merge_is_the_identity(tree_and_labels):
  params, labels = tree_and_labels
  parts = pp.split_params(params, labels)
  for label, part in parts.items():
    assert jax.tree.structure(part, is_leaf=lambda x: x is None) == jax.tree.structure(labels)
    assert all(value == label for value, leaf in zip(jax.tree.leaves(labels), jax.tree.leaves(
        part, is_leaf=lambda x: x is None)) if leaf is not None)
  merged = pp.merge_params(parts, labels)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  chex.assert_trees_all_equal(merged, params)
  assert sum(pp.count_params(params, labels).values()) == sum(np.size(leaf) for leaf in jax.tree.leaves(params))


def test_merge_errors_name_the_missing_part_and_the_parameter():
  _, params = model_and_params()
  labels = pp.label_params(params, head_local)
  parts = pp.split_params(params, labels)
  with pytest.raises(ValueError, match="no 'local' part"):
    pp.merge_params({"global": parts["global"]}, labels)
  with pytest.raises(ValueError, match=r"parts\['local'\] holds None at parameter 'head/bias'"):
    pp.merge_params({"global": parts["global"], "local": parts["global"]}, labels)
  with pytest.raises(ValueError, match="not shaped like the labels"):
    pp.merge_params({"global": parts["global"], "local": {"head": parts["local"]["head"]}}, labels)
  with pytest.raises(ValueError, match="unknown parameter label 'personal'"):
    pp.merge_params({"personal": params}, labels)
  with pytest.raises(TypeError, match="label tree"):
    pp.merge_params(parts, head_local)


def test_count_params():
  _, params = model_and_params()
  assert pp.count_params(params, head_local) == {"global": 4 * 6 + 6, "local": 6 * 3 + 3, "frozen": 0}


# the optax mask -------------------------------------------------------------------------------------------------------


def test_partition_optimizer_leaves_frozen_params_bit_identical_through_training():
  model, params = model_and_params()
  labels = pp.label_params(params, lambda path: "frozen" if path[0] == "body" else "global")
  optimizer = optax.adamw(0.05, weight_decay=0.5)  # moves a parameter even where its gradient is zero
  tx = pp.partition_optimizer(labels, optimizer)
  final, _ = jax.jit(lambda p: train_locally(model, tx, p, client_data(), jax.random.key(1)))(params)
  chex.assert_trees_all_equal(final["body"], params["body"])
  assert not np.allclose(final["head"]["kernel"], params["head"]["kernel"])
  # The unmasked optimizer would have moved the body.
  moved, _ = train_locally(model, optimizer, params, client_data(), jax.random.key(1))
  assert not np.allclose(moved["body"]["kernel"], params["body"]["kernel"])


def test_partition_optimizer_trains_global_with_the_optimizer_and_local_with_its_own():
  model, params = model_and_params()
  tx = pp.partition_optimizer(head_local, optax.sgd(0.1), local_optimizer=optax.sgd(0.0))
  final, _ = train_locally(model, tx, params, client_data(), jax.random.key(1))
  chex.assert_trees_all_equal(final["head"], params["head"])  # a zero learning rate for the local head
  global_only, _ = train_locally(model, pp.partition_optimizer(
      lambda path: "frozen" if path[0] == "head" else "global", optax.sgd(0.1)), params, client_data(),
      jax.random.key(1))
  chex.assert_trees_all_equal(final, global_only)


def test_partition_optimizer_validates():
  with pytest.raises(TypeError, match="optimizer"):
    pp.partition_optimizer("global", optax.sgd)
  with pytest.raises(ValueError, match="unknown parameter label"):
    pp.partition_optimizer({"w": "trainable"}, optax.sgd(0.1))
  tx = pp.partition_optimizer({"w": "global"}, optax.sgd(0.1))
  with pytest.raises(ValueError, match="does not match"):
    tx.init({"w": jnp.ones(2), "b": jnp.ones(2)})


# partial models -------------------------------------------------------------------------------------------------------


def test_partial_model_equals_the_full_model_and_trains_only_the_free_parameters():
  model, params = model_and_params()
  labels = pp.label_params(params, lambda path: "frozen" if path[0] == "body" else "global")
  parts = pp.split_params(params, labels)
  data = client_data()

  def run(base, adapters):
    partial = pp.partial_model(model, labels, {"frozen": base})
    batch = {key: data[key][0] for key in ("x", "y")}
    loss, _ = masked_loss_and_metric_sums(partial, adapters, batch, data["mask"][0], None, False)
    final, sums = train_locally(partial, optax.sgd(0.1), adapters, data, jax.random.key(1))
    return loss, final, sums

  loss, final, sums = jax.jit(run)(parts["frozen"], parts["global"])
  full_loss, _ = masked_loss_and_metric_sums(model, params, {key: data[key][0] for key in ("x", "y")},
                                             data["mask"][0], None, False)
  np.testing.assert_array_equal(loss, full_loss)
  assert final["body"] == {"kernel": None, "bias": None}
  # The same steps as the full model with the body frozen by the optax mask: the same arithmetic in another
  # program, so equal up to the summation order of each step's gradient (5 examples x 6 hidden units, 3 steps).
  masked, masked_sums = train_locally(model, pp.partition_optimizer(labels, optax.sgd(0.1)), params, data,
                                      jax.random.key(1))
  assert_trees_close_to_rounding(final["head"], masked["head"], num_terms=3 * 5 * 6)
  assert_trees_close_to_rounding(sums, masked_sums, num_terms=3 * 5 * 6)


def test_partial_model_init_and_validation():
  model, params = model_and_params()
  labels = pp.label_params(params, head_local)
  parts = pp.split_params(params, labels)
  partial = pp.partial_model(model, labels, {"global": parts["global"]})
  init = partial.init(jax.random.key(0))
  chex.assert_trees_all_equal(init["head"], params["head"])
  assert init["body"] == {"kernel": None, "bias": None}
  with pytest.raises(ValueError, match="no parameters"):
    pp.partial_model(model, labels, {"global": parts["global"], "local": parts["local"]})
  with pytest.raises(ValueError, match="unknown parameter label"):
    pp.partial_model(model, labels, {"base": parts["global"]})
  with pytest.raises(TypeError, match="label tree"):
    pp.partial_model(model, head_local, {"global": parts["global"]})


def test_partial_model_is_a_model():
  model, params = model_and_params()
  labels = pp.label_params(params, head_local)
  assert isinstance(pp.partial_model(model, labels, {"local": pp.split_params(params, labels)["local"]}), Model)
