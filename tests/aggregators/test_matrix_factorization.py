"""Matrix-factorization DP-FTRL: the identity reduces to the Gaussian mechanism bit for bit; the added noise has the
covariance the strategy promises; the epsilon is dp_accounting's for jax_privacy's event (and a brute-force
sensitivity); the plan function; arguments."""

from __future__ import annotations

import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import NeighboringRelation

from fedjax_lite import privacy
from fedjax_lite.aggregators import dp_matrix_factorization, gaussian_adaptive, gaussian_fixed, tree_aggregation
from fedjax_lite.privacy.accounting import PrivacyLedger, planned_epsilon

from tests.aggregators.helpers import brute_force_sensitivity, run_next

# A 2-buffer BLT of C, from jax_privacy's buffered_toeplitz.optimize(n=64) (single participation, max error).
BLT_PARAMETERS = ([0.9842298634927619, 0.7270931425682697], [0.1706081571013166, 0.3102560932438474])
BANDED = [0.75, 0.5, 0.3, 0.2]   # a 4-banded Toeplitz strategy (non-negative, non-increasing)


def _jax_privacy():
  return pytest.importorskip("jax_privacy", reason="the [dp_mf] extra (jax_privacy, Python >= 3.11)")


def _rounds(aggregator, rounds, values, weights, mask=None, seed=0):
  state = aggregator.init(jax.tree.map(lambda v: v[0], values))
  outputs = []
  for round_num in range(rounds):
    out = run_next(aggregator, state, values, weights, jax.random.fold_in(jax.random.key(seed), round_num), mask)
    outputs.append(out)
    state = out.state
  return outputs


def test_identity_is_the_gaussian_mechanism_bit_for_bit():
  """Fixed and adaptive clipping, 3 rounds, a padding slot: results, clips and measurements are identical."""
  values = {"w": jnp.array([[3.0, 4.0, 0.0], [0.0, 0.3, 0.4], [9.0, 9.0, 9.0]]), "b": jnp.array([1.0, -2.0, 5.0])}
  mask = jnp.array([True, True, False])
  for ours, theirs in (
      (dp_matrix_factorization(1.3, 4.0, "identity", num_rounds=3, clip=0.7), gaussian_fixed(1.3, 4.0, 0.7)),
      (dp_matrix_factorization(1.3, 40.0, "identity", num_rounds=3), gaussian_adaptive(1.3, 40.0))):
    for mine, reference in zip(_rounds(ours, 3, values, [1.0] * 3, mask), _rounds(theirs, 3, values, [1.0] * 3, mask)):
      jax.tree.map(np.testing.assert_array_equal, mine.result, reference.result)
      jax.tree.map(np.testing.assert_array_equal, mine.measurements, reference.measurements)
      assert mine.state["noise_state"] == ()
    assert ours.dp_event() == theirs.dp_event()


@pytest.mark.parametrize("strategy, options", [
    ("blt", {"blt_parameters": BLT_PARAMETERS}),
    ("banded", {"coefficients": BANDED, "min_separation": 4}),
    ("toeplitz", {}),
])
def test_added_noise_has_the_strategy_covariance(strategy, options):
  """Zero client values, clip 1, z = 1, m = 1: round t adds sigma (C^{-1} Z)_t with sigma = ||C||_col, so over the
  d = 20,000 independent coordinates the n x n empirical covariance estimates sigma^2 C^{-1} C^{-T}, with C
  materialized from the Toeplitz coefficients and inverted in float64 NumPy (independently of jax_privacy's
  streaming generator). Entry (i, j) has standard error sqrt((S_ii S_jj + S_ij^2) / d); every one of the 64
  entries is within 5 of them (a false alarm has probability < 64 x 6e-7), seed fixed."""
  _jax_privacy()
  n, d = 8, 20_000
  aggregator = dp_matrix_factorization(1.0, 1.0, strategy, num_rounds=n, clip=1.0, **options)
  mechanism = privacy.matrix_factorization(strategy, num_rounds=n, **options)
  values = {"w": jnp.zeros((2, d))}
  noise = np.stack([np.asarray(out.result["w"], np.float64) for out in _rounds(aggregator, n, values, [1.0, 1.0])])
  inverse = np.linalg.inv(mechanism.strategy_matrix(n))
  expected = mechanism.column_norm ** 2 * inverse @ inverse.T
  empirical = noise @ noise.T / d
  standard_error = np.sqrt((np.outer(np.diag(expected), np.diag(expected)) + expected ** 2) / d)
  assert np.all(np.abs(empirical - expected) <= 5 * standard_error), np.max(np.abs(empirical - expected)
                                                                            / standard_error)
  if strategy != "toeplitz":  # the correlation is real: some off-diagonal entry is far from 0
    assert np.max(np.abs(expected - np.diag(np.diag(expected))) / standard_error) > 20


