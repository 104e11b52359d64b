"""Pretrained weights: save a model's params to a local file and load them back into a model's param tree.

Where this sits: before federated fine-tuning (e.g. LoRA on :func:`fedjax_lite.models.transformer_lm`), the server's
initial params come from a checkpoint the user names -- written by ``experiments/pretrain_transformer.py`` or
converted from elsewhere -- instead of ``model.init``. Nothing is ever downloaded.

Formats, chosen by the path:

* ``*.npz`` -- NumPy's zip of arrays (``numpy.savez``);
* ``*.safetensors`` -- the safetensors format (the optional extra ``pip install 'fedjax_lite[safetensors]'``,
  imported only when such a file is read or written);
* a directory -- an orbax checkpoint of the params pytree (``orbax.checkpoint.StandardCheckpointer``).

In every format a parameter's key is its path in the tree, names joined by ``/`` (``block_0/attention/query/kernel``;
:func:`fedjax_lite.core.path_names`), so a file converted from another framework only needs its keys renamed.
Loading checks the file against the model's tree and reports every problem at once: parameters missing from the
file, entries of the file that match no parameter, and shape or dtype-kind mismatches. Floating-point values are
cast to the model's dtype (a bfloat16 file loads into a float32 model); integer and boolean leaves must match kinds.
"""

from __future__ import annotations

import os
import pathlib
from typing import Callable

import jax
import numpy as np

from fedjax_lite.core.param_partition import ParamPath, path_names
from fedjax_lite.core.tree import PyTree

def flatten_params(params: PyTree) -> dict[str, np.ndarray]:
  """``{'a/b/c': array}``: every leaf of ``params`` under its ``/``-joined path (:func:`path_names`)."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    key = "/".join(path_names(path))
    if key in flat:
      raise ValueError(f"two parameters share the key {key!r}; parameter names must not contain '/'.")
    flat[key] = np.asarray(leaf)
  return flat


def _safetensors_numpy():
  try:
    import safetensors.numpy  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError("reading or writing .safetensors files needs the optional extra: "
                      "pip install 'fedjax_lite[safetensors]' (or pip install safetensors).") from None
  return safetensors.numpy


def _orbax():
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  return ocp


def _format(path: pathlib.Path, *, exists: bool) -> str:
  if path.suffix == ".npz":
    return "npz"
  if path.suffix == ".safetensors":
    return "safetensors"
  if (exists and path.is_dir()) or (not exists and not path.suffix):
    return "orbax"
  raise ValueError(f"{path}: unknown weights format; use a .npz or .safetensors file or an orbax checkpoint "
                   "directory.")


def save_params(path: str | os.PathLike, params: PyTree, *, overwrite: bool = False) -> pathlib.Path:
  """Writes ``params`` to ``path`` (``.npz``, ``.safetensors``, or a directory path without a suffix for orbax);
  returns the absolute path. Refuses to replace an existing file or directory unless ``overwrite``."""
  path = pathlib.Path(path).expanduser().absolute()
  kind = _format(path, exists=False)
  if path.exists() and not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
  path.parent.mkdir(parents=True, exist_ok=True)
  flat = flatten_params(params)
  if kind == "npz":
    with open(path, "wb") as file:
      np.savez(file, **flat)
  elif kind == "safetensors":
    _safetensors_numpy().save_file({key: np.ascontiguousarray(value) for key, value in flat.items()}, str(path))
  else:
    checkpointer = _orbax().StandardCheckpointer()
    checkpointer.save(path, jax.tree.map(np.asarray, params), force=overwrite)
    checkpointer.wait_until_finished()
    checkpointer.close()
  return path


def read_params(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The arrays stored at ``path``, flat: ``{'a/b/c': array}`` (any of the formats of this module)."""
  path = pathlib.Path(path).expanduser().absolute()
  if not path.exists():
    raise FileNotFoundError(f"no pretrained weights at {path} (nothing is downloaded: name a local .npz, "
                            ".safetensors or orbax checkpoint directory).")
  kind = _format(path, exists=True)
  if kind == "npz":
    with np.load(path, allow_pickle=False) as stored:
      return {key: stored[key] for key in stored.files}
  if kind == "safetensors":
    return dict(_safetensors_numpy().load_file(str(path)))
  checkpointer = _orbax().StandardCheckpointer()
  try:
    restored = checkpointer.restore(path)
  except Exception as error:  # orbax raises many types for a directory that is not its checkpoint
    raise ValueError(f"{path} is not an orbax checkpoint of a params tree ({type(error).__name__}: {error}). A "
                     "training run's checkpoint directory holds one subdirectory per saved round.") from None
  finally:
    checkpointer.close()
  return flatten_params(restored)


