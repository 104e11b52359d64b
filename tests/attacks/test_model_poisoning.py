"""Sign flip, scaling and Gaussian noise: exact on malicious slots, identity elsewhere, also on one ClientOutput."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lite.attacks import corrupt_client_output, gaussian_noise, inner_product_manipulation, scaling, sign_flip
from fedjax_lite.core.records import ClientOutput

UPDATES = {"w": np.arange(24, dtype=np.float32).reshape(4, 3, 2) - 10.0, "b": np.ones((4, 2), np.float32)}
MALICIOUS = np.array([False, True, False, True])
MASK = np.ones(4, bool)


def expected(transform):
  return {name: np.where(MALICIOUS.reshape((4,) + (1,) * (leaf.ndim - 1)), transform(leaf), leaf)
          for name, leaf in UPDATES.items()}


@pytest.mark.parametrize("attack,transform", [(sign_flip(), lambda u: -u), (sign_flip(3.0), lambda u: -3.0 * u),
                                              (scaling(10.0), lambda u: 10.0 * u), (scaling(-0.5), lambda u: -0.5 * u)])
def test_deterministic_attacks_are_exact(attack, transform):
  output = attack.apply(UPDATES, MALICIOUS, MASK, jax.random.key(0))
  for name, leaf in expected(transform).items():
    np.testing.assert_array_equal(output[name], leaf)  # one multiplication by an exact float: exact


def test_gaussian_noise_replaces_malicious_updates():
  attack = gaussian_noise(2.0)
  big = {"w": np.zeros((4, 5000), np.float32)}
  output = np.asarray(attack.apply(big, MALICIOUS, MASK, jax.random.key(0))["w"])
  np.testing.assert_array_equal(output[~MALICIOUS], 0.0)
  # 5000 draws of N(0, 4) per client: the sample mean has sd 2/sqrt(5000) = 0.028 and the sample sd has sd
  # about 2/sqrt(2 * 5000) = 0.02; allow 5 of each.
  for row in output[MALICIOUS]:
    assert abs(row.mean()) < 5 * 2 / np.sqrt(5000)
    assert abs(row.std() - 2.0) < 5 * 2 / np.sqrt(2 * 5000)
  assert not np.array_equal(output[1], output[3])  # independent keys per slot


def test_one_client_output():
  output = ClientOutput(update={"w": jnp.ones(3)}, weight=jnp.asarray(7.0), metrics={"loss": jnp.asarray(1.0)})
  attacked = corrupt_client_output(sign_flip(), output, True, jax.random.key(0))
  np.testing.assert_array_equal(attacked.update["w"], -np.ones(3))
  assert float(attacked.weight) == 7.0
  honest = corrupt_client_output(sign_flip(), output, False, jax.random.key(0))
  np.testing.assert_array_equal(honest.update["w"], np.ones(3))
  with pytest.raises(ValueError, match="honest clients' statistics"):
    corrupt_client_output(inner_product_manipulation(), output, True, jax.random.key(0))


def test_argument_checks():
  for make, bad in [(sign_flip, 0.0), (gaussian_noise, -1.0), (scaling, float("inf"))]:
    with pytest.raises(ValueError):
      make(bad)
  with pytest.raises(TypeError, match="UpdateAttack"):
    corrupt_client_output(lambda u, r: u, None, True, jax.random.key(0))
