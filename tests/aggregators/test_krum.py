"""Krum and multi-Krum against a NumPy re-implementation of Blanchard et al. 2017 (exact selection)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lite.aggregators import krum, multi_krum
from tests.aggregators.helpers import one_client, run_next


def numpy_krum_selection(flat: np.ndarray, num_byzantine: int, num_selected: int,
                         num_neighbours: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Slots (in order of score, ties to the lower slot) of the ``num_selected`` best Krum scores, in float64."""
  n = flat.shape[0]
  num_neighbours = n - num_byzantine - 2 if num_neighbours is None else num_neighbours
  distances = ((flat[:, None, :] - flat[None, :, :]) ** 2).sum(-1)
  scores = np.array([np.sort(np.delete(distances[i], i))[:num_neighbours].sum() for i in range(n)])
  return np.argsort(scores, kind="stable")[:num_selected], scores


def make_values(rng: np.random.Generator, num_clients: int) -> dict:
  return {"w": rng.normal(size=(num_clients, 3, 2)).astype(np.float32),
          "b": rng.normal(size=(num_clients, 4)).astype(np.float32)}


def flatten(values: dict) -> np.ndarray:
  return np.concatenate([values["b"].reshape(len(values["b"]), -1), values["w"].reshape(len(values["w"]), -1)], 1)


def check_well_separated(scores: np.ndarray, num_selected: int) -> None:
  # Exact selection is only well defined when float32 rounding cannot swap the ranks: the score gap between the
  # last selected and the first rejected must dwarf float32's relative error (~1e-6 x terms).
  ordered = np.sort(scores)
  if num_selected < len(scores):
    assert ordered[num_selected] - ordered[num_selected - 1] > 1e-4 * ordered[num_selected]


@pytest.mark.parametrize("num_byzantine,num_selected", [(0, 1), (2, 1), (2, None), (1, 3)])
def test_matches_numpy_selection(num_byzantine, num_selected):
  rng = np.random.default_rng(num_byzantine * 10 + (num_selected or 0))
  values = make_values(rng, 9)
  values["w"][:num_byzantine] += 20.0  # Byzantine clients far away
  selected_count = 9 - num_byzantine if num_selected is None else num_selected
  expected_slots, scores = numpy_krum_selection(flatten(values).astype(np.float64), num_byzantine, selected_count)
  check_well_separated(scores, selected_count)
  aggregator = (krum(num_byzantine) if num_selected == 1 else multi_krum(num_byzantine, num_selected))
  output = run_next(aggregator, aggregator.init(one_client(values)), values, np.ones(9), jax.random.key(0))
  for name in values:
    expected = values[name][expected_slots].astype(np.float64).mean(axis=0)
    # A mean of m float32 values: relative error at most about m ulps.
    np.testing.assert_allclose(output.result[name], expected, rtol=selected_count * 2 ** -23, atol=1e-6)
  assert int(output.measurements["num_selected"]) == selected_count
  assert int(output.measurements["num_real_clients"]) == 9
  assert not set(expected_slots.tolist()) & set(range(num_byzantine))


def test_krum_returns_the_selected_value_bit_for_bit():
  values = make_values(np.random.default_rng(3), 7)
  expected_slot = numpy_krum_selection(flatten(values).astype(np.float64), 1, 1)[0][0]
  aggregator = krum(1)
  output = run_next(aggregator, aggregator.init(one_client(values)), values, np.ones(7), jax.random.key(0))
  for name in values:
    np.testing.assert_array_equal(output.result[name], values[name][expected_slot])


def test_ties_go_to_the_lower_slot():
  # Four identical values and one outlier: every copy scores 0; Krum takes slot 1, the first copy.
  values = {"x": np.array([[5.0], [1.0], [1.0], [1.0], [1.0]], np.float32)}
  output = run_next(krum(1), (), values, np.ones(5), jax.random.key(0))
  np.testing.assert_array_equal(output.result["x"], [1.0])


def test_padding_is_never_selected_nor_counted():
  rng = np.random.default_rng(5)
  real = make_values(rng, 7)
  # Padding slots hold values that would win (all equal, zero distance) and would be neighbours if counted.
  padded = {name: np.concatenate([np.zeros((4,) + leaf.shape[1:], np.float32), leaf]) for name, leaf in real.items()}
  mask = np.array([False] * 4 + [True] * 7)
  for aggregator, count in [(krum(2), 1), (multi_krum(2), 5)]:
    expected = run_next(aggregator, (), real, np.ones(7), jax.random.key(0))
    output = run_next(aggregator, (), padded, np.ones(11), jax.random.key(0), mask)
    for name in real:
      np.testing.assert_array_equal(output.result[name], expected.result[name])
    assert int(output.measurements["num_selected"]) == count
    assert int(output.measurements["num_real_clients"]) == 7


def test_f_bounds():
  values = make_values(np.random.default_rng(0), 6)
  # 6 slots cannot satisfy n >= 2f + 3 for f = 2: a trace-time error naming the requirement.
  with pytest.raises(ValueError, match="n > 2f \\+ 2"):
    run_next(krum(2), (), values, np.ones(6), jax.random.key(0))
  # f = 1 needs 5 real clients: 5 real give a finite result, 4 real (one padding slot) give NaN.
  mask = np.array([True] * 5 + [False])
  output = run_next(multi_krum(1), (), values, np.ones(6), jax.random.key(0), mask)
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(output.result))
  mask[4] = False
  output = run_next(multi_krum(1), (), values, np.ones(6), jax.random.key(0), mask)
  assert all(np.isnan(leaf).all() for leaf in jax.tree.leaves(output.result))
  assert int(output.measurements["num_selected"]) == 0
  for bad, error in [(-1, ValueError), (1.5, TypeError), (True, TypeError)]:
    with pytest.raises(error, match="num_byzantine"):
      krum(bad)
  with pytest.raises(ValueError, match="num_selected"):
    multi_krum(1, 0)


def test_non_finite_client_is_ordered_last():
  values = make_values(np.random.default_rng(7), 7)
  values["b"][2, 1] = np.nan
  values["w"][4, 0, 0] = np.inf
  finite = [0, 1, 3, 5, 6]
  output = run_next(multi_krum(1, 4), (), values, np.ones(7), jax.random.key(0))
  # The non-finite clients are at distance +Inf, so they are never anyone's neighbours; with n = 7 and f = 1 each
  # finite client sums its 4 nearest, and it has exactly 4 finite others.
  expected_slots, scores = numpy_krum_selection(
      flatten({k: v[finite] for k, v in values.items()}).astype(np.float64), 1, 4, num_neighbours=4)
  check_well_separated(scores, 4)
  for name in values:
    np.testing.assert_allclose(output.result[name], values[name][finite][expected_slots].mean(0), rtol=4 * 2 ** -23,
                               atol=1e-6)
  # Asked for all 7, the NaN client is included and the result says so.
  output = run_next(multi_krum(1, 7), (), values, np.ones(7), jax.random.key(0))
  assert np.isnan(output.result["b"]).any()


def test_rejects_integer_values_and_bad_mask():
  with pytest.raises(TypeError, match="floating-point"):
    krum(0).init({"x": jnp.zeros((2,), jnp.int32)})
  values = make_values(np.random.default_rng(0), 5)
  with pytest.raises(ValueError, match="client_mask must have shape"):
    run_next(krum(0), (), values, np.ones(5), jax.random.key(0), np.ones(4, bool))


def test_upload_bits_is_the_raw_value():
  assert krum(0).upload_bits({"x": jax.ShapeDtypeStruct((3, 2), jnp.float32)}) == 6 * 32