def _list(items: list[str], limit: int = 8) -> str:
  return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def load_params(
    path: str | os.PathLike,
    template: PyTree,
    *,
    missing_ok: Callable[[ParamPath], bool] | None = None,
) -> PyTree:
  """The params stored at ``path``, in ``template``'s tree structure, shapes and dtypes.

  Args:
    path: a ``.npz`` or ``.safetensors`` file or an orbax checkpoint directory (see the module docstring).
    template: the model's params (e.g. ``model.init(key)``) or their shapes (``jax.eval_shape(model.init, key)``).
    missing_ok: ``path -> bool`` for parameters the file may lack; they keep the template's value (so the template
      must hold arrays there). E.g. ``models.is_lora_path`` loads a base model's weights into a LoRA model whose
      adapters start from their initialization.

  Raises:
    FileNotFoundError: nothing at ``path``.
    ValueError: parameters missing from the file, entries of the file that match no parameter, shapes that differ
      or integer/float kinds that differ -- all of them named in one message.

  Example::

    model = models.transformer_lm(lora_rank=8)
    params = models.load_params('pretrained.npz', model.init(jax.random.key(0)),
                                missing_ok=models.is_lora_path)
  """
  stored = read_params(path)
  leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(template)
  missing, mismatched, leaves = [], [], []
  expected_keys = set()
  for key_path, leaf in leaves_with_paths:
    names = path_names(key_path)
    key = "/".join(names)
    expected_keys.add(key)
    shape, dtype = tuple(np.shape(leaf)), np.dtype(leaf.dtype)
    if key not in stored:
      if missing_ok is not None and missing_ok(names):
        if isinstance(leaf, jax.ShapeDtypeStruct):
          raise ValueError(f"{key} is missing from {path} and kept from the template, which holds only its shape: "
                           "pass concrete params (model.init(key)) as the template.")
        leaves.append(leaf)
      else:
        missing.append(key)
        leaves.append(None)
      continue
    value = stored[key]
    if tuple(value.shape) != shape:
      mismatched.append(f"{key}: file {tuple(value.shape)} vs model {shape}")
    elif np.issubdtype(value.dtype, np.floating) != np.issubdtype(dtype, np.floating) or (
        np.issubdtype(value.dtype, np.bool_) != np.issubdtype(dtype, np.bool_)):
      mismatched.append(f"{key}: file dtype {value.dtype} vs model {dtype}")
    leaves.append(value)
  unexpected = sorted(set(stored) - expected_keys)
  if missing or unexpected or mismatched:
    problems = []
    if missing:
      problems.append(f"{len(missing)} parameter(s) of the model missing from the file: {_list(missing)}")
      if missing_ok is None and any(name.rsplit("/", 1)[-1] in ("lora_a", "lora_b") for name in missing):
        problems[-1] += " (LoRA adapters start from their initialization with missing_ok=models.is_lora_path)"
    if unexpected:
      problems.append(f"{len(unexpected)} entr(ies) of the file matching no parameter: {_list(unexpected)}")
    if mismatched:
      problems.append(f"{len(mismatched)} mismatch(es): {_list(mismatched)}")
    raise ValueError(f"the weights at {path} do not fit the model: " + "; ".join(problems) + ".")
  converted = [leaf if "/".join(path_names(key_path)) not in stored
               else jax.numpy.asarray(leaf, dtype=template_leaf.dtype)
               for leaf, (key_path, template_leaf) in zip(leaves, leaves_with_paths)]
  return jax.tree.unflatten(treedef, converted)
