"""Shared fixtures: a tiny classification population and models small enough to compile in about a second."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest

from fedjax_lite.core.federated_data import FederatedData
from fedjax_lite.models.adapter import from_flax



class TinyMLP(nn.Module):
  """8 features -> 16 hidden (tanh) -> 4 classes."""

  num_classes: int = 4

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(self.num_classes)(nn.tanh(nn.Dense(16)(x)))


def make_population(num_clients=6, seed=0, min_size=3, max_size=17, num_features=8, num_classes=4):
  rng = np.random.default_rng(seed)
  sizes = rng.integers(min_size, max_size + 1, num_clients)
  clients = {}
  for k, size in enumerate(sizes):
    x = rng.normal(size=(size, num_features)).astype(np.float32) + k * 0.1
    y = rng.integers(0, num_classes, size).astype(np.int32)
    clients[f"c{k:02d}"] = {"x": x, "y": y}
  return FederatedData.from_clients(clients)


@pytest.fixture(scope="session")
def population():
  return make_population()


@pytest.fixture(scope="session")
def tiny_model():
  return from_flax(TinyMLP(), np.zeros((1, 8), np.float32))


@pytest.fixture(scope="session")
def tiny_params(tiny_model):
  return tiny_model.init(jax.random.key(0))