def test_blt_state_is_its_buffers_and_streaming_equals_next():
  _jax_privacy()
  aggregator = dp_matrix_factorization(1.0, 2.0, "blt", num_rounds=8, clip=1.0, blt_parameters=BLT_PARAMETERS)
  state = aggregator.init({"w": jnp.zeros((3, 2)), "b": jnp.zeros(5)})
  assert state["noise_state"]["w"].shape == (2, 3, 2) and state["noise_state"]["b"].shape == (2, 5)


def test_blt_epsilon_is_dp_accountings_for_the_brute_force_sensitivity():
  """Deterministic participation every 3 rounds: epsilon after r rounds is dp_accounting's (RDP and PLD) for
  GaussianDpEvent(z ||C||_col / sens_r), sens_r found by enumerating every participation pattern in NumPy."""
  _jax_privacy()
  z, n, b, delta = 2.0, 8, 3, 1e-5
  mechanism = privacy.matrix_factorization("blt", num_rounds=n, blt_parameters=BLT_PARAMETERS)
  run = privacy.matrix_factorization_run_events(mechanism, z, min_separation=b)
  for accountant in ("rdp", {"name": "pld", "value_discretization_interval": 1e-4}):
    ledger = PrivacyLedger(run, delta, accountant)
    for rounds in (1, 4, 8):
      sensitivity = brute_force_sensitivity(mechanism.coefficients(rounds), rounds, b)
      event = dp_accounting.GaussianDpEvent(z * mechanism.column_norm / sensitivity)
      reference = (dp_accounting.rdp.RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_SPECIAL)
                   if accountant == "rdp" else dp_accounting.pld.PLDAccountant(
                       NeighboringRelation.REPLACE_SPECIAL, value_discretization_interval=1e-4))
      assert math.isclose(ledger.epsilon_after(rounds), reference.compose(event).get_epsilon(delta), rel_tol=1e-9)
      assert math.isclose(mechanism.sensitivity(rounds, b), sensitivity, rel_tol=1e-6)


def test_amplified_banded_epsilon_is_jax_privacys_event():
  """Poisson sampling q inside b cyclic groups: the ledger's epsilon is dp_accounting's on jax_privacy's
  amplified_bandmf_event (ceil(r / b) Poisson-sampled Gaussians)."""
  _jax_privacy()
  from jax_privacy.experimental.accounting import amplified_bandmf_event

  z, b, q, delta = 1.1, 4, 0.3, 1e-6
  mechanism = privacy.matrix_factorization("banded", num_rounds=40, min_separation=b, coefficients=BANDED)
  ledger = PrivacyLedger(privacy.matrix_factorization_run_events(mechanism, z, min_separation=b,
                                                                 sampling_probability=q), delta, "rdp")
  for rounds in (1, 5, 40):
    reference = dp_accounting.rdp.RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_SPECIAL)
    reference.compose(amplified_bandmf_event(z, rounds, num_bands=b, sampling_prob=q))
    assert ledger.epsilon_after(rounds) == reference.get_epsilon(delta)


def test_identity_every_round_accounts_as_the_gaussian_mechanism():
  z, delta = 1.5, 1e-5
  mechanism = privacy.matrix_factorization("identity", num_rounds=20)
  ledger = PrivacyLedger(privacy.matrix_factorization_run_events(mechanism, z, min_separation=1), delta)
  for rounds in (1, 7, 20):
    assert math.isclose(ledger.epsilon_after(rounds),
                        planned_epsilon(z, rounds=rounds, delta=delta, sampling="all"), rel_tol=1e-9)


def test_adaptive_clipping_merges_the_count_release():
  mechanism = privacy.matrix_factorization("identity", num_rounds=10)
  run = privacy.matrix_factorization_run_events(mechanism, 2.0, min_separation=5, clipped_count_stddev=1.5)
  # 10 rounds, 2 participations: value z / sqrt(2), count 2 sigma_b / sqrt(2), merged.
  expected = ((2.0 / math.sqrt(2)) ** -2 + (3.0 / math.sqrt(2)) ** -2) ** -0.5
  assert math.isclose(run.event_after(10).noise_multiplier, expected, rel_tol=1e-12)


