"""The layers of fedjax_lite, bottom first: the one place that states which sub-package may import which.

A module of a sub-package imports from its own sub-package and from the sub-packages of LOWER layers only: never
from a higher layer, never from another sub-package of its own layer, and no chain of imports comes back to where
it started. ``tests/test_layers.py`` parses the imports of every module (``ast``) and checks them against
:data:`LAYERS`; the package docstring (``fedjax_lite.__doc__``) and the README's architecture table are checked
against it too. Adding a layer is one line here (and, once its package exists, a row in the README's table).
"""

from __future__ import annotations

LAYERS: tuple[tuple[str, ...], ...] = (
    ("core",),  # records, the process template, pytree math, argument checks, federated data, the client runner
    ("systems",),  # client systems (speeds, bandwidths, availability), the simulated clock, realistic rounds' plans
    ("privacy",),  # noise mechanisms and accounting; below the aggregators, whose DP ones draw their noise here
    ("aggregators",),  # (init, next) aggregators and their presets
    ("algorithms", "analytics", "attacks"),  # the round template and algorithms; federated statistics; attacks
    ("datasets", "models"),  # data loaders and generators; flax models
    ("training",),  # the training loop, checkpoints, trackers, the command line
)


def layer_of(package: str) -> int:
  """The index in :data:`LAYERS` (0 = bottom) of the sub-package ``package`` (e.g. ``'core'``).

  Raises:
    KeyError: ``package`` is in no layer.
  """
  for index, packages in enumerate(LAYERS):
    if package in packages:
      return index
  raise KeyError(f"fedjax_lite.{package} is in no layer of fedjax_lite.layers.LAYERS {LAYERS}: add it there.")


def describe() -> str:
  """The order on one line, bottom first: ``core -> privacy -> ... -> training``, ``/`` within a layer."""
  return " -> ".join("/".join(f"``{package}``" for package in packages) for packages in LAYERS)
