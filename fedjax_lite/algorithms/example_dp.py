"""Example-level DP-SGD inside each client: per-example clipping and Gaussian noise at every local step.

Part 2 of the round (client work) with :func:`~fedjax_lite.algorithms.train_locally`'s ``example_dp=ExampleDp(
l2_clip=C, noise_multiplier=z)`` (``fed_avg(..., example_dp=...)``) replaces each local step's mean gradient by the
DP-SGD gradient of Abadi et al. 2016 ("Deep Learning with Differential Privacy", CCS, Algorithm 1)::

  g_j   = grad loss_j(w)                       for every example j of the step's batch (a scan over the examples)
  g_j  <- g_j * min(1, C / ||g_j||_2)           (per-example clip; padding examples contribute 0)
  g     = (sum_j g_j + N(0, z^2 C^2 I)) / B     (B: the batch size, a public constant, not the real count)

and the client optimizer steps on ``g``. One batch's gradient changes by at most ``C`` (add/remove an example) or
``2C`` (replace one) in L2, so each step is a Gaussian mechanism of noise multiplier ``z`` on the client's examples.
The examples of a batch are one ``lax.scan`` inside the step (no Python loop; :func:`private_gradient`), each
clipped gradient added to a carried sum, so a private step costs a small multiple of a plain one
(``benchmarks/example_dp.py``). The noise of step ``t`` is drawn from
``fold_in(fold_in(client key, EXAMPLE_NOISE_STREAM), t)``; the model's own randomness (dropout) uses the step's key
as without DP, folded with the example's index.

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
from fedjax_lite.core import validation
from fedjax_lite.core.model import Model, masked_loss_and_metric_sums
from fedjax_lite.core.tree import PyTree
from fedjax_lite.privacy.mechanisms import gaussian_noise

EXAMPLE_NOISE_STREAM = 0xE4A3  # step t's noise key is fold_in(fold_in(client key, EXAMPLE_NOISE_STREAM), t)


@flax.struct.dataclass
class ExampleDp:
  """Example-level DP-SGD inside each client (module docstring).

  Attributes:
    l2_clip: ``C > 0``, the clip of every example's gradient (global L2 norm over the parameters).
    noise_multiplier: ``z >= 0``: each step adds ``N(0, (z C)^2 I)`` to the sum of clipped gradients (0: clipping
      only, no guarantee).
  """

  l2_clip: float = flax.struct.field(pytree_node=False)
  noise_multiplier: float = flax.struct.field(pytree_node=False)

  def __post_init__(self):
    validation.check_positive("l2_clip", self.l2_clip)
    validation.check_float("noise_multiplier", self.noise_multiplier, low=0.0)


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


def private_gradient(model: Model, params: PyTree, batch: dict, mask: jax.Array, rng: jax.Array,
                     noise_rng: jax.Array, example_dp: ExampleDp) -> tuple[PyTree, dict]:
  """``(DP-SGD gradient of the batch, metric sums)`` (module docstring): each example's gradient clipped to
  ``example_dp.l2_clip``, summed, noised with ``N(0, (z C)^2)`` from ``noise_rng`` and divided by the batch size
  ``B`` (the batch axis' length).

  The examples are a ``lax.scan``: each step computes one example's gradient (a batch of one, its own key
  ``fold_in(rng, j)``), clips it and adds it to the carried sum, so no per-example gradient is kept and the
  convolutions stay the plain step's (unmapped kernels: XLA:CPU's fast path; a ``vmap`` over the examples maps the
  kernel gradients into grouped convolutions, measured 3.5x slower than this scan for the FedAvg CNN).
  """
  batch_size = mask.shape[0]
  clip = jnp.asarray(example_dp.l2_clip, jnp.float32)

  def add_example(carry, inputs):
    total, sums = carry
    example, example_mask, index = inputs
    single = jax.tree.map(lambda x: x[None], example)

    def loss(p):
      return masked_loss_and_metric_sums(model, p, single, example_mask[None], jax.random.fold_in(rng, index), True)

    grads, example_sums = jax.grad(loss, has_aux=True)(params)
    clipped = clip_to(grads, global_norm(grads, 2.0), clip)  # a NaN/Inf gradient clips to 0; its loss stays NaN
    total = jax.tree.map(lambda t, g: t + jnp.where(example_mask, g, jnp.zeros_like(g)), total, clipped)
    return (total, jax.tree.map(jnp.add, sums, example_sums)), None

  zero_sums = jax.eval_shape(lambda: masked_loss_and_metric_sums(
      model, params, jax.tree.map(lambda x: x[:1], batch), mask[:1], rng, True)[1])
  initial = (jax.tree.map(jnp.zeros_like, params), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_sums))
  (total, sums), _ = jax.lax.scan(add_example, initial, (batch, mask, jnp.arange(batch_size, dtype=jnp.int32)))
  if example_dp.noise_multiplier > 0:
    total = jax.tree.map(jnp.add, total,
                         gaussian_noise(noise_rng, total, example_dp.noise_multiplier * example_dp.l2_clip))
  gradient = jax.tree.map(lambda g: g / jnp.asarray(batch_size, g.dtype), total)
  return gradient, sums
