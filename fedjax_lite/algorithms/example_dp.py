"""Example-level DP-SGD inside each client: per-example clipping and Gaussian noise at every local step.

Part 2 of the round (client work) with :func:`~fedjax_lite.algorithms.train_locally`'s ``example_dp=ExampleDp(
l2_clip=C, noise_multiplier=z)`` (``fed_avg(..., example_dp=...)``) replaces each local step's mean gradient by the
DP-SGD gradient of Abadi et al. 2016 ("Deep Learning with Differential Privacy", CCS, Algorithm 1)::

  g_j   = grad loss_j(w)                       for every example j of the step's batch
  g_j  <- g_j * min(1, C / ||g_j||_2)           (per-example clip; padding examples contribute 0)
  g     = (sum_j g_j + N(0, z^2 C^2 I)) / B     (B: the batch size, a public constant, not the real count)

and the client optimizer steps on ``g``. One batch's gradient changes by at most ``C`` (add/remove an example) or
``2C`` (replace one) in L2, so each step is a Gaussian mechanism of noise multiplier ``z`` on the client's examples.
No Python runs per example: by default one batched forward and backward pass gives every layer's per-example
gradient norm from its inputs and output gradients (a dense layer's without forming its per-example gradient) and
the clipped sum by book-keeping (:mod:`~fedjax_lite.algorithms.ghost_norms`; Li et al. 2022, Bu et al. 2023); for a
model it does not cover, the clipped sum is vectorized over the batch (``vmap``, on accelerators) or a
``lax.scan`` over its examples (on CPU), never keeping every example's gradient at once (``ExampleDp.per_example``;
the cost against a plain step is in ``benchmarks/README.md``). The noise of step
``t`` is drawn from ``fold_in(fold_in(client key, EXAMPLE_NOISE_STREAM), t)``; the model's own randomness
(dropout) uses the step's key as without DP (folded with the example's index on the per-example paths).

The guarantee is about ONE EXAMPLE of a client's data, whatever the server does: it composes with user-level DP on
the server (a DP aggregator clips and noises the whole client update), each stated for its own unit.
:func:`fedjax_lite.privacy.example_level_epsilon` accounts it from the local steps a client took part in
(``sampling``: ``'shuffled'``, the packing's epochs; ``'poisson'`` or ``'without_replacement'``, the amplified
guarantees of sampled batches). Models with non-trainable state (BatchNorm) are refused: batch statistics mix the
examples of a batch, so a per-example gradient is not defined. The loss and metrics the client reports are the
per-example forward passes' sums (as without DP); like every client metric they are not privatized.

Plain JAX: ``jax_privacy`` (the optional ``[dp_mf]`` extra) is not needed, so example-level DP works on every
supported Python without it.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from fedjax_lite.aggregators.robust import clip_to, global_norm
from fedjax_lite.algorithms.ghost_norms import ghost_clipped_sum, ghost_layers
from fedjax_lite.core import validation
from fedjax_lite.core.model import Model, masked_loss_and_metric_sums
from fedjax_lite.core.tree import PyTree
from fedjax_lite.privacy.mechanisms import gaussian_noise

PER_EXAMPLE = ("auto", "ghost", "vmap", "scan")
EXAMPLE_NOISE_STREAM = 0xE4A3  # step t's noise key is fold_in(fold_in(client key, EXAMPLE_NOISE_STREAM), t)


@flax.struct.dataclass
class ExampleDp:
  """Example-level DP-SGD inside each client (module docstring).

  Attributes:
    l2_clip: ``C > 0``, the clip of every example's gradient (global L2 norm over the parameters).
    noise_multiplier: ``z >= 0``: each step adds ``N(0, (z C)^2 I)`` to the sum of clipped gradients (0: clipping
      only, no guarantee).
    per_example: how the clipped sum is computed (same values): ``'ghost'`` (one batched forward and backward
      pass; each layer's per-example norms from its inputs and output gradients, a dense layer's without forming
      its per-example gradient, and the clipped sum by book-keeping: :mod:`fedjax_lite.algorithms.ghost_norms`,
      for flax models whose every parameter sits in a module called once), ``'vmap'`` (two vectorized passes:
      per-example gradient norms by ``vmap``, then one batched gradient of the clip-weighted losses), ``'scan'``
      (a ``lax.scan`` over the examples, adding each clipped gradient to a carried sum), or ``'auto'`` (default):
      ``'ghost'`` where the model allows it, else ``'scan'`` on CPU, where a ``vmap`` maps the convolutions' kernel
      gradients into grouped convolutions that XLA:CPU runs slowly, and ``'vmap'`` on GPU/TPU. With dropout,
      ``'ghost'`` draws the batch's randomness from the step's key as a non-private step does, and the
      per-example paths give each example its own key, so their values differ by the dropout draw.
  """

  l2_clip: float = flax.struct.field(pytree_node=False)
  noise_multiplier: float = flax.struct.field(pytree_node=False)
  per_example: str = flax.struct.field(pytree_node=False, default="auto")

  def __post_init__(self):
    validation.check_positive("l2_clip", self.l2_clip)
    validation.check_float("noise_multiplier", self.noise_multiplier, low=0.0)
    validation.check_choice("per_example", self.per_example, PER_EXAMPLE)


def check_example_dp(example_dp: ExampleDp | None, model: Model) -> None:
  """A clear error unless ``example_dp`` is None or an :class:`ExampleDp` for a model without state."""
  if example_dp is None:
    return
  if not isinstance(example_dp, ExampleDp):
    raise TypeError(f"example_dp must be an ExampleDp(l2_clip=..., noise_multiplier=...), got "
                    f"{type(example_dp).__name__}.")
  if model.state_collections:
    raise ValueError(f"example_dp needs a model without non-trainable state; {model.name!r} has "
                     f"{list(model.state_collections)} (batch statistics mix a batch's examples).")


def _example_loss(model: Model, rng: jax.Array):
  """``loss(params, example, example_mask, index) -> (loss, metric sums)`` of ONE example (a batch of one, its own
  key ``fold_in(rng, index)``)."""

  def loss(params, example, example_mask, index):
    single = jax.tree.map(lambda x: x[None], example)
    return masked_loss_and_metric_sums(model, params, single, example_mask[None], jax.random.fold_in(rng, index), True)

  return loss


def _scanned_clipped_sum(model, params, batch, mask, rng, clip):
  """``(sum_j clip(g_j), metric sums)``: a ``lax.scan`` over the examples, each clipped gradient added to the
  carried sum (no per-example gradient kept; the convolutions keep unmapped kernels, XLA:CPU's fast path)."""
  loss = _example_loss(model, rng)

  def add_example(carry, inputs):
    total, sums = carry
    example, example_mask, index = inputs
    grads, example_sums = jax.grad(loss, has_aux=True)(params, example, example_mask, index)
    clipped = clip_to(grads, global_norm(grads, 2.0), clip)  # a NaN/Inf gradient clips to 0; its loss stays NaN
    total = jax.tree.map(lambda t, g: t + jnp.where(example_mask, g, jnp.zeros_like(g)), total, clipped)
    return (total, jax.tree.map(jnp.add, sums, example_sums)), None

  first = jax.tree.map(lambda x: x[0], batch)
  sums_shape = jax.eval_shape(lambda: loss(params, first, mask[0], jnp.zeros((), jnp.int32))[1])
  initial = (jax.tree.map(jnp.zeros_like, params), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape))
  indices = jnp.arange(mask.shape[0], dtype=jnp.int32)
  return jax.lax.scan(add_example, initial, (batch, mask, indices))[0]


