"""User-level differentially private training recipes: DP-FedAvg and DP-FTRL, each with its sampler and ledger.

* :func:`dp_fed_avg` (McMahan et al. 2018, arXiv:1710.06963; adaptive clipping by Andrew et al. 2021,
  arXiv:1905.03871): unweighted FedAvg whose aggregator is the Gaussian DP mean (adaptive clip by default),
  clients chosen by Poisson sampling with ``q = expected_clients_per_round / num_clients``, and a privacy ledger
  for the run's ``PoissonSampledDpEvent`` rounds.
* :func:`dp_ftrl`: FedAvg whose aggregator adds noise correlated across rounds (no sampling needed), by
  ``strategy``:

  - ``'tree'`` (Kairouz et al. 2021, arXiv:2103.00039): the tree-aggregated residual; clients visited in shuffled
    epochs (``core.ShuffledCyclicSampler``, each at most once per tree), the tree restarting each epoch; a ledger of
    tree-aggregation events (RDP).
  - ``'blt'``, ``'banded'``, ``'toeplitz'``, ``'identity'`` (matrix factorization: BandMF, Choquette-Choo et al.
    2023, arXiv:2306.08153; BLT, McMahan et al. 2024, arXiv:2408.08868; ``aggregators.dp_matrix_factorization``):
    the clients split once into ``b = floor(N q / m)`` fixed groups visited in turn (``core.CyclicSampler``: each
    client at most once every ``b`` rounds, the participation the strategies' sensitivity is computed for; Poisson
    sampling with probability ``q`` inside the group only for ``'banded'``, whose amplification covers it), the
    strategy planned for ``num_rounds`` rounds and ``b``-min-separation, and a ledger of
    ``privacy.matrix_factorization_run_events`` (adaptive clipping's count releases included).

Each returns a :class:`PrivateTraining` ``(process, sampler, ledger)`` to pass to
``fedjax_lite.training.run_training(process, ..., sampler=sampler, privacy=ledger)``.

Zeroing: the reference's ``dp_aggregator`` zeroes client updates with a threshold estimated from the clients'
norms WITHOUT noise, and broadcasts it; that estimate is not covered by the DP guarantee. These recipes therefore
leave zeroing off by default (``zeroing=True`` restores the reference's composition).

Auditing: both recipes take ``canaries`` (stacked canary updates, ``privacy.canary_directions``) and insert them as
extra clients that follow the recipe's own participation pattern (``aggregators.insert_canaries``: Poisson at rate
``q`` for DP-FedAvg; once every ``b`` rounds, in ``b`` fixed groups, for DP-FTRL), so that ``privacy.audit`` of the
trained model is a lower bound of the same epsilon the ledger bounds from above.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import optax

from fedjax_lite.aggregators.canaries import insert_canaries
from fedjax_lite.aggregators.differential_privacy import adaptive_clip_noise_params, gaussian_adaptive, gaussian_fixed
from fedjax_lite.aggregators.matrix_factorization import dp_matrix_factorization
from fedjax_lite.aggregators.sparsification import Compressor
from fedjax_lite.aggregators.presets import default_zeroing
from fedjax_lite.aggregators.tree_aggregation import tree_aggregation
from fedjax_lite.algorithms.example_dp import ExampleDp
from fedjax_lite.algorithms.fed_avg import fed_avg
from fedjax_lite.algorithms.optimizers import OptimizerFactory
from fedjax_lite.core import validation
from fedjax_lite.core.model import Model
from fedjax_lite.core.process import Process
from fedjax_lite.core.runner import Runner
from fedjax_lite.core.sampling import CyclicSampler, PoissonSampler, ShuffledCyclicSampler
from fedjax_lite.core.tree import PyTree
from fedjax_lite.privacy.accounting import PrivacyLedger, sampled_run_events, tree_run_events
from fedjax_lite.privacy.matrix_factorization import (
    STRATEGIES as MATRIX_FACTORIZATION_STRATEGIES,
    MatrixFactorization,
    matrix_factorization,
    matrix_factorization_run_events,
)

FTRL_STRATEGIES = ("tree",) + MATRIX_FACTORIZATION_STRATEGIES


class PrivateTraining(NamedTuple):
  """A private training recipe: the algorithm, the client sampler its accounting assumes, and the ledger."""

  process: Process
  sampler: Any
  ledger: PrivacyLedger


def dp_fed_avg(
    model: Model,
    *,
    noise_multiplier: float,
    num_clients: int,
    expected_clients_per_round: float,
    delta: float,
    client_learning_rate: float | optax.Schedule,
    client_optimizer: optax.GradientTransformation | OptimizerFactory = optax.sgd,
    server_optimizer: optax.GradientTransformation | None = None,
    clip: float | None = None,
    zeroing: bool = False,
    epsilon_budget: float | None = None,
    accountant: str = "rdp",
    seed: int = 0,
    runner: Runner | None = None,
    canaries: PyTree | None = None,
    example_dp: ExampleDp | None = None,
    upload_compressor: Compressor | None = None,
) -> PrivateTraining:
  """User-level DP-FedAvg with Poisson client sampling and a privacy ledger.

  Args:
    model: the model.
    noise_multiplier: ``z > 0``, total Gaussian noise multiplier per round (adaptive clipping splits it).
    num_clients: population size ``N``.
    expected_clients_per_round: ``m = q N`` with ``0 < m <= N``; also the DP mean's fixed normalizer.
    delta: the run's delta in (0, 1), e.g. below ``1 / N``.
    client_learning_rate, client_optimizer, server_optimizer: as in :func:`fed_avg` (server default SGD 1.0).
    clip: a fixed L2 clip; None (default) adapts the clip to the median norm (Andrew et al.).
    zeroing: add the reference's adaptive zeroing (not covered by the guarantee; see the module docstring).
    epsilon_budget: optional: training stops before exceeding it.
    accountant: ``'rdp'`` or ``'pld'``.
    seed: the sampler's seed (use the run's seed).
    runner: the client runner.
    canaries: optional stacked canary updates (leading canary axis, each shaped like the model's parameters),
      inserted as extra clients each sampled at rate ``q`` every round, for ``privacy.audit`` (module docstring).
    example_dp: optional :class:`~fedjax_lite.algorithms.ExampleDp`: example-level DP-SGD inside every client as
      well (``fed_avg``'s option), a guarantee for one example accounted apart by
      :func:`fedjax_lite.privacy.example_level_epsilon`; the ledger stays the user-level one.
    upload_compressor: optional :class:`~fedjax_lite.aggregators.Compressor` of each client's update
      (``fed_avg``'s option; with ``error_feedback`` the residuals are client states): the DP aggregator clips and
      noises the compressed messages, each a function of one client's data and residual, so the guarantee and the
      ledger are unchanged.
  """
  validation.check_positive("noise_multiplier", noise_multiplier)
  validation.check_int("num_clients", num_clients, minimum=1)
  validation.check_float("expected_clients_per_round", expected_clients_per_round, low=0.0, high=num_clients,
                         low_inclusive=False)
  if not isinstance(zeroing, bool):
    raise TypeError(f"zeroing must be a bool, got {type(zeroing).__name__}.")
  if clip is None:
    aggregator = gaussian_adaptive(noise_multiplier, float(expected_clients_per_round))
  else:
    aggregator = gaussian_fixed(noise_multiplier, float(expected_clients_per_round), clip)
  round_event = aggregator.dp_event()
  probability = float(expected_clients_per_round) / num_clients
  if canaries is not None:
    aggregator = insert_canaries(aggregator, canaries, participation_probability=probability)
  if zeroing:
    aggregator = default_zeroing(aggregator)
  process = fed_avg(model, client_optimizer=client_optimizer, client_learning_rate=client_learning_rate,
                    server_optimizer=server_optimizer, weighting="uniform", aggregator=aggregator, runner=runner,
                    example_dp=example_dp, upload_compressor=upload_compressor)
  sampler = PoissonSampler(num_clients, probability, seed)
  ledger = PrivacyLedger(sampled_run_events(round_event, sampling="poisson", sampling_probability=probability),
                         delta, accountant, epsilon_budget)
  return PrivateTraining(process, sampler, ledger)


def dp_ftrl(
    model: Model,
    *,
    noise_multiplier: float,
    num_clients: int,
    clients_per_round: int,
    clip: float | None,
    delta: float,
    client_learning_rate: float | optax.Schedule,
    client_optimizer: optax.GradientTransformation | OptimizerFactory = optax.sgd,
    server_optimizer: optax.GradientTransformation | None = None,
    epsilon_budget: float | None = None,
    seed: int = 0,
    runner: Runner | None = None,
    strategy: str | MatrixFactorization = "tree",
    num_rounds: int | None = None,
    sampling_probability: float = 1.0,
    accountant: str = "rdp",
    canaries: PyTree | None = None,
    example_dp: ExampleDp | None = None,
    upload_compressor: Compressor | None = None,
) -> PrivateTraining:
  """DP-FTRL: noise correlated across rounds by ``strategy``, no sampling assumption (module docstring). Server
  default: SGD(1.0) with momentum 0.9, as in Kairouz et al.'s and Choquette-Choo et al.'s federated experiments.

  Round ``t`` releases ``(sum_i clip_C(x_i) + sigma (C^{-1} Z)_t) / m`` (tree: the tree-aggregated residual), with
  ``sigma = z C ||C||_col`` for a matrix-factorization strategy (``z`` the noise multiplier of ONE participation).

  Args:
    model: the model.
    noise_multiplier: ``z > 0`` (tree: of every tree node; matrix factorization: of one participation, split with
      the clipped count under adaptive clipping).
    num_clients: population size ``N``.
    clients_per_round: ``m``: tree: the cohort (epochs of ``N // m`` rounds); matrix factorization: the smallest
      expected cohort, which sets the groups ``b = floor(N q / m)`` (the mean divides by the groups' expected
      cohort ``N q / b >= m``).
    clip: the L2 clip ``C``; None adapts it (Andrew et al. 2021; matrix factorization with ``q = 1`` only).
    delta: the run's delta in (0, 1).
    client_learning_rate, client_optimizer, server_optimizer: as in :func:`fed_avg`.
    epsilon_budget: optional: training stops before exceeding it.
    seed: the sampler's seed (use the run's seed).
    runner: the client runner.
    strategy: ``'tree'``, ``'blt'``, ``'banded'``, ``'toeplitz'``, ``'identity'`` (``privacy.matrix_factorization``
      planned for ``num_rounds`` and ``b``), or a ``privacy.MatrixFactorization`` built for ``b``-min-separation.
    num_rounds: the planned rounds ``n`` (required with a strategy name other than ``'tree'``; the tree restarts
      every epoch and ignores it). Training longer stays correctly accounted, with a strategy planned for less.
    sampling_probability: ``q`` in (0, 1]: Poisson sampling inside each cyclic group (< 1 for ``'banded'`` only:
      BandMF's amplification, arXiv:2306.08153 Thm. 4).
    accountant: ``'rdp'`` or ``'pld'`` (the tree: RDP only).
    canaries: optional stacked canary updates inserted as extra clients in ``b`` fixed groups (tree: one group per
      round of the epoch), each taking part once every ``b`` rounds (with probability ``q``), for ``privacy.audit``.
    example_dp, upload_compressor: optional example-level DP-SGD inside every client and compressed uploads, as in
      :func:`dp_fed_avg`.

  Example::

    recipe = dp_ftrl(model, noise_multiplier=1.0, num_clients=500, clients_per_round=50, clip=0.5, delta=1e-3,
                     client_learning_rate=0.1, strategy="banded", num_rounds=100)
    recipe.sampler.min_separation, recipe.ledger.epsilon_after(100)   # 10 rounds, epsilon of 10 participations
  """
  validation.check_positive("noise_multiplier", noise_multiplier)
  validation.check_int("num_clients", num_clients, minimum=1)
  validation.check_int("clients_per_round", clients_per_round, minimum=1, maximum=num_clients)
  validation.check_int("num_rounds", num_rounds, minimum=1, allow_none=True)
  validation.check_float("sampling_probability", sampling_probability, low=0.0, high=1.0, low_inclusive=False)
  if not isinstance(strategy, MatrixFactorization):
    validation.check_choice("strategy", strategy, FTRL_STRATEGIES)
  server_optimizer = optax.sgd(1.0, momentum=0.9) if server_optimizer is None else server_optimizer
  if strategy == "tree":
    if clip is None or sampling_probability != 1.0:
      raise ValueError("strategy='tree' needs a fixed clip and sampling_probability=1 (every client of the cohort).")
    sampler = ShuffledCyclicSampler(num_clients, clients_per_round, seed)
    aggregator = tree_aggregation(noise_multiplier, float(clients_per_round), clip,
                                  rounds_per_tree=sampler.rounds_per_epoch)
    run, num_groups = tree_run_events(noise_multiplier, sampler.rounds_per_epoch), sampler.rounds_per_epoch
  else:
    num_groups = int(num_clients * sampling_probability // clients_per_round)
    if num_groups < 1:
      raise ValueError(f"num_clients * sampling_probability ({num_clients * sampling_probability:g}) must be at "
                       f"least clients_per_round ({clients_per_round}): no cyclic group would hold a cohort.")
    if sampling_probability < 1.0 and clip is None:
      raise ValueError("adaptive clipping (clip=None) needs sampling_probability=1: BandMF's amplification covers "
                       "the value release alone.")
    if isinstance(strategy, MatrixFactorization):
      if num_rounds is not None:
        raise ValueError("num_rounds applies to a strategy name; the given MatrixFactorization is already planned.")
      mechanism = strategy
    elif num_rounds is None:
      raise ValueError(f"num_rounds is required with strategy={strategy!r} (the planned number of rounds).")
    else:
      mechanism = matrix_factorization(strategy, num_rounds=num_rounds, min_separation=num_groups)
    sampler = CyclicSampler(num_clients, num_groups, float(sampling_probability), seed)
    normalizer = sampler.expected_clients_per_round
    aggregator = dp_matrix_factorization(noise_multiplier, normalizer, mechanism, clip=clip)
    if clip is None:
      value_noise, count_stddev = adaptive_clip_noise_params(noise_multiplier, normalizer)
      run = matrix_factorization_run_events(mechanism, value_noise, min_separation=num_groups,
                                            clipped_count_stddev=count_stddev)
    else:
      run = matrix_factorization_run_events(mechanism, noise_multiplier, min_separation=num_groups,
                                            sampling_probability=sampling_probability)
  if canaries is not None:
    aggregator = insert_canaries(aggregator, canaries, participation_probability=sampling_probability,
                                 num_groups=num_groups)
  process = fed_avg(model, client_optimizer=client_optimizer, client_learning_rate=client_learning_rate,
                    server_optimizer=server_optimizer, weighting="uniform", aggregator=aggregator, runner=runner,
                    example_dp=example_dp, upload_compressor=upload_compressor)
  ledger = PrivacyLedger(run, delta, accountant, epsilon_budget)
  return PrivateTraining(process, sampler, ledger)
