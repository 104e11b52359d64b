"""Matrix-factorization DP-FTRL as an aggregator: the clipped sum plus correlated noise (BLT, BandMF, Toeplitz).

The server part of a round adds row ``t`` of ``sigma (C^{-1} Z)`` to the sum of the clients' clipped values and
divides by the fixed ``m`` (``fedjax_lite.privacy.matrix_factorization`` explains the mechanism, its strategies,
built on ``jax_privacy``, and its accounting)::

  result_t = (sum_i clip_{C_t}(x_i) + z ||C||_col C_t (C^{-1} Z)_t) / m

The aggregator's state carries the noise generator's state (BLT's ``num_buffers`` buffers or BandMF's
``num_bands - 1`` past noise vectors, each shaped like the value, float32) beside the clip's state; a round draws
ONE vector of unit normals ``Z_t`` -- the draw the Gaussian mechanism scales -- and streams it through the
generator. So with the identity strategy this IS :func:`~fedjax_lite.aggregators.gaussian_fixed` /
:func:`~fedjax_lite.aggregators.gaussian_adaptive`, bit for bit.

Adaptive clipping (``clip=None``; Andrew et al. 2021) works as in the Gaussian aggregator: the noise of round
``t`` is scaled by the clip ``C_t`` of that round, which is the mechanism on the clip-normalized values
``clip(x_i) / C_t`` (sensitivity 1 per participation) followed by multiplication by ``C_t`` -- post-processing,
since ``C_t`` comes from earlier private releases -- as done in production DP-FTRL (Xu et al. 2023, "Federated
Learning of Gboard Language Models with Differential Privacy", arXiv:2305.18465). The clipped-count releases are
accounted by ``privacy.matrix_factorization_run_events(..., clipped_count_stddev=...)`` (deterministic
participation only).

``strategy='tree'`` is tree aggregation (:func:`~fedjax_lite.aggregators.tree_aggregation`, fixed clip, the tree
restarted every ``num_rounds`` rounds) for side-by-side comparisons; account it with
``privacy.tree_run_events``.
"""

from __future__ import annotations

from typing import Any

from fedjax_lite.aggregators.base import Aggregator
from fedjax_lite.aggregators.differential_privacy import _gaussian_dp, adaptive_clip, gaussian_event
from fedjax_lite.aggregators.estimation import constant_estimate
from fedjax_lite.aggregators.tree_aggregation import tree_aggregation
from fedjax_lite.core import validation
from fedjax_lite.privacy.matrix_factorization import STRATEGIES, MatrixFactorization, matrix_factorization

from fedjax_lite.core.tree import PyTree


def dp_matrix_factorization(
    noise_multiplier: float,
    clients_per_round: float,
    strategy: str | MatrixFactorization = "blt",
    *,
    num_rounds: int | None = None,
    clip: float | None = None,
    initial_l2_norm_clip: float = 0.1,
    target_unclipped_quantile: float = 0.5,
    learning_rate: float = 0.2,
    clipped_count_stddev: float | None = None,
    **strategy_options: Any,
) -> Aggregator:
  """DP-FTRL's mean with matrix-factorization noise (module docstring). Unweighted.

  Args:
    noise_multiplier: ``z >= 0`` of ONE participation (adaptive clipping splits it between the value and the
      clipped count as :func:`~fedjax_lite.aggregators.gaussian_adaptive` does).
    clients_per_round: ``m > 0``, the fixed normalizer.
    strategy: ``'blt'``, ``'banded'``, ``'toeplitz'``, ``'identity'``, ``'tree'``, or a
      :class:`~fedjax_lite.privacy.MatrixFactorization` built by ``privacy.matrix_factorization``.
    num_rounds: the planned rounds ``n`` (required with a strategy name; for ``'tree'``, the rounds per tree).
    clip: a fixed L2 clip ``C > 0``; None adapts it (``'tree'`` needs a fixed clip).
    initial_l2_norm_clip, target_unclipped_quantile, learning_rate, clipped_count_stddev: adaptive clipping, as
      :func:`~fedjax_lite.aggregators.gaussian_adaptive` (TFF's defaults).
    **strategy_options: passed to ``privacy.matrix_factorization`` with a strategy name (``min_separation``,
      ``max_participations``, ``num_bands``, ``num_buffers``, ``blt_parameters``, ``coefficients``, ``error``,
      ``max_optimizer_steps``).

  Its ``dp_event()`` is one participation's event (``GaussianDpEvent(z)``, or adaptive clipping's composition);
  correlated noise does not compose round by round: give the run's ledger
  ``privacy.matrix_factorization_run_events`` instead.

  Example::

    aggregator = aggregators.dp_matrix_factorization(1.0, 10, "banded", num_rounds=100, clip=0.5,
                                                     min_separation=10)
  """
  validation.check_float("noise_multiplier", noise_multiplier, low=0.0)
  validation.check_positive("clients_per_round", clients_per_round)
  validation.check_positive("clip", clip, allow_none=True)
  if isinstance(strategy, MatrixFactorization):
    if num_rounds is not None or strategy_options:
      raise ValueError("num_rounds and strategy options apply to a strategy name; the given MatrixFactorization is "
                       "already built.")
    mechanism = strategy
  else:
    validation.check_choice("strategy", strategy, STRATEGIES + ("tree",))
    if num_rounds is None:
      raise ValueError(f"num_rounds is required with strategy={strategy!r} (the planned number of rounds).")
    if strategy == "tree":
      if clip is None or strategy_options:
        raise ValueError("strategy='tree' takes a fixed clip and no strategy options (it is tree_aggregation).")
      return tree_aggregation(noise_multiplier, clients_per_round, clip, rounds_per_tree=num_rounds)
    mechanism = matrix_factorization(strategy, num_rounds=num_rounds, **strategy_options)
  scale = mechanism.column_norm
  if clip is not None:
    return _gaussian_dp(noise_multiplier * scale, clients_per_round, constant_estimate(clip),
                        gaussian_event(noise_multiplier), report_clip=False, correlated_noise=mechanism.generator)
  value_noise, estimator, dp_event = adaptive_clip(noise_multiplier, clients_per_round, initial_l2_norm_clip,
                                                   target_unclipped_quantile, learning_rate, clipped_count_stddev)
  return _gaussian_dp(value_noise * scale, clients_per_round, estimator, dp_event, report_clip=True,
                      correlated_noise=mechanism.generator)