def test_calibrated_noise_meets_the_target_and_is_smallest():
  _jax_privacy()
  mechanism = privacy.matrix_factorization("blt", num_rounds=20, blt_parameters=BLT_PARAMETERS)

  def make_run(z):
    return privacy.matrix_factorization_run_events(mechanism, z, min_separation=5)

  z = privacy.calibrate_run_noise(3.0, make_run, rounds=20, delta=1e-5, tolerance=1e-3)
  assert privacy.run_epsilon(make_run(z), 20, 1e-5) <= 3.0 < privacy.run_epsilon(make_run(z / 1.002), 20, 1e-5)


def test_tree_strategy_is_tree_aggregation():
  values = {"w": jnp.array([[3.0, 4.0], [0.3, 0.4]])}
  ours = _rounds(dp_matrix_factorization(1.0, 2.0, "tree", num_rounds=4, clip=1.0), 3, values, [1.0, 1.0])
  theirs = _rounds(tree_aggregation(1.0, 2.0, 1.0, rounds_per_tree=4), 3, values, [1.0, 1.0])
  for mine, reference in zip(ours, theirs):
    np.testing.assert_array_equal(mine.result["w"], reference.result["w"])


@pytest.mark.parametrize("build, error, match", [
    (lambda: dp_matrix_factorization(1.0, 2.0, "blt"), ValueError, "num_rounds is required"),
    (lambda: dp_matrix_factorization(1.0, 2.0, "svd", num_rounds=3), ValueError, "strategy must be one of"),
    (lambda: dp_matrix_factorization(-1.0, 2.0, "identity", num_rounds=3), ValueError, "noise_multiplier"),
    (lambda: dp_matrix_factorization(1.0, 2.0, "tree", num_rounds=3), ValueError, "fixed clip"),
    (lambda: privacy.matrix_factorization("identity", num_rounds=3, num_buffers=2), ValueError, "num_buffers"),
    (lambda: privacy.matrix_factorization_run_events(privacy.matrix_factorization("identity", num_rounds=3), 1.0,
                                                     min_separation=1, sampling_probability=0.5,
                                                     clipped_count_stddev=1.0), ValueError, "adaptive clipping"),
    (lambda: privacy.matrix_factorization_run_events("blt", 1.0, min_separation=1), TypeError, "MatrixFactorization"),
])
def test_bad_arguments(build, error, match):
  with pytest.raises(error, match=match):
    build()


def test_bad_blt_parameters():
  _jax_privacy()
  with pytest.raises(ValueError, match=r"buf_decay must lie in \[0, 1\]"):
    privacy.matrix_factorization("blt", num_rounds=4, blt_parameters=([1.5], [0.1]))
  with pytest.raises(ValueError, match="num_bands .* must be <= min_separation"):
    privacy.matrix_factorization("banded", num_rounds=8, min_separation=2, num_bands=4)
  with pytest.raises(ValueError, match="banded strategy"):
    privacy.matrix_factorization_run_events(privacy.matrix_factorization("toeplitz", num_rounds=8), 1.0,
                                            min_separation=2, sampling_probability=0.5)


def test_optimized_strategies_from_jax_privacy():
  """The default paths: BandMF's coefficients have unit norm (orthogonal columns: sens = sqrt(k)); an optimized BLT
  has non-increasing, non-negative coefficients, so its 4 participations' columns overlap non-negatively:
  sqrt(4) ||C||_col <= sens <= 4 ||C||_col."""
  _jax_privacy()
  banded = privacy.matrix_factorization("banded", num_rounds=16, min_separation=4, max_optimizer_steps=20)
  assert banded.num_bands == 4 and math.isclose(banded.column_norm, 1.0, rel_tol=1e-6)
  assert math.isclose(banded.sensitivity(16, 4), 2.0, rel_tol=1e-6)
  blt = privacy.matrix_factorization("blt", num_rounds=16, min_separation=4, num_buffers=1, max_optimizer_steps=10)
  coefficients = blt.coefficients(16)
  assert coefficients[0] == 1.0 and np.all(np.diff(coefficients) <= 0)
  assert 2.0 * blt.column_norm <= blt.sensitivity(16, 4) <= 4.0 * blt.column_norm
