"""Local differential privacy as an aggregator wrapper: every client clips and noises its own value before upload.

In the client part of the round, ONE client (with its own key) releases

* ``'gaussian'``: ``clip_C(x) + N(0, (z 2C)^2 I)`` (L2 clip), or
* ``'laplace'``: ``clip1_C(x) + Laplace(z 2C)`` per coordinate (L1 clip),

and the inner aggregator (default :func:`~fedjax_lite.aggregators.unweighted_mean`) aggregates the privatized
values: the server, and anyone who sees an upload, only ever sees a privatized value. Each client's guarantee is
``fedjax_lite.privacy.local_epsilon(mechanism, z, delta)`` (any two values of that client; see
``fedjax_lite.privacy.local``), reported every round as the measurement ``local_epsilon``. A client whose value is
NaN or Inf uploads pure noise (its clipped value is zeroed, as :func:`~fedjax_lite.aggregators.clipping` does).

Measurements ``{'local_dp': <inner measurements>, 'local_epsilon': epsilon}``; state is the inner aggregator's.
The upload is the noised value at its dtype's width (noise cannot be compressed away); a compression wrapper
inside it (``inner=``) quantizes the noised value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_lite.aggregators.base import Aggregator, check_aggregator
from fedjax_lite.aggregators.mean import unweighted_mean
from fedjax_lite.aggregators.robust import clip_to, global_norm
from fedjax_lite.aggregators.wrapping import Inner, wrapper
from fedjax_lite.core import validation
from fedjax_lite.core.process import MeasuredOutput
from fedjax_lite.privacy.local import LOCAL_MECHANISMS, local_epsilon
from fedjax_lite.privacy.mechanisms import gaussian_noise, laplace_noise

from fedjax_lite.core.tree import PyTree


def local_dp(mechanism: str, *, clip: float, noise_multiplier: float, delta: float = 0.0,
             inner: Aggregator | None = None) -> Aggregator:
  """Local DP on each client's upload (module docstring).

  Args:
    mechanism: ``'gaussian'`` (L2 clip, needs ``delta > 0``) or ``'laplace'`` (L1 clip, pure DP).
    clip: ``C > 0``, the clip of each client's value (L2 or L1).
    noise_multiplier: ``z > 0``: noise of standard deviation (Gaussian) or scale (Laplace) ``z * 2C``.
    delta: the per-client delta the reported epsilon is stated at (Gaussian: in (0, 1); Laplace: ignored, 0).
    inner: the aggregator of the privatized values (default ``unweighted_mean()``).

  Example::

    aggregator = aggregators.local_dp("gaussian", clip=1.0, noise_multiplier=2.0, delta=1e-5)
  """
  validation.check_choice("mechanism", mechanism, LOCAL_MECHANISMS)
  clip = validation.check_positive("clip", clip)
  noise_multiplier = validation.check_positive("noise_multiplier", noise_multiplier)
  if mechanism == "gaussian" and not 0 < delta < 1:
    raise ValueError(f"delta must be in (0, 1) for the Gaussian mechanism (its epsilon is stated at a delta), got "
                     f"{delta}.")
  epsilon = local_epsilon(mechanism, noise_multiplier, float(delta) if mechanism == "gaussian" else 0.0)
  inner = Inner(check_aggregator(unweighted_mean() if inner is None else inner, "inner"))
  order = 2.0 if mechanism == "gaussian" else 1.0
  draw = gaussian_noise if mechanism == "gaussian" else laplace_noise
  scale = noise_multiplier * 2.0 * clip

  def client(client_params, value, weight, rng):
    noise_key, inner_key = jax.random.split(rng)
    clipped = clip_to(value, global_norm(value, order), jnp.asarray(clip, jnp.float32))
    private = jax.tree.map(jnp.add, clipped, draw(noise_key, clipped, scale))
    return inner.client(client_params, private, weight, inner_key)

  def server(state, combined, rng, context):
    out = inner.server(state, combined, rng, context)
    return MeasuredOutput(out.state, out.result, {"local_dp": out.measurements,
                                                  "local_epsilon": jnp.asarray(epsilon, jnp.float32)})

  return wrapper(inner, client, server)
