"""Per-example clipped gradient sums from one batched pass, layer by layer ("ghost" norms and book-keeping).

Part 2 of the round (client work), inside :func:`~fedjax_lite.algorithms.example_dp.private_gradient` when
``ExampleDp(per_example='ghost')`` (or ``'auto'`` and the model allows it). DP-SGD needs, for every example ``j`` of
a batch, the norm ``||g_j||`` of its gradient, then ``sum_j s_j g_j`` with ``s_j = min(1, C / ||g_j||)``. Written
naively that is one backward pass per example, and for a dense kernel of ``D x O`` entries it writes ``B`` such
kernels to memory. Here, as in Goodfellow 2015 ("Efficient per-example gradient computations", arXiv:1510.01799),
Li et al. 2022 (ghost clipping, ICLR, arXiv:2110.05679) and Bu et al. 2023 ("book-keeping", ICML,
arXiv:2210.00038), ONE batched forward and backward pass gives every layer's input ``x`` and output gradient ``dy``
(the gradient of the summed per-example losses with respect to a zero added to the layer's output), and:

* a dense layer ``y = x W + b`` (``flax.linen.Dense``; ``x_j`` of ``T`` rows ``[T, D]``) has the per-example
  gradient ``G_j = x_j^T dy_j`` whose squared norm is ``||x_j||^2 ||dy_j||^2`` when ``T = 1`` and
  ``<x_j x_j^T, dy_j dy_j^T>`` (two ``T x T`` Gram matrices) for sequences when ``T^2 <= D O`` (else ``G_j`` is
  formed), plus ``||sum_t dy_jt||^2`` for the bias -- the ``D x O`` gradient of an example is never formed;
* any other layer owning parameters (convolutions, normalization, embeddings) gets its per-example gradient from
  its own function on a batch of one, ``vjp`` of the layer at ``x_j`` applied to ``dy_j``, mapped over the
  examples (``lax.map`` on CPU, ``vmap`` on accelerators); only that layer's parameters are differentiated;
* the clipped sum ``sum_j s_j g_j`` is each layer's ``vjp`` at the whole batch applied to ``s_j dy_j`` (the
  book-keeping trick: no second backward pass through the network).

``||g_j||^2`` is the sum of the layers' squared norms. What it needs from the model, checked once when the step is
traced (:func:`ghost_layers`; otherwise the reason is returned and ``'auto'`` falls back to per-example passes):
the model runs ``flax.linen`` modules, every trained parameter belongs to exactly one "layer" -- a module that owns
its parameters directly, receives them unchanged (no transformation between the trained tree and the module), is
called exactly once per forward pass with one array argument, returns one array with the batch axis first, and
is not inside a lifted transform -- and, as for any per-example gradient, example ``j``'s outputs depend on
example ``j``'s inputs only (the batch is not mixed; models with BatchNorm are refused earlier). Dropout and other
randomness draw from the step's key once for the batch, as the non-private step does.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_lite.core.model import Model, masked_loss_and_metric_sums
from fedjax_lite.core.tree import PyTree


@dataclasses.dataclass(frozen=True)
class GhostLayer:
  """One parameter-owning module of the model: ``path`` in the params tree, an unbound copy of the module (its
  function of ``(params, x)``), and whether the dense rule applies."""

  path: tuple[str, ...]
  module: nn.Module
  dense: bool

  def apply(self, layer_params: PyTree, inputs: jax.Array) -> jax.Array:
    return self.module.apply({"params": layer_params}, inputs)


def _subtree(tree: Any, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _key_name(key) -> str:
  return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))


def ghost_layers(model: Model, params: PyTree, batch: dict, mask: jax.Array,
                 rng: jax.Array | None) -> tuple[tuple[GhostLayer, ...] | None, str]:
  """``(layers, '')`` when the batched per-layer computation applies to ``model`` (module docstring), else
  ``(None, reason)``. Runs the model's forward pass abstractly once (``jax.eval_shape``); nothing is computed."""
  leaves_with_paths = jax.tree_util.tree_flatten_with_path(params)[0]
  if not leaves_with_paths:
    return None, "the model has no parameters"
  owners: dict[tuple[str, ...], list[str]] = {}
  for key_path, _ in leaves_with_paths:
    names = tuple(_key_name(k) for k in key_path)
    owners.setdefault(names[:-1], []).append(names[-1])
  batch_size = mask.shape[0]
  calls: dict[tuple[str, ...], list] = {}
  problems: list[str] = []

  def discover(abstract_params):
    abstract_leaves = {tuple(_key_name(k) for k in key_path): leaf
                       for key_path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}

    def on_call(path, call, args, kwargs, context):
      out = call()
      module = context.module
      if path in owners:
        record = calls.setdefault(path, [])
        ok = (context.method_name == "__call__" and len(args) == 1 and not kwargs
              and isinstance(args[0], jax.Array) and isinstance(out, jax.Array)
              and args[0].ndim >= 1 and out.ndim >= 1
              and args[0].shape[0] == batch_size and out.shape[0] == batch_size)
        seen = module.variables.get("params", {})
        seen = seen if isinstance(seen, Mapping) else {}
        leaf_module = all(not isinstance(value, Mapping) for value in seen.values())
        same = (sorted(seen) == sorted(owners[path])
                and all(seen[name] is abstract_leaves[path + (name,)] for name in owners[path]))
        record.append((context.method_name, ok, same, leaf_module, module))
      return out

    with nn.intercept_methods(_outermost_calls(on_call)):
      return masked_loss_and_metric_sums(model, abstract_params, batch, mask, rng, True)[0]

  try:
    jax.eval_shape(discover, params)
  except Exception as error:  # noqa: BLE001 - any failure of the abstract pass means: not applicable
    return None, f"the model's forward pass could not be traced layer by layer ({type(error).__name__}: {error})"
  layers = []
  for path, names in owners.items():
    where = "/".join(path) or "<root>"
    record = calls.get(path)
    if not record:
      problems.append(f"parameters {where}/{names} are not owned by a flax module called in the forward pass")
    elif len(record) != 1:
      problems.append(f"module {where} is called {len(record)} times per forward pass (shared weights)")
    else:
      method, ok, same, leaf_module, module = record[0]
      if not leaf_module:
        problems.append(f"module {where} owns parameters {names} itself besides its submodules' (the per-layer "
                        "pass needs every parameter in a module without parameterized submodules)")
      elif not same:
        problems.append(f"module {where} does not receive its trained parameters unchanged")
      elif not ok:
        problems.append(f"module {where} is not called as module(x) -> y with the batch axis first "
                        f"(method {method!r})")
      else:
        layers.append(GhostLayer(path, module.clone(parent=None), type(module) is nn.Dense))
  if problems:
    return None, "; ".join(problems)
  return tuple(layers), ""


