"""Tests for fedjax_lite.models.pretrained: weights round-trip exactly through every format, a base checkpoint loads
into a LoRA model, and every way a file can fail to fit the model is named in one error."""

import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lite.models import lora, pretrained, transformer

SMALL = dict(vocab_size=9, sequence_length=5, num_layers=1, num_heads=2, width=8)


@pytest.fixture(scope="module")
def base_params():
  return jax.jit(transformer.transformer_lm(**SMALL).init)(jax.random.key(0))


@pytest.mark.parametrize("name", ["weights.npz", "weights.safetensors", "checkpoint"])
def test_round_trip_is_exact_in_every_format(tmp_path, base_params, name):
  if name.endswith(".safetensors"):
    pytest.importorskip("safetensors")
  saved = pretrained.save_params(tmp_path / name, base_params)
  assert saved.is_absolute() and saved.exists()
  loaded = pretrained.load_params(saved, jax.eval_shape(lambda: base_params))
  chex.assert_trees_all_equal(loaded, base_params)
  assert set(pretrained.read_params(saved)) == set(pretrained.flatten_params(base_params))
  assert "block_0/attention/query/kernel" in pretrained.read_params(saved)


def test_a_base_checkpoint_loads_into_a_lora_model(tmp_path, base_params):
  path = pretrained.save_params(tmp_path / "base.npz", base_params)
  adapted = transformer.transformer_lm(**SMALL, lora_rank=2)
  template = adapted.init(jax.random.key(5))
  with pytest.raises(ValueError, match=r"missing from the file: .*lora_a.*missing_ok=models.is_lora_path"):
    pretrained.load_params(path, template)
  params = pretrained.load_params(path, template, missing_ok=lora.is_lora_path)
  chex.assert_trees_all_equal(params["block_0"]["mlp_in"], base_params["block_0"]["mlp_in"])
  chex.assert_trees_all_equal(params["block_0"]["attention"]["query"]["lora_a"],
                              template["block_0"]["attention"]["query"]["lora_a"])
  ids = np.arange(10).reshape(2, 5).astype(np.int32) % 9 + 1
  np.testing.assert_array_equal(adapted.apply(params, {"x": ids}, None, False),
                                transformer.transformer_lm(**SMALL).apply(base_params, {"x": ids}, None, False))
  with pytest.raises(ValueError, match="holds only its shape"):
    pretrained.load_params(path, jax.eval_shape(lambda: template), missing_ok=lora.is_lora_path)


def test_every_mismatch_is_named_in_one_error(tmp_path, base_params):
  flat = pretrained.flatten_params(base_params)
  flat.pop("final_norm/scale")
  flat["block_0/attention/query/kernel"] = np.zeros((8, 4), np.float32)
  flat["block_0/attention/query/bias"] = np.zeros(8, np.int32)
  flat["head/kernel"] = np.zeros((8, 9), np.float32)
  path = tmp_path / "bad.npz"
  np.savez(path, **flat)
  with pytest.raises(ValueError) as error:
    pretrained.load_params(path, base_params)
  message = str(error.value)
  assert "1 parameter(s) of the model missing from the file: final_norm/scale" in message
  assert "matching no parameter: head/kernel" in message
  assert "block_0/attention/query/kernel: file (8, 4) vs model (8, 8)" in message
  assert "block_0/attention/query/bias: file dtype int32 vs model float32" in message


def test_floats_are_cast_to_the_models_dtype(tmp_path, base_params):
  path = pretrained.save_params(tmp_path / "half.npz", jax.tree.map(lambda leaf: leaf.astype(jnp.float16),
                                                                     base_params))
  loaded = pretrained.load_params(path, base_params)
  chex.assert_trees_all_equal_dtypes(loaded, base_params)
  chex.assert_trees_all_equal(loaded, jax.tree.map(lambda leaf: leaf.astype(jnp.float16).astype(jnp.float32),
                                                   base_params))


def test_paths_and_formats_are_checked(tmp_path, base_params):
  with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
    pretrained.load_params(tmp_path / "absent.npz", base_params)
  (tmp_path / "weights.bin").write_bytes(b"0")
  with pytest.raises(ValueError, match="unknown weights format"):
    pretrained.read_params(tmp_path / "weights.bin")
  path = pretrained.save_params(tmp_path / "w.npz", base_params)
  with pytest.raises(FileExistsError, match="overwrite"):
    pretrained.save_params(path, base_params)
  pretrained.save_params(path, base_params, overwrite=True)
  (tmp_path / "not_orbax").mkdir()
  with pytest.raises(ValueError, match="not an orbax checkpoint"):
    pretrained.read_params(tmp_path / "not_orbax")


def test_safetensors_without_the_extra_is_a_clear_error(tmp_path, base_params, monkeypatch):
  monkeypatch.setitem(sys.modules, "safetensors", None)
  monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
  with pytest.raises(ImportError, match=r"fedjax_lite\[safetensors\]"):
    pretrained.save_params(tmp_path / "w.safetensors", base_params)
