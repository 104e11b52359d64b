"""Tests for fedjax_lite.core.tree: finiteness, selection, weighting, client sums and sizes of pytrees."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lite.core.tree import (
    dtype_bits,
    tree_all_finite,
    tree_num_elements,
    tree_scale_by_weight,
    tree_select,
    tree_size_bits,
    tree_sum_over_clients,
)


def nested_tree():
  return {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}, "scale": jnp.float32(2.0),
          "steps": jnp.array([1, 2], jnp.int32)}


# tree_all_finite ------------------------------------------------------------------------------------------------------


def test_all_finite_true_for_finite_tree():
  result = tree_all_finite(nested_tree())
  assert result.dtype == jnp.bool_ and result.shape == ()
  assert bool(result)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("where", ["kernel", "bias", "scale"])
def test_all_finite_false_for_one_bad_element(bad, where):
  tree = nested_tree()
  if where == "kernel":
    tree["dense"]["kernel"] = tree["dense"]["kernel"].at[1, 2].set(bad)
  elif where == "bias":
    tree["dense"]["bias"] = tree["dense"]["bias"].at[0].set(bad)
  else:
    tree["scale"] = jnp.float32(bad)
  assert not bool(tree_all_finite(tree))
  assert not bool(jax.jit(tree_all_finite)(tree))


@pytest.mark.parametrize("tree", [{}, [], (), None, {"a": {}, "b": []}], ids=["dict", "list", "tuple", "none", "nested"])
def test_all_finite_true_for_empty_tree(tree):
  assert bool(tree_all_finite(tree))


def test_all_finite_integer_and_bool_leaves():
  assert bool(tree_all_finite({"i": jnp.array([2**31 - 1], jnp.int32), "b": jnp.array([True, False])}))


def test_all_finite_large_but_finite_values():
  assert bool(tree_all_finite(jnp.array([np.finfo(np.float32).max, np.finfo(np.float32).tiny, -0.0])))
  assert not bool(tree_all_finite(jnp.array([np.finfo(np.float32).max]) * 2))  # overflow to inf


# tree_select ----------------------------------------------------------------------------------------------------------


def test_tree_select_picks_whole_tree():
  on_true = {"a": jnp.array([1.0, 2.0]), "b": (jnp.int32(3),)}
  on_false = {"a": jnp.array([-1.0, -2.0]), "b": (jnp.int32(-3),)}
  chex.assert_trees_all_equal(tree_select(jnp.array(True), on_true, on_false), on_true)
  chex.assert_trees_all_equal(tree_select(jnp.array(False), on_true, on_false), on_false)
  chex.assert_trees_all_equal(tree_select(True, on_true, on_false), on_true)


def test_tree_select_with_traced_condition():
  on_true = {"a": jnp.arange(3.0)}
  on_false = {"a": jnp.full(3, 7.0)}
  select = jax.jit(tree_select)
  chex.assert_trees_all_equal(select(jnp.array(True), on_true, on_false), on_true)
  chex.assert_trees_all_equal(select(jnp.array(False), on_true, on_false), on_false)


def test_tree_select_keeps_nan_out_of_the_unselected_branch():
  # The typical use: reject a non-finite update and keep the old value.
  old = {"w": jnp.array([1.0, 2.0])}
  new = {"w": jnp.array([np.nan, 3.0])}
  kept = tree_select(tree_all_finite(new), new, old)
  chex.assert_trees_all_equal(kept, old)


def test_tree_select_rejects_mismatched_structures():
  with pytest.raises(ValueError):
    tree_select(True, {"a": jnp.zeros(1)}, {"b": jnp.zeros(1)})


# Weights, sums, sizes -------------------------------------------------------------------------------------------------


def test_tree_scale_by_weight_exact_and_dtype_preserving():
  tree = {"f": jnp.array([1.0, -2.0, 3.0]), "h": jnp.array([2.0], jnp.bfloat16), "i": jnp.array([3, 4], jnp.int32)}
  scaled = tree_scale_by_weight(tree, jnp.float32(2.0))
  chex.assert_trees_all_equal(
      scaled, {"f": jnp.array([2.0, -4.0, 6.0]), "h": jnp.array([4.0], jnp.bfloat16), "i": jnp.array([6, 8], jnp.int32)}
  )
  # The weight is cast to the leaf's dtype first (as TFF does): 2.7 -> 2 for an int32 leaf.
  np.testing.assert_array_equal(tree_scale_by_weight({"i": jnp.array([5], jnp.int32)}, 2.7)["i"], [10])


def test_tree_sum_over_clients_exact():
  tree = {"a": jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, -6.0]]), "b": jnp.array([1, 2, 3], jnp.int32)}
  chex.assert_trees_all_equal(tree_sum_over_clients(tree), {"a": jnp.array([9.0, 0.0]), "b": jnp.int32(6)})


def test_tree_num_elements():
  assert tree_num_elements(nested_tree()) == 6 + 3 + 1 + 2
  assert tree_num_elements({}) == 0
  assert tree_num_elements({"a": jnp.zeros((0, 5))}) == 0


@pytest.mark.parametrize(
    "dtype, bits",
    [(np.float32, 32), (np.bool_, 1), (np.int8, 8), (np.uint8, 8), (np.int32, 32), (np.float16, 16),
     (jnp.bfloat16, 16), (np.float64, 64), (np.int64, 64)],
)
def test_dtype_bits(dtype, bits):
  assert dtype_bits(dtype) == bits


def test_tree_size_bits_per_dtype():
  assert tree_size_bits(jnp.zeros((3, 4), jnp.float32)) == 12 * 32
  assert tree_size_bits(jnp.zeros(10, jnp.bool_)) == 10
  assert tree_size_bits(jnp.zeros((5,), jnp.int8)) == 40
  assert tree_size_bits(np.zeros((2, 2), np.bool_)) == 4
  assert tree_size_bits(jnp.float32(1.0)) == 32  # a scalar is one element


def test_tree_size_bits_sums_over_mixed_tree():
  tree = {"w": jnp.zeros((2, 3), jnp.float32), "mask": jnp.zeros(7, jnp.bool_), "q": (jnp.zeros(4, jnp.int8),),
          "h": jnp.zeros(3, jnp.bfloat16)}
  assert tree_size_bits(tree) == 6 * 32 + 7 * 1 + 4 * 8 + 3 * 16
  assert tree_size_bits({}) == 0
  assert isinstance(tree_size_bits(tree), int)


def test_tree_size_bits_works_on_shapes_only():
  shapes = jax.eval_shape(lambda: {"w": jnp.zeros((8, 8)), "b": jnp.zeros(8, jnp.int8)})
  assert tree_size_bits(shapes) == 64 * 32 + 8 * 8


def test_the_pytree_alias_is_defined_once():
  """``PyTree`` is defined in ``core/tree.py`` only; every other module (and benchmark) imports it from there."""
  import ast
  import pathlib

  root = pathlib.Path(__file__).resolve().parents[2]
  definitions = []
  for path in sorted([*root.joinpath("fedjax_lite").rglob("*.py"), *root.joinpath("benchmarks").rglob("*.py")]):
    for node in ast.parse(path.read_text()).body:
      if isinstance(node, ast.Assign):
        targets = node.targets
      elif isinstance(node, ast.AnnAssign):
        targets = [node.target]
      else:
        continue
      if any(isinstance(target, ast.Name) and target.id == "PyTree" for target in targets):
        definitions.append(f"{path.relative_to(root)}:{node.lineno}")
  assert [where.split(":")[0] for where in definitions] == ["fedjax_lite/core/tree.py"], definitions
