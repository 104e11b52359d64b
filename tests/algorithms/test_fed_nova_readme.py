"""The README's FedNova -- a researcher's algorithm written from the public names alone -- equals a float64 NumPy
re-derivation (``reference_impl.fed_nova_round``) on ragged clients, over two rounds.

The code under test is the README's own block (its part before the training lines), so the example a reader copies
is the one checked here; ``tests/test_readme.py`` runs the whole block (training on the digits).
"""

from __future__ import annotations

import pathlib
import re

import jax
import numpy as np

from tests.algorithms import reference_impl as ref
from tests.algorithms.family_setup import CLIENT_LR, RTOL, assert_close_to_reference, make_setup, to_reference

README = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
TRAINING_PART = "\nfrom fedjax_lite import datasets, models"


def fed_nova_source() -> str:
  """The README's FedNova: its Python block holding ``def fed_nova``, up to the training lines."""
  block = next(block for block in re.findall(r"```python\n(.*?)```", README, flags=re.S) if "def fed_nova(" in block)
  assert TRAINING_PART in block, "the README's FedNova block must keep its training lines after the algorithm"
  return block.split(TRAINING_PART)[0]


def test_the_readme_fed_nova_uses_public_names_only_in_at_most_40_lines():
  source = fed_nova_source()
  assert len(source.rstrip().splitlines()) <= 40
  imports = [line for line in source.splitlines() if "import" in line.split("#")[0]]
  assert imports == ["import jax", "import jax.numpy as jnp", "import optax",
                     "from fedjax_lite import aggregators, algorithms, core"]


def test_the_readme_fed_nova_equals_numpy_on_ragged_clients():
  namespace = {}
  exec(compile(fed_nova_source(), "README.md", "exec"), namespace)
  _, model, params, rounds = make_setup()  # clients of 15, 12, 10, 7, 7, 3 examples: 1 to 4 local steps
  process = namespace["fed_nova"](model, client_learning_rate=CLIENT_LR)
  step = jax.jit(process.next)
  state = process.init(params)
  expected = to_reference(params)
  for r, round_data in enumerate(rounds):
    steps = [len(ref.real_steps(round_data, slot)) for slot in ref.client_slots(round_data)]
    assert len(set(steps)) > 1, steps  # ragged: the normalization matters
    fed_avg = ref.fed_avg_round(expected, round_data, client_learning_rate=CLIENT_LR, server=ref.ServerSGD(1.0),
                                weighting="num_examples")
    expected = ref.fed_nova_round(expected, round_data, client_learning_rate=CLIENT_LR)
    state, metrics, _ = step(state, round_data, jax.random.key(r))
    # The tolerance of the family's comparisons (family_setup.RTOL: ~170 float32 roundings of the parameters'
    # scale); FedNova adds two (the division by tau_i and the product with tau_eff).
    assert_close_to_reference(state.params, expected, what=f"round {r + 1} params")
    assert int(metrics["client_work"]["num_non_finite_clients"]) == 0
    # Not vacuous: FedNova's step differs from FedAvg's (same clients) by far more than the tolerance.
    gap = max(float(np.max(np.abs(expected[key] - fed_avg[key]))) for key in expected)
    assert gap > 1e2 * RTOL * max(float(np.max(np.abs(expected[key]))) for key in expected)
