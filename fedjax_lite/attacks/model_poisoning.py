"""Attacks of a single Byzantine client on its own update: sign flip, scaling and Gaussian noise.

Each returns an :class:`~fedjax_lite.attacks.base.UpdateAttack` with a ``client_fn`` (``(update, rng) ->
update``), so it can corrupt one :class:`~fedjax_lite.core.records.ClientOutput` or the stacked updates of a round.
With ``u`` the client's honest update (the pseudo-gradient ``initial - final`` parameters):

* :func:`sign_flip`: ``u' = -scale * u`` (the "reversed gradient" attack, e.g. Damaskinos et al. 2018; Li et al.
  2019 "RSA"), which pushes the model uphill;
* :func:`scaling`: ``u' = factor * u`` (model replacement / boosting, Bagdasaryan et al. 2020 "How To Backdoor
  Federated Learning", Bhagoji et al. 2019), which lets one client dominate a mean;
* :func:`gaussian_noise`: ``u' ~ N(0, stddev^2 I)``, independent of ``u`` (the Gaussian Byzantine worker of
  Blanchard et al. 2017's experiments).
"""

from __future__ import annotations

import jax

from fedjax_lite.attacks.base import UpdateAttack, per_client_attack
from fedjax_lite.core import validation
from fedjax_lite.privacy.mechanisms import gaussian_noise as _gaussian_noise


def sign_flip(scale: float = 1.0) -> UpdateAttack:
  """``u' = -scale * u``: the client sends its update reversed (and optionally amplified).

  Args:
    scale: ``> 0``; 1 reverses the update, larger values also amplify it.

  Example: the second of two clients is malicious.

  >>> import jax, jax.numpy as jnp
  >>> updates = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0]])}
  >>> malicious, real = jnp.array([False, True]), jnp.array([True, True])
  >>> sign_flip().apply(updates, malicious, real, jax.random.key(0))["w"].tolist()
  [[1.0, 2.0], [-3.0, -4.0]]
  """
  scale = validation.check_positive("scale", scale)
  return per_client_attack("sign flip", lambda update, rng: jax.tree.map(lambda u: -scale * u, update))


def scaling(factor: float) -> UpdateAttack:
  """``u' = factor * u``: the client boosts its update (model replacement when ``factor`` ~ the cohort size).

  Args:
    factor: any finite number; e.g. 10 to outweigh nine honest clients in an unweighted mean.
  """
  factor = validation.check_float("factor", factor)
  return per_client_attack("scaling", lambda update, rng: jax.tree.map(lambda u: factor * u, update))


def gaussian_noise(stddev: float) -> UpdateAttack:
  """``u' ~ N(0, stddev^2 I)``: the client sends random noise instead of its update.

  Args:
    stddev: ``> 0``, the noise's standard deviation per coordinate.
  """
  stddev = validation.check_positive("stddev", stddev)
  return per_client_attack("gaussian noise", lambda update, rng: _gaussian_noise(rng, update, stddev))
