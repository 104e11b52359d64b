"""Local differential privacy: each client privatizes what it uploads, so the server never sees a raw value.

Three mechanisms, each with its per-client epsilon by ``dp_accounting``. Local DP compares ANY two inputs of one
client; for the additive mechanisms their outputs are two noise distributions whose centres are at most the
diameter ``2C`` of the clipped set apart, which is what dp_accounting's unit-sensitivity events describe with the
noise measured in units of ``2C`` (accounted with unit sensitivity, i.e. its ``ADD_OR_REMOVE_ONE`` convention):

* Gaussian on an L2-clipped value (Dwork & Roth 2014, §3.5.3): ``clip_C(x) + N(0, (z 2C)^2 I)``. Two clipped values
  are at most ``2C`` apart, so one release is ``GaussianDpEvent(z)``.
* Laplace on an L1-clipped value (Dwork & Roth 2014, §3.3): ``clip1_C(x) + Laplace(z 2C)`` per coordinate; two
  L1-clipped values are at most ``2C`` apart in L1, so one release is pure ``epsilon = 1 / z``
  (``LaplaceDpEvent(z)``).
* k-ary randomized response (Warner 1965; Kairouz, Bonawitz & Ramage 2016, "Discrete Distribution Estimation under
  Local Privacy", ICML): a category ``j`` of ``k`` is reported as itself with probability ``p_keep = e^eps /
  (e^eps + k - 1)`` and as each other category with ``p_other = 1 / (e^eps + k - 1)`` -- dp_accounting's
  ``RandomizedResponseDpEvent(noise_parameter = k / (e^eps + k - 1), k)`` (under its ``REPLACE_ONE`` relation). Over ``N`` clients with observed counts
  ``n_j``, ``(n_j - N p_other) / (p_keep - p_other)`` is the unbiased estimate of the true count of ``j``.
"""

from __future__ import annotations

import functools
import math

import dp_accounting
import jax
import jax.numpy as jnp
from dp_accounting import NeighboringRelation

from fedjax_lite.core import validation
from fedjax_lite.privacy.accounting import check_delta

LOCAL_MECHANISMS = ("gaussian", "laplace")


def local_dp_event(mechanism: str, noise_multiplier: float):
  """The event of ONE client's release, noise in units of the clipped set's diameter: ``GaussianDpEvent(z)`` or
  ``LaplaceDpEvent(z)`` (unit sensitivity; module docstring)."""
  validation.check_choice("mechanism", mechanism, LOCAL_MECHANISMS)
  validation.check_positive("noise_multiplier", noise_multiplier)
  if mechanism == "gaussian":
    return dp_accounting.GaussianDpEvent(float(noise_multiplier))
  return dp_accounting.LaplaceDpEvent(float(noise_multiplier))


@functools.lru_cache(maxsize=256)
def local_epsilon(mechanism: str, noise_multiplier: float, delta: float = 0.0) -> float:
  """Each client's epsilon (at ``delta``; Laplace's is pure, ``1 / z``) by dp_accounting's PLD accountant."""
  event = local_dp_event(mechanism, noise_multiplier)
  if mechanism == "laplace":
    validation.check_float("delta", delta, low=0.0, high=1.0, high_inclusive=False)
    return 1.0 / float(noise_multiplier)
  check_delta(delta)
  accountant = dp_accounting.pld.PLDAccountant(NeighboringRelation.ADD_OR_REMOVE_ONE,
                                               value_discretization_interval=1e-4)
  return float(accountant.compose(event).get_epsilon(delta))


def randomized_response_probabilities(epsilon: float, num_categories: int) -> tuple[float, float]:
  """``(p_keep, p_other)`` of k-ary randomized response at ``epsilon`` (module docstring)."""
  validation.check_positive("epsilon", epsilon)
  validation.check_int("num_categories", num_categories, minimum=2)
  denominator = math.exp(epsilon) + num_categories - 1
  return math.exp(epsilon) / denominator, 1.0 / denominator


def randomized_response_event(epsilon: float, num_categories: int):
  """dp_accounting's ``RandomizedResponseDpEvent`` of one report (``REPLACE_ONE``)."""
  validation.check_positive("epsilon", epsilon)
  validation.check_int("num_categories", num_categories, minimum=2)
  return dp_accounting.RandomizedResponseDpEvent(
      noise_parameter=num_categories / (math.exp(epsilon) + num_categories - 1), num_buckets=int(num_categories))


def randomized_response(rng: jax.Array, category: jax.Array, epsilon: float, num_categories: int) -> jax.Array:
  """ONE client's report of ``category`` (int in ``[0, k)``): itself with ``p_keep``, else one of the other ``k - 1``
  uniformly (int32)."""
  p_keep, _ = randomized_response_probabilities(epsilon, num_categories)
  keep_key, other_key = jax.random.split(rng)
  shift = jax.random.randint(other_key, (), 1, num_categories)  # uniform over the other k - 1 categories
  category = jnp.asarray(category, jnp.int32)
  return jnp.where(jax.random.uniform(keep_key) < p_keep, category, (category + shift) % num_categories)


def decode_randomized_response(observed_counts: jax.Array, num_reports: jax.Array, epsilon: float) -> jax.Array:
  """The unbiased estimate ``(n_j - N p_other) / (p_keep - p_other)`` of each category's true count (float32)."""
  observed_counts = jnp.asarray(observed_counts, jnp.float32)
  p_keep, p_other = randomized_response_probabilities(epsilon, observed_counts.shape[-1])
  return (observed_counts - jnp.asarray(num_reports, jnp.float32) * p_other) / (p_keep - p_other)