def _bound_path(module: nn.Module) -> tuple[str, ...] | None:
  """The module's path in the variables, or None for a module not bound to a scope (a helper method called from
  ``__post_init__``, or a module being constructed)."""
  return None if module.scope is None else tuple(module.path)


def _outermost_calls(on_call):
  """A flax method interceptor that hands the OUTERMOST method call of each bound module to ``on_call(path, call,
  args, kwargs, context)`` (``call()`` runs the method and returns its output); a module's calls of its own helper
  methods inside it, and calls on unbound modules, just run."""
  active: set = set()

  def interceptor(next_fun, args, kwargs, context):
    path = _bound_path(context.module)
    if path is None or path in active:
      return next_fun(*args, **kwargs)
    active.add(path)
    try:
      return on_call(path, lambda: next_fun(*args, **kwargs), args, kwargs, context)
    finally:
      active.discard(path)

  return interceptor


def _squared_norm(tree: PyTree) -> jax.Array:
  return sum(jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in jax.tree.leaves(tree))


def _dense_squared_norms(layer: GhostLayer, inputs: jax.Array, output_grads: jax.Array) -> jax.Array:
  """``||x_j^T dy_j||^2 + ||sum_t dy_jt||^2`` for every example ``j`` without forming ``x_j^T dy_j`` when
  ``T^2 <= D O`` (module docstring)."""
  batch_size = inputs.shape[0]
  x = inputs.reshape(batch_size, -1, inputs.shape[-1]).astype(jnp.float32)
  dy = output_grads.reshape(batch_size, -1, output_grads.shape[-1]).astype(jnp.float32)
  rows, d_in, d_out = x.shape[1], x.shape[2], dy.shape[2]
  if rows == 1:
    kernel = jnp.sum(jnp.square(x[:, 0]), axis=-1) * jnp.sum(jnp.square(dy[:, 0]), axis=-1)
  elif rows * rows <= d_in * d_out:
    kernel = jnp.sum(jnp.einsum("btd,bsd->bts", x, x) * jnp.einsum("bto,bso->bts", dy, dy), axis=(1, 2))
  else:
    kernel = jnp.sum(jnp.square(jnp.einsum("btd,bto->bdo", x, dy)), axis=(1, 2))
  bias = jnp.sum(jnp.square(jnp.sum(dy, axis=1)), axis=-1) if layer.module.use_bias else 0.0
  return kernel + bias


