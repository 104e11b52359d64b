"""Tests for fedjax_lite.models.transformer and fedjax_lite.models.lora.

The forward pass is checked against an independent NumPy re-derivation (embeddings, pre-norm blocks, causal
softmax attention, tanh-GELU MLP, tied logits, LoRA's ``(alpha / r) x A B``); causality exactly (a later token
changes no earlier logit); LoRA at initialization (B = 0) equals the base model bit for bit; the default adapters at
rank 8 are ~1% of the model.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lite.algorithms.local_training import train_locally
from fedjax_lite.core import param_partition as pp
from fedjax_lite.core.model import masked_loss_and_metric_sums
from fedjax_lite.models import lora, transformer
from fedjax_lite.models.sequence import token_metrics

TINY = dict(vocab_size=11, sequence_length=6, num_layers=2, num_heads=2, width=8)  # 15 ids with the specials


def tiny(**overrides):
  return transformer.transformer_lm(**(TINY | overrides))


def random_ids(shape, seed=0, high=15):
  return np.random.default_rng(seed).integers(1, high, shape).astype(np.int32)


def randomized(params, seed=1, scale=0.3):
  """Every leaf replaced by random values (so that B != 0 and LayerNorm scales differ from 1)."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, leaf.shape) for k, leaf in zip(keys, leaves)])


# NumPy re-derivation --------------------------------------------------------------------------------------------------