def _vectorized_clipped_sum(model, params, batch, mask, rng, clip):
  """``(sum_j clip(g_j), metric sums)`` in two vectorized passes: every example's gradient NORM (a ``vmap`` of
  ``grad`` reduced to one number per example), giving the factors ``s_j = min(1, C / ||g_j||)``; then ONE batched
  gradient of ``sum_j s_j loss_j`` (factors held constant), which is ``sum_j s_j g_j``. Both passes run each
  example through the same forward (same key), so the gradient scaled is the one measured."""
  loss = _example_loss(model, rng)
  indices = jnp.arange(mask.shape[0], dtype=jnp.int32)

  def gradient_norm(example, example_mask, index):
    return global_norm(jax.grad(loss, has_aux=True)(params, example, example_mask, index)[0], 2.0)

  norms = jax.vmap(gradient_norm)(batch, mask, indices)
  factors = jnp.where(mask, jnp.minimum(1.0, clip / jnp.where(norms > 0, norms, 1.0)), 0.0)
  factors = jax.lax.stop_gradient(jnp.where(jnp.isnan(norms), 1.0, factors))  # a NaN gradient stays NaN in the sum

  def clipped_loss_sum(p):
    losses, sums = jax.vmap(loss, in_axes=(None, 0, 0, 0))(p, batch, mask, indices)
    return jnp.sum(factors * losses), jax.tree.map(lambda s: jnp.sum(s, axis=0), sums)

  return jax.grad(clipped_loss_sum, has_aux=True)(params)


def private_gradient(model: Model, params: PyTree, batch: dict, mask: jax.Array, rng: jax.Array,
                     noise_rng: jax.Array, example_dp: ExampleDp) -> tuple[PyTree, dict]:
  """``(DP-SGD gradient of the batch, metric sums)`` (module docstring): each example's gradient clipped to
  ``example_dp.l2_clip``, summed, noised with ``N(0, (z C)^2)`` from ``noise_rng`` and divided by the batch size
  ``B`` (the batch axis' length). The clipped sum is computed as ``example_dp.per_example`` says (``'auto'``: the
  batched per-layer pass where the model allows it, else a scan over the examples on CPU and the vectorized two
  passes on accelerators)."""
  clip = jnp.asarray(example_dp.l2_clip, jnp.float32)
  on_accelerator = jax.default_backend() != "cpu"
  if example_dp.per_example in ("auto", "ghost"):
    layers, reason = ghost_layers(model, params, batch, mask, rng)
    if layers is None and example_dp.per_example == "ghost":
      raise ValueError(f"ExampleDp(per_example='ghost') does not apply to model {model.name!r}: {reason}. Use "
                       "per_example='auto' (falls back to per-example passes), 'scan' or 'vmap'.")
    if layers is not None:
      total, sums = ghost_clipped_sum(model, params, batch, mask, rng, clip, layers, vectorized=on_accelerator)
      return _noised_mean(total, sums, mask, noise_rng, example_dp)
  vectorized = example_dp.per_example == "vmap" or (example_dp.per_example == "auto" and on_accelerator)
  clipped_sum = _vectorized_clipped_sum if vectorized else _scanned_clipped_sum
  total, sums = clipped_sum(model, params, batch, mask, rng, clip)
  return _noised_mean(total, sums, mask, noise_rng, example_dp)


def _noised_mean(total, sums, mask, noise_rng, example_dp):
  if example_dp.noise_multiplier > 0:
    total = jax.tree.map(jnp.add, total,
                         gaussian_noise(noise_rng, total, example_dp.noise_multiplier * example_dp.l2_clip))
  gradient = jax.tree.map(lambda g: g / jnp.asarray(mask.shape[0], g.dtype), total)
  return gradient, sums