def _mapped_squared_norms(layer: GhostLayer, layer_params: PyTree, inputs: jax.Array, output_grads: jax.Array,
                          vectorized: bool) -> jax.Array:
  """Each example's squared gradient norm of one layer: the layer's ``vjp`` on a batch of one, mapped."""

  def one(x, dy):
    out, pullback = jax.vjp(lambda p: layer.apply(p, x[None]), layer_params)
    return _squared_norm(pullback(dy[None].astype(out.dtype))[0])

  if vectorized:
    return jax.vmap(one)(inputs, output_grads)
  return jax.lax.map(lambda xy: one(*xy), (inputs, output_grads))


def ghost_clipped_sum(model: Model, params: PyTree, batch: dict, mask: jax.Array, rng: jax.Array | None,
                      clip: jax.Array, layers: tuple[GhostLayer, ...], vectorized: bool
                      ) -> tuple[PyTree, dict]:
  """``(sum_j min(1, C / ||g_j||) g_j, metric sums)`` over the real examples of the batch, from one batched forward
  and backward pass (module docstring). ``layers`` come from :func:`ghost_layers` for the same model and shapes."""
  index = {layer.path: i for i, layer in enumerate(layers)}
  out_shapes: list[Any] = [None] * len(layers)

  def tapped(perturbations):
    inputs: list[Any] = [None] * len(layers)

    def on_call(path, call, args, kwargs, context):
      i = index.get(path)
      if i is None or context.method_name != "__call__":
        return call()
      inputs[i] = args[0]
      out = call()
      if perturbations is None:
        out_shapes[i] = jax.ShapeDtypeStruct(out.shape, out.dtype)
        return out
      return out + perturbations[i].astype(out.dtype)

    with nn.intercept_methods(_outermost_calls(on_call)):
      _, sums = masked_loss_and_metric_sums(model, params, batch, mask, rng, True)
    return sums["loss"], (inputs, sums)

  jax.eval_shape(lambda: tapped(None))
  zeros = [jnp.zeros(s.shape, jnp.float32) for s in out_shapes]
  output_grads, (inputs, sums) = jax.grad(tapped, has_aux=True)(zeros)

  squared = jnp.zeros(mask.shape[0], jnp.float32)
  for layer, x, dy in zip(layers, inputs, output_grads):
    if layer.dense:
      squared = squared + _dense_squared_norms(layer, x, dy)
    else:
      squared = squared + _mapped_squared_norms(layer, _subtree(params, layer.path), x, dy, vectorized)
  norms = jnp.sqrt(squared)
  factors = jnp.where(mask, jnp.minimum(1.0, clip / jnp.where(norms > 0, norms, 1.0)), 0.0)
  factors = jnp.where(jnp.isnan(norms), 1.0, factors)  # a NaN gradient stays NaN in the sum (the client is rejected)

  sums_by_layer = {}
  for layer, x, dy in zip(layers, inputs, output_grads):
    layer_params = _subtree(params, layer.path)
    out, pullback = jax.vjp(lambda p, x=x, layer=layer: layer.apply(p, x), layer_params)
    scaled = dy * factors.reshape((-1,) + (1,) * (dy.ndim - 1))
    sums_by_layer[layer.path] = pullback(scaled.astype(out.dtype))[0]

  def gradient_of(key_path, leaf):
    names = tuple(_key_name(k) for k in key_path)
    return sums_by_layer[names[:-1]][names[-1]].astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(gradient_of, params), sums