def np_layer_norm(x, p, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_dense(x, p, alpha_over_rank=1.0):
  y = x @ p["kernel"] + p["bias"]
  if "lora_a" in p:
    y = y + (x @ p["lora_a"]) @ p["lora_b"] * alpha_over_rank
  return y


def np_gelu(x):  # flax's default: the tanh approximation
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def np_forward(params, ids, num_heads, alpha_over_rank=1.0):
  p = jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), params)
  batch, length = ids.shape
  h = p["token_embedding"][ids] + p["position_embedding"][:length]
  for name in sorted(k for k in p if k.startswith("block_")):
    block = p[name]
    x = np_layer_norm(h, block["attention_norm"])
    width = x.shape[-1]
    split = lambda t: t.reshape(batch, length, num_heads, width // num_heads)
    attention = block["attention"]
    q, k, v = (split(np_dense(x, attention[n], alpha_over_rank)) for n in ("query", "key", "value"))
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(width // num_heads)
    scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    attended = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, width)
    h = h + np_dense(attended, attention["out"], alpha_over_rank)
    m = np_gelu(np_dense(np_layer_norm(h, block["mlp_norm"]), block["mlp_in"], alpha_over_rank))
    h = h + np_dense(m, block["mlp_out"], alpha_over_rank)
  return np_layer_norm(h, p["final_norm"]) @ p["token_embedding"].T


@pytest.mark.parametrize("lora_kwargs", [{}, {"lora_rank": 2, "lora_alpha": 6.0,
                                              "lora_targets": transformer.LORA_TARGETS}], ids=["base", "lora"])
def test_forward_pass_equals_numpy(lora_kwargs):
  model = tiny(**lora_kwargs)
  params = randomized(model.init(jax.random.key(0)))
  ids = random_ids((3, 6))
  logits = jax.jit(lambda p: model.apply(p, {"x": ids}, None, False))(params)
  expected = np_forward(params, ids, num_heads=2, alpha_over_rank=3.0 if lora_kwargs else 1.0)
  assert logits.shape == (3, 6, 15)
  # float32 against float64: a few dozen roundings per value through two blocks, values of order 1-10.
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


# shapes, causality, LoRA ----------------------------------------------------------------------------------------------


def test_shapes_and_default_parameter_count():
  model = transformer.transformer_lm()
  params = jax.eval_shape(model.init, jax.random.key(0))
  vocab, width, length, layers, hidden = 90, 256, 80, 4, 1024
  per_block = 2 * 2 * width + 4 * (width * width + width) + (width * hidden + hidden) + (hidden * width + width)
  expected = vocab * width + length * width + layers * per_block + 2 * width
  assert sum(np.size(leaf) for leaf in jax.tree.leaves(params)) == expected == 3_203_072
  logits = jax.eval_shape(lambda p: model.apply(p, {"x": jnp.zeros((2, 80), jnp.int32)}, None, False), params)
  assert logits.shape == (2, 80, 90)
  shorter = jax.eval_shape(lambda p: model.apply(p, {"x": jnp.zeros((2, 7), jnp.int32)}, None, False), params)
  assert shorter.shape == (2, 7, 90)


def test_a_future_token_changes_no_earlier_logit():
  model = tiny(lora_rank=2, lora_targets=transformer.LORA_TARGETS)
  params = randomized(model.init(jax.random.key(0)))
  ids = random_ids((2, 6))
  apply = jax.jit(lambda x: model.apply(params, {"x": x}, None, False))
  logits = apply(ids)
  for position in range(6):
    changed = ids.copy()
    changed[:, position] = (ids[:, position] % 13) + 1
    assert not np.array_equal(changed[:, position], ids[:, position])
    new_logits = apply(changed)
    np.testing.assert_array_equal(new_logits[:, :position], logits[:, :position])
    assert not np.allclose(new_logits[:, position:], logits[:, position:])


def test_lora_at_initialization_is_the_base_model_exactly():
  adapted = tiny(lora_rank=4, lora_targets=transformer.LORA_TARGETS)
  base = tiny()
  adapted_params = adapted.init(jax.random.key(3))
  base_params = _without_adapters(adapted_params)
  chex.assert_trees_all_equal_structs(base_params, base.init(jax.random.key(0)))
  ids = random_ids((3, 6))
  np.testing.assert_array_equal(adapted.apply(adapted_params, {"x": ids}, None, False),
                                base.apply(base_params, {"x": ids}, None, False))
  assert all(not np.any(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(adapted_params)[0]
             if pp.path_names(path)[-1] == "lora_b")


def _without_adapters(tree):
  if isinstance(tree, dict):
    return {key: _without_adapters(value) for key, value in tree.items() if key not in lora.LORA_PARAM_NAMES}
  return tree


def test_adapters_at_rank_8_are_about_one_percent_of_the_model():
  params = jax.eval_shape(transformer.transformer_lm(lora_rank=8).init, jax.random.key(0))
  counts = pp.count_params(params, lora.lora_labels(params))
  assert counts == {"global": 4 * 2 * 8 * (256 + 256), "local": 0, "frozen": 3_203_072}
  assert 0.01 <= counts["global"] / (counts["global"] + counts["frozen"]) <= 0.02
  all_attention = jax.eval_shape(transformer.transformer_lm(lora_rank=8, lora_targets=(
      "query", "key", "value", "out")).init, jax.random.key(0))
  assert pp.count_params(all_attention, lora.lora_labels(all_attention))["global"] == 2 * counts["global"]


def test_lora_labels_mark_adapters_global_and_the_base_frozen():
  params = tiny(lora_rank=2, lora_targets=("value", "mlp_out")).init(jax.random.key(0))
  labels = lora.lora_labels(params)
  flat = {"/".join(pp.path_names(path)): label for path, label in jax.tree_util.tree_flatten_with_path(labels)[0]}
  assert {path for path, label in flat.items() if label == "global"} == {
      f"block_{i}/{where}/{name}" for i in range(2) for where in ("attention/value", "mlp_out")
      for name in ("lora_a", "lora_b")}
  with pytest.raises(ValueError, match="no LoRA adapters"):
    lora.lora_labels(tiny().init(jax.random.key(0)))


def test_lora_dense_equals_its_formula():
  layer = lora.LoRADense(5, rank=3, alpha=12.0)
  x = np.random.default_rng(0).normal(size=(4, 7)).astype(np.float32)
  params = randomized(layer.init(jax.random.key(0), x))["params"]
  expected = np_dense(np.asarray(x, np.float64), jax.tree.map(np.asarray, params), alpha_over_rank=4.0)
  np.testing.assert_allclose(layer.apply({"params": params}, x), expected, rtol=1e-5, atol=1e-5)
  assert params["lora_a"].shape == (7, 3) and params["lora_b"].shape == (3, 5)


# metrics and training -------------------------------------------------------------------------------------------------


def test_token_metrics_exclude_pad_and_eos():
  model = tiny()
  params = model.init(jax.random.key(0))
  ids = random_ids((2, 6), high=12)
  targets = ids.copy()
  targets[0, 4:] = 0  # pad
  targets[1, 5] = 14  # EOS (vocabulary 11 + OOV 12, BOS 13, EOS 14)
  _, sums = masked_loss_and_metric_sums(model, params, {"x": ids, "y": targets}, np.ones(2, bool), None, False)
  assert float(sums["counted_tokens"]) == 12 - 2 - 1
  metrics = token_metrics(sums)
  assert 0.0 <= float(metrics["accuracy"]) <= 1.0 and np.isfinite(metrics["loss"])


def test_lora_fine_tuning_trains_the_adapters_and_leaves_the_base_alone():
  model = tiny(lora_rank=2)
  params = model.init(jax.random.key(0))
  labels = lora.lora_labels(params)
  parts = pp.split_params(params, labels)
  rng = np.random.default_rng(0)
  sequences = rng.integers(1, 12, (4, 3, 7)).astype(np.int32)
  data = {"x": sequences[..., :-1], "y": sequences[..., 1:], "mask": np.ones((4, 3), bool),
          "num_examples": np.int32(12)}

  @jax.jit
  def fine_tune(base, adapters):
    partial = pp.partial_model(model, labels, {"frozen": base})
    return train_locally(partial, optax.adam(0.05), adapters, data, jax.random.key(1))

  adapters, sums = fine_tune(parts["frozen"], parts["global"])
  merged = pp.merge_params({"global": adapters, "frozen": parts["frozen"]}, labels)
  chex.assert_trees_all_equal(pp.split_params(merged, labels)["frozen"], parts["frozen"])
  assert any(np.any(leaf) for leaf in jax.tree.leaves(pp.split_params(merged, labels)["global"]))
  before, _ = masked_loss_and_metric_sums(model, params, {"x": data["x"][0], "y": data["y"][0]},
                                          np.ones(3, bool), None, False)
  after, _ = masked_loss_and_metric_sums(model, merged, {"x": data["x"][0], "y": data["y"][0]},
                                         np.ones(3, bool), None, False)
  assert float(after) < float(before)


@pytest.mark.parametrize("kwargs, message", [
    ({"width": 10, "num_heads": 4}, "divisible"),
    ({"lora_rank": 2, "lora_targets": ("query", "gate")}, "lora_targets"),
    ({"lora_targets": ()}, "lora_targets"),
    ({"context_length": 4}, "context_length"),
    ({"lora_rank": -1}, "lora_rank"),
    ({"lora_alpha": 0.0}, "lora_alpha"),
    ({"dropout_rate": 1.0}, "dropout_rate"),
    ({"num_layers": 0}, "num_layers"),
])
def test_bad_arguments_are_one_clear_error(kwargs, message):
  with pytest.raises(ValueError, match=message):
    tiny(**kwargs)


def test_inputs_longer_than_the_context_are_refused():
  model = tiny()
  params = model.init(jax.random.key(0))
  with pytest.raises(ValueError, match="context_length"):
    model.apply(params, {"x": np.ones((1, 7), np.int32)}, None, False)


def test_dropout_runs_in_training_only():
  model = tiny(dropout_rate=0.5)
  params = model.init(jax.random.key(0))
  ids = random_ids((2, 6))
  np.testing.assert_array_equal(model.apply(params, {"x": ids}, None, False),
                                model.apply(params, {"x": ids}, jax.random.key(1), False))
  assert not np.allclose(model.apply(params, {"x": ids}, jax.random.key(1), True),
                         model.apply(params, {"x": ids}, None, False))
