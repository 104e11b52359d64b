"""User-level differentially private training recipes: DP-FedAvg and DP-FTRL, each with its sampler and ledger.

* :func:`dp_fed_avg` (McMahan et al. 2018, arXiv:1710.06963; adaptive clipping by Andrew et al. 2021,
  arXiv:1905.03871): unweighted FedAvg whose aggregator is the Gaussian DP mean (adaptive clip by default),
  clients chosen by Poisson sampling with ``q = expected_clients_per_round / num_clients``, and a privacy ledger
  for the run's ``PoissonSampledDpEvent`` rounds.
* :func:`dp_ftrl` (Kairouz et al. 2021, arXiv:2103.00039): FedAvg whose aggregator is the tree-aggregated residual
  (no sampling needed), clients visited in shuffled epochs (each at most once per tree), the tree restarting each
  epoch, and a ledger of tree-aggregation events.

Each returns a :class:`PrivateTraining` ``(process, sampler, ledger)`` to pass to
``fedjax_lite.training.run_training(process, ..., sampler=sampler, privacy=ledger)``.

Zeroing: the reference's ``dp_aggregator`` zeroes client updates with a threshold estimated from the clients'
norms WITHOUT noise, and broadcasts it; that estimate is not covered by the DP guarantee. These recipes therefore
leave zeroing off by default (``zeroing=True`` restores the reference's composition).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import optax

from fedjax_lite.aggregators.differential_privacy import gaussian_adaptive, gaussian_fixed
from fedjax_lite.aggregators.presets import default_zeroing
from fedjax_lite.aggregators.tree_aggregation import tree_aggregation
from fedjax_lite.algorithms.fed_avg import fed_avg, fed_avg_options
from fedjax_lite.core import validation
from fedjax_lite.core.model import Model
from fedjax_lite.core.process import Process
from fedjax_lite.core.sampling import PoissonSampler, ShuffledCyclicSampler
from fedjax_lite.privacy.accounting import PrivacyLedger, sampled_run_events, tree_run_events


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
    clip: float | None = None,
    zeroing: bool = False,
    epsilon_budget: float | None = None,
    accountant: str = "rdp",
    seed: int = 0,
    **options,
) -> PrivateTraining:
  """User-level DP-FedAvg with Poisson client sampling and a privacy ledger.

  Args:
    model: the model.
    noise_multiplier: ``z > 0``, total Gaussian noise multiplier per round (adaptive clipping splits it).
    num_clients: population size ``N``.
    expected_clients_per_round: ``m = q N`` with ``0 < m <= N``; also the DP mean's fixed normalizer.
    delta: the run's delta in (0, 1), e.g. below ``1 / N``.
    clip: a fixed L2 clip; None (default) adapts the clip to the median norm (Andrew et al.).
    zeroing: add the reference's adaptive zeroing (not covered by the guarantee; see the module docstring).
    epsilon_budget: optional: training stops before exceeding it.
    accountant: ``'rdp'`` or ``'pld'``.
    seed: the sampler's seed (use the run's seed).
    **options: every option of :func:`fed_avg` (``client_learning_rate``, ``client_optimizer``,
      ``server_optimizer`` (default SGD 1.0), ``runner``, ...) except ``weighting`` and ``aggregator``, which the
      recipe sets (uniform weighting, the DP mean).
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
  if zeroing:
    aggregator = default_zeroing(aggregator)
  process = fed_avg(model, weighting="uniform", aggregator=aggregator,
                    **fed_avg_options("dp_fed_avg", options, sets=("weighting", "aggregator")))
  probability = float(expected_clients_per_round) / num_clients
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
    clip: float,
    delta: float,
    epsilon_budget: float | None = None,
    seed: int = 0,
    **options,
) -> PrivateTraining:
  """DP-FTRL: tree-aggregated noise, no sampling assumption; clients once per epoch, the tree restarting each
  epoch of ``num_clients // clients_per_round`` rounds. ``options``: every option of :func:`fed_avg` except
  ``weighting`` and ``aggregator``; the server default is SGD(1.0) with momentum 0.9 as in Kairouz et al.'s
  federated experiments.
  """
  validation.check_positive("noise_multiplier", noise_multiplier)
  sampler = ShuffledCyclicSampler(num_clients, clients_per_round, seed)
  aggregator = tree_aggregation(noise_multiplier, float(clients_per_round), clip,
                                rounds_per_tree=sampler.rounds_per_epoch)
  options = fed_avg_options("dp_ftrl", options, sets=("weighting", "aggregator"))
  if options.get("server_optimizer") is None:
    options["server_optimizer"] = optax.sgd(1.0, momentum=0.9)
  process = fed_avg(model, weighting="uniform", aggregator=aggregator, **options)
  ledger = PrivacyLedger(tree_run_events(noise_multiplier, sampler.rounds_per_epoch), delta, "rdp",
                         epsilon_budget)
  return PrivateTraining(process, sampler, ledger)
