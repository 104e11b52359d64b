"""Matrix-factorization mechanisms for DP-FTRL: the strategy, its noise generator, and its privacy events.

DP-FTRL with matrix-factorization noise (Denisov et al. 2022, arXiv:2202.08312; Choquette-Choo et al. 2023,
"(Amplified) Banded Matrix Factorization", arXiv:2306.08153; Dvijotham et al. 2024, "Efficient and Near-Optimal
Noise Generation for Streaming Differential Privacy", arXiv:2404.16706; McMahan et al. 2024, "Don't use tree
aggregation, use BLTs", arXiv:2408.08868) factors the prefix-sum workload ``A = B C`` with a lower-triangular
STRATEGY ``C`` and releases, in round ``t`` (the "noising" form that a server optimizer consumes)::

  x_hat_t = s_t + sigma * (C^{-1} Z)_t,     Z_t ~ N(0, I) independent per round,

where ``s_t`` is the round's sum of clipped client values. The whole run is then ONE Gaussian mechanism on
``C s`` (post-processing: ``x_hat = C^{-1}(C s + sigma Z)``), whose L2 sensitivity under a participation pattern
is ``clip * sens(C)`` with ``sens(C)^2`` the largest squared norm of a sum of the columns one client can touch.

This module builds the strategies -- all lower-triangular Toeplitz, given by their coefficients ``c_0 = 1, c_1,
...`` -- on DeepMind's ``jax_privacy`` (an optional dependency: ``pip install 'fedjax_lite[dp_mf]'``, Python
>= 3.11), never re-implementing its factorizations, sensitivities or noise generators:

* ``'blt'``: a buffered linear Toeplitz strategy (``jax_privacy.matrix_factorization.buffered_toeplitz``), either
  optimized for the run's horizon and participation (``buffered_toeplitz.optimize``; a one-time planning cost of
  seconds to minutes on a CPU) or given by its parameters. Its noise generator keeps ``num_buffers`` buffers the
  size of the model (Alg. 3 of arXiv:2408.08868).
* ``'banded'``: BandMF -- a ``num_bands``-banded Toeplitz strategy with unit column norm
  (``toeplitz.optimize_banded_toeplitz``; McKenna 2024, arXiv:2405.15913); the generator keeps ``num_bands - 1``
  past noise vectors. With ``b``-min-separated participation and ``num_bands <= b`` the columns a client touches
  are orthogonal, and Poisson sampling within each cyclic group amplifies it (arXiv:2306.08153, Thm. 4).
* ``'toeplitz'``: the optimal max-error Toeplitz strategy for single participation, coefficients of
  ``1/sqrt(1 - x)`` (Fichtenberger, Henzinger & Upadhyay 2023), truncated to ``num_bands`` coefficients when given;
  the generator keeps ``len(coefficients) - 1`` past noise vectors.
* ``'identity'``: ``C = I``, independent noise every round: the Gaussian mechanism (needs no ``jax_privacy``).

(Tree aggregation, the fifth strategy of :func:`fedjax_lite.aggregators.dp_matrix_factorization`, is
:func:`fedjax_lite.aggregators.tree_aggregation` with :func:`fedjax_lite.privacy.tree_run_events`.)

**Noise scale.** ``sigma = z * clip * ||C||_col`` where ``||C||_col`` is the largest column norm of the planned
``num_rounds x num_rounds`` strategy (the sensitivity of one participation; 1 for identity and banded). So ``z`` is
the noise multiplier of ONE participation, exactly as jax_privacy's BandMF plan states it.

**Accounting** (:func:`matrix_factorization_run_events`). The released rounds ``0..r-1`` are the mechanism of the
leading ``r x r`` block of ``C`` (lower-triangular), so the epsilon after ``r`` rounds is that of

* deterministic ``b``-min-separated participation, at most ``k`` times (``core.CyclicSampler`` with ``q = 1``):
  ``GaussianDpEvent(z ||C||_col / sens_r(C))`` with ``sens_r(C)^2 = toeplitz.minsep_sensitivity_squared(c[:r], b,
  k)`` (jax_privacy; arXiv:2405.13763 Thm. 2, for non-negative non-increasing coefficients);
* Poisson sampling with probability ``q`` inside ``b`` cyclic groups (``core.CyclicSampler`` with ``q < 1``), banded
  strategies with ``num_bands <= b`` only: jax_privacy's ``amplified_bandmf_event(z, r, num_bands=b,
  sampling_prob=q)`` (``ceil(r / b)`` Poisson-sampled Gaussians).

Both under dp_accounting's ``REPLACE_SPECIAL`` ("zero-out") adjacency, as jax_privacy's BandMF plan: a client's
data is replaced by a contribution of zero, which leaves the fixed groups -- and so the participation pattern --
unchanged. Adaptive clipping (Andrew et al. 2021) adds a clipped-count release with independent noise
``N(0, sigma_b^2)`` every round; a client's ``k`` count releases compose as ``GaussianDpEvent(2 sigma_b / sqrt(k))``,
merged with the value's Gaussian (:func:`fedjax_lite.privacy.merge_gaussians`). That holds for deterministic
participation; the amplification theorem covers the value release alone, so adaptive clipping with ``q < 1`` is
refused.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

import dp_accounting
import numpy as np
from dp_accounting import NeighboringRelation

from fedjax_lite.core import validation
from fedjax_lite.privacy.accounting import AccountantSpec, RunEvents, check_accountant, check_delta, run_epsilon

from fedjax_lite.core.tree import PyTree
STRATEGIES = ("blt", "banded", "toeplitz", "identity")
ERRORS = ("max", "mean")

INSTALL_HINT = ("matrix-factorization DP-FTRL needs jax_privacy (Python >= 3.11): pip install 'fedjax_lite[dp_mf]' "
                "(or pip install 'jax-privacy>=2.0').")


def import_jax_privacy():
  """``jax_privacy``, imported on first use; a clear error naming the extra when it is missing."""
  try:
    import jax_privacy  # noqa: F401
    from jax_privacy.matrix_factorization import buffered_toeplitz, sensitivity, toeplitz  # noqa: F401
  except ImportError as error:
    raise ImportError(f"{INSTALL_HINT} ({error})") from None
  return jax_privacy


class NoiseGenerator(NamedTuple):
  """The streaming product with ``C^{-1}`` on pytrees (jax_privacy's ``StreamingMatrix`` protocol).

  Attributes:
    init: ``init(zeros shaped like one value) -> state`` (e.g. BLT's buffers).
    next: ``next(unit_noise, state) -> (row t of C^{-1} Z, state)``, where ``unit_noise`` is ``Z_t``.
  """

  init: Callable[[PyTree], PyTree]
  next: Callable[[PyTree, PyTree], tuple[PyTree, PyTree]]


def _identity_generator() -> NoiseGenerator:
  return NoiseGenerator(init=lambda template: (), next=lambda unit, state: (unit, state))


@dataclasses.dataclass(frozen=True, eq=False)
class MatrixFactorization:
  """A lower-triangular Toeplitz strategy ``C`` and its noise generator; build it with :func:`matrix_factorization`.

  Attributes:
    name: one of :data:`STRATEGIES`.
    num_rounds: ``n``, the horizon the strategy was planned for (its column norm is taken over ``n`` rows).
    coefficients: ``n -> float64 [n]``, the first ``n`` Toeplitz coefficients of ``C`` (``c_0 = 1`` up to scale).
    generator: the :class:`NoiseGenerator` of ``C^{-1}`` (float32 state).
    num_bands: ``b`` when ``C`` is ``b``-banded (only ``c_0 .. c_{b-1}`` non-zero), else None.
    parameters: what defines it (e.g. BLT's ``buf_decay`` and ``output_scale``), for messages and checkpoints.
  """

  name: str
  num_rounds: int
  coefficients: Callable[[int], np.ndarray]
  generator: NoiseGenerator
  num_bands: int | None = None
  parameters: tuple = ()

  @functools.cached_property
  def column_norm(self) -> float:
    """``||C||_col``: the largest column norm of the planned ``n x n`` strategy (column 0's, for Toeplitz)."""
    return float(np.linalg.norm(self.coefficients(self.num_rounds)))

  def strategy_matrix(self, n: int) -> np.ndarray:
    """``C`` materialized, float64 ``[n, n]`` (for checks and plots)."""
    coefficients = self.coefficients(n)
    index = np.arange(n)
    lag = index[:, None] - index[None, :]
    return np.where(lag >= 0, coefficients[np.clip(lag, 0, n - 1)], 0.0)

  def sensitivity(self, rounds: int, min_separation: int, max_participations: int | None = None) -> float:
    """``sens_r(C)``: the L2 sensitivity of the first ``rounds`` rounds at unit clip, for a client taking part at
    most ``max_participations`` times (None: as often as the separation allows), ``min_separation`` rounds apart.

    jax_privacy's ``toeplitz.minsep_sensitivity_squared`` (exact for non-negative, non-increasing coefficients);
    the identity's is ``sqrt(k)`` without jax_privacy.
    """
    validation.check_int("rounds", rounds, minimum=1)
    validation.check_int("min_separation", min_separation, minimum=1)
    validation.check_int("max_participations", max_participations, minimum=1, allow_none=True)
    participations = -(-int(rounds) // int(min_separation))
    if max_participations is not None:
      participations = min(participations, int(max_participations))
    if self.name == "identity":
      return math.sqrt(participations)
    import_jax_privacy()
    import jax
    from jax_privacy.matrix_factorization import toeplitz

    coefficients = self.coefficients(rounds)
    with jax.enable_x64(True):
      squared = toeplitz.minsep_sensitivity_squared(np.asarray(coefficients, np.float64), int(min_separation),
                                                    max_participations, n=int(rounds))
    return float(math.sqrt(float(squared)))


def _float32_exact(values) -> np.ndarray:
  """Parameters rounded to float32 (what the noise generator runs with), held as float64 for the accounting."""
  return np.asarray(np.asarray(values, np.float64).astype(np.float32), np.float64)


def matrix_factorization(
    strategy: str = "blt",
    *,
    num_rounds: int,
    min_separation: int = 1,
    max_participations: int | None = None,
    num_bands: int | None = None,
    num_buffers: int | None = None,
    blt_parameters: tuple[Any, Any] | None = None,
    coefficients: Any = None,
    error: str = "max",
    max_optimizer_steps: int | None = None,
) -> MatrixFactorization:
  """A matrix-factorization strategy for DP-FTRL (module docstring), built on jax_privacy.

  Args:
    strategy: ``'blt'``, ``'banded'``, ``'toeplitz'`` or ``'identity'``.
    num_rounds: ``n >= 1``, the planned number of rounds.
    min_separation: ``b >= 1``, the rounds between two participations of a client (``core.CyclicSampler``'s
      ``num_groups``); what BLT is optimized for.
    max_participations: ``k``: at most this many participations (None: ``ceil(n / b)``); BLT's optimization target.
    num_bands: ``'banded'``: the bands (default ``min(b, n)``; <= ``b`` for the orthogonality BandMF needs);
      ``'toeplitz'``: truncate the coefficients to this many (default: all ``n``).
    num_buffers: ``'blt'``: at most this many buffers to optimize (default 4; more buffers, more memory).
    blt_parameters: ``'blt'``: ``(buf_decay, output_scale)`` of ``C`` instead of optimizing (e.g. a saved plan).
    coefficients: ``'banded'``/``'toeplitz'``: the Toeplitz coefficients of ``C`` instead of the default ones.
    error: ``'max'`` or ``'mean'`` squared error of the prefix sums, what BLT/banded optimization minimizes.
    max_optimizer_steps: cap on the optimizer's steps (jax_privacy's defaults when None).

  Example::

    mf = privacy.matrix_factorization("banded", num_rounds=100, min_separation=10)
    mf.column_norm, mf.sensitivity(100, 10)   # 1.0, sqrt(10) (orthogonal columns)
  """
  validation.check_choice("strategy", strategy, STRATEGIES)
  num_rounds = validation.check_int("num_rounds", num_rounds, minimum=1)
  min_separation = validation.check_int("min_separation", min_separation, minimum=1)
  validation.check_int("max_participations", max_participations, minimum=1, allow_none=True)
  validation.check_int("num_bands", num_bands, minimum=1, allow_none=True)
  validation.check_int("num_buffers", num_buffers, minimum=1, maximum=15, allow_none=True)
  validation.check_int("max_optimizer_steps", max_optimizer_steps, minimum=1, allow_none=True)
  validation.check_choice("error", error, ERRORS)
  for name, value, allowed in (("num_bands", num_bands, ("banded", "toeplitz")),
                               ("num_buffers", num_buffers, ("blt",)), ("blt_parameters", blt_parameters, ("blt",)),
                               ("coefficients", coefficients, ("banded", "toeplitz"))):
    if value is not None and strategy not in allowed:
      raise ValueError(f"{name} applies to strategy {' or '.join(map(repr, allowed))}, not {strategy!r}.")
  if strategy == "identity":
    return MatrixFactorization("identity", num_rounds, lambda n: np.eye(1, n)[0], _identity_generator(), 1)
  import_jax_privacy()
  optimizer_options = {} if max_optimizer_steps is None else {"max_optimizer_steps": int(max_optimizer_steps)}
  if strategy == "blt":
    return _blt(num_rounds, min_separation, max_participations, num_buffers, blt_parameters, error,
                optimizer_options)
  return _toeplitz(strategy, num_rounds, min_separation, num_bands, coefficients, error, optimizer_options)


def _blt(num_rounds, min_separation, max_participations, num_buffers, blt_parameters, error, optimizer_options):
  import jax
  from jax_privacy.matrix_factorization import buffered_toeplitz

  if blt_parameters is None:
    with jax.enable_x64(True):
      blt = buffered_toeplitz.optimize(n=num_rounds, min_sep=min_separation, max_participations=max_participations,
                                       error=error, max_buffers=4 if num_buffers is None else num_buffers,
                                       **optimizer_options)
      buf_decay, output_scale = np.asarray(blt.buf_decay), np.asarray(blt.output_scale)
  else:
    if not isinstance(blt_parameters, (tuple, list)) or len(blt_parameters) != 2:
      raise TypeError("blt_parameters must be a pair (buf_decay, output_scale).")
    buf_decay, output_scale = (np.atleast_1d(np.asarray(p, np.float64)) for p in blt_parameters)
    if buf_decay.ndim != 1 or buf_decay.shape != output_scale.shape or not buf_decay.size:
      raise ValueError(f"blt_parameters: buf_decay and output_scale must be 1-d of one length >= 1, got shapes "
                       f"{buf_decay.shape} and {output_scale.shape}.")
    if not (np.all(np.isfinite(buf_decay)) and np.all(np.isfinite(output_scale))):
      raise ValueError("blt_parameters must be finite.")
    if np.any(buf_decay < 0) or np.any(buf_decay > 1):
      raise ValueError(f"blt_parameters: every buf_decay must lie in [0, 1] (a stable BLT), got {buf_decay}.")
  buf_decay, output_scale = _float32_exact(buf_decay), _float32_exact(output_scale)
  builder = buffered_toeplitz.StreamingMatrixBuilder(buf_decay=buf_decay.astype(np.float32),
                                                     output_scale=output_scale.astype(np.float32))
  noising = builder.build_inverse()

  def coefficients(n: int) -> np.ndarray:
    powers = np.arange(max(n - 1, 0))
    return np.concatenate([[1.0], np.sum(buf_decay ** powers[:, None] * output_scale, axis=1)])[:n]

  parameters = (("buf_decay", tuple(buf_decay.tolist())), ("output_scale", tuple(output_scale.tolist())))
  return MatrixFactorization("blt", num_rounds, coefficients,
                             NoiseGenerator(noising.init_multiply, noising.multiply_next), None, parameters)


def _toeplitz(strategy, num_rounds, min_separation, num_bands, coefficients, error, optimizer_options):
  import jax
  import jax.numpy as jnp
  from jax_privacy.matrix_factorization import toeplitz

  if coefficients is not None:
    chosen = np.atleast_1d(np.asarray(coefficients, np.float64))
    if chosen.ndim != 1 or not chosen.size or not np.all(np.isfinite(chosen)) or chosen[0] <= 0:
      raise ValueError("coefficients must be a finite 1-d sequence whose first entry is > 0.")
    if num_bands is not None:
      chosen = chosen[:num_bands]
  elif strategy == "banded":
    bands = min(min_separation, num_rounds) if num_bands is None else num_bands
    if bands > min_separation:
      raise ValueError(f"num_bands ({bands}) must be <= min_separation ({min_separation}): BandMF's columns are "
                       "orthogonal only for participations at least num_bands rounds apart.")
    reduction = jnp.max if error == "max" else jnp.mean
    with jax.enable_x64(True):
      chosen = np.asarray(toeplitz.optimize_banded_toeplitz(n=num_rounds, bands=bands, reduction_fn=reduction,
                                                            **optimizer_options), np.float64)
  else:
    with jax.enable_x64(True):
      chosen = np.asarray(toeplitz.optimal_max_error_strategy_coefs(num_rounds if num_bands is None else num_bands),
                          np.float64)
  chosen = _float32_exact(chosen)
  noising = toeplitz.inverse_as_streaming_matrix(jnp.asarray(chosen.astype(np.float32)))

  def padded(n: int) -> np.ndarray:
    return np.pad(chosen, (0, max(0, n - chosen.size)))[:n]

  bands = int(chosen.size) if strategy == "banded" or num_bands is not None or coefficients is not None else None
  return MatrixFactorization(strategy, num_rounds, padded, NoiseGenerator(noising.init_multiply, noising.multiply_next),
                             bands, (("coefficients", tuple(chosen.tolist())),))


def matrix_factorization_run_events(
    mechanism: MatrixFactorization,
    noise_multiplier: float,
    *,
    min_separation: int,
    max_participations: int | None = None,
    sampling_probability: float = 1.0,
    clipped_count_stddev: float | None = None,
) -> RunEvents:
  """The privacy events of a DP-FTRL run with ``mechanism``'s correlated noise (module docstring).

  Args:
    mechanism: the strategy (:func:`matrix_factorization`).
    noise_multiplier: ``z > 0`` of one participation (the value noise ``z_v`` under adaptive clipping).
    min_separation: ``b``: rounds between two participations of one client (``CyclicSampler.num_groups``).
    max_participations: at most this many participations (None: ``ceil(r / b)`` after ``r`` rounds).
    sampling_probability: ``q``: Poisson sampling inside each cyclic group (< 1 only for a banded strategy with
      ``num_bands <= b``: BandMF's amplification).
    clipped_count_stddev: ``sigma_b`` of adaptive clipping's per-round count noise (None: fixed clip).
  """
  if not isinstance(mechanism, MatrixFactorization):
    raise TypeError(f"mechanism must be a MatrixFactorization (privacy.matrix_factorization), got "
                    f"{type(mechanism).__name__}.")
  validation.check_positive("noise_multiplier", noise_multiplier)
  validation.check_int("min_separation", min_separation, minimum=1)
  validation.check_int("max_participations", max_participations, minimum=1, allow_none=True)
  validation.check_float("sampling_probability", sampling_probability, low=0.0, high=1.0, low_inclusive=False)
  validation.check_positive("clipped_count_stddev", clipped_count_stddev, allow_none=True)
  z, b = float(noise_multiplier), int(min_separation)
  relation = NeighboringRelation.REPLACE_SPECIAL
  if sampling_probability < 1.0:
    if mechanism.num_bands is None or mechanism.num_bands > b:
      raise ValueError(f"Poisson amplification (sampling_probability < 1) holds for a banded strategy with "
                       f"num_bands <= min_separation ({b}); got {mechanism.name!r} with num_bands "
                       f"{mechanism.num_bands}. Use sampling_probability=1 (every client of the group).")
    if clipped_count_stddev is not None:
      raise ValueError("adaptive clipping with Poisson amplification (sampling_probability < 1) is not covered by "
                       "BandMF's amplification analysis; use a fixed clip or sampling_probability=1.")
    if max_participations is not None:
      raise ValueError("max_participations applies to deterministic participation (sampling_probability=1).")
    import_jax_privacy()
    from jax_privacy.experimental import accounting as jax_privacy_accounting

    def amplified(rounds: int):
      return jax_privacy_accounting.amplified_bandmf_event(z, int(rounds), num_bands=b,
                                                           sampling_prob=float(sampling_probability))

    return RunEvents(amplified, relation, f"amplified {mechanism.name} MF, z={z:g}, {b} groups, "
                     f"q={sampling_probability:g}")

  def deterministic(rounds: int):
    rounds = int(rounds)
    if rounds == 0:
      return dp_accounting.NoOpDpEvent()
    value_multiplier = z * mechanism.column_norm / mechanism.sensitivity(rounds, b, max_participations)
    if clipped_count_stddev is None:
      return dp_accounting.GaussianDpEvent(value_multiplier)
    participations = -(-rounds // b) if max_participations is None else min(-(-rounds // b), max_participations)
    count_multiplier = 2.0 * float(clipped_count_stddev) / math.sqrt(participations)
    return dp_accounting.GaussianDpEvent((value_multiplier ** -2 + count_multiplier ** -2) ** -0.5)

  return RunEvents(deterministic, relation,
                   f"{mechanism.name} MF, z={z:g}, participations >= {b} rounds apart"
                   + ("" if max_participations is None else f", at most {max_participations}"))


def calibrate_run_noise(
    target_epsilon: float,
    make_run: Callable[[float], RunEvents],
    *,
    rounds: int,
    delta: float,
    accountant: AccountantSpec = "rdp",
    tolerance: float = 1e-3,
    bracket: tuple[float, float] = (1e-2, 1e3),
) -> float:
  """The smallest noise multiplier ``z`` (within ``tolerance`` relative) whose run ``make_run(z)`` spends at most
  ``target_epsilon`` at ``delta`` after ``rounds`` rounds, by ``accountant``; a geometric bisection over
  ``bracket`` (epsilon decreases with ``z``).

  The plan function for runs that :func:`calibrate_noise_multiplier` does not describe (matrix-factorization
  DP-FTRL), e.g.::

    mf = matrix_factorization("banded", num_rounds=100, min_separation=10)
    z = calibrate_run_noise(2.0, lambda z: matrix_factorization_run_events(mf, z, min_separation=10),
                            rounds=100, delta=1e-5)
  """
  validation.check_positive("target_epsilon", target_epsilon)
  validation.check_int("rounds", rounds, minimum=1)
  check_delta(delta)
  validation.check_positive("tolerance", tolerance)
  low, high = (float(v) for v in bracket)
  if not 0 < low < high:
    raise ValueError(f"bracket must be (low, high) with 0 < low < high, got {bracket}.")
  checked = check_accountant(accountant)

  def meets(noise_multiplier: float) -> bool:
    return run_epsilon(make_run(noise_multiplier), rounds, delta, accountant=checked) <= target_epsilon

  if not meets(high):
    raise ValueError(f"target_epsilon {target_epsilon} is not reachable with noise multipliers up to {high:g}.")
  if meets(low):
    return low
  while high / low - 1.0 > tolerance:  # invariant: low fails, high meets
    middle = math.sqrt(low * high)
    if meets(middle):
      high = middle
    else:
      low = middle
  return float(high)
