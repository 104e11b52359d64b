"""Privacy accounting on ``dp_accounting``: the epsilon of a run, planning, and noise calibration.

A DP aggregator emits one ``DpEvent`` per round (``Aggregator.dp_event()``); how clients were sampled decides the
event of a whole round and the neighbouring relation the guarantee is stated for:

* Poisson sampling (each client independently with probability ``q``):
  ``PoissonSampledDpEvent(q, round_event)`` under add-or-remove-one adjacency (RDP or PLD accountant);
* fixed-size sampling without replacement (``m`` of ``N``): ``SampledWithoutReplacementDpEvent(N, m, ...)``
  under replace-one adjacency (RDP only; dp_accounting's PLD does not support it). Replacing one client changes a
  clipped sum by up to twice the clip, so every Gaussian noise multiplier is HALVED relative to that sensitivity
  (dp_accounting states noise multipliers relative to the sensitivity of the relation in force);
* all clients every round (``q = 1``): the round event itself.

``T`` rounds compose: ``SelfComposedDpEvent(event, T)``. Nothing here re-derives privacy math: RDP (Mironov 2017)
and privacy-loss-distribution (Koskela et al. 2020; Doroshenko et al. 2022) accounting, and calibration
(``dp_accounting.calibrate_dp_mechanism``), are dp_accounting's.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import dp_accounting
from dp_accounting import NeighboringRelation

from fedjax_lite.core import validation

ACCOUNTANTS = ("rdp", "pld")
SAMPLINGS = ("poisson", "without_replacement", "all")


def check_delta(delta: float) -> float:
  return validation.check_float("delta", delta, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)


def make_accountant(accountant: str = "rdp",
                    neighboring_relation: NeighboringRelation = NeighboringRelation.ADD_OR_REMOVE_ONE):
  """A fresh ``dp_accounting`` accountant: ``'rdp'`` (RdpAccountant) or ``'pld'`` (PLDAccountant)."""
  validation.check_choice("accountant", accountant, ACCOUNTANTS)
  if accountant == "rdp":
    return dp_accounting.rdp.RdpAccountant(neighboring_relation=neighboring_relation)
  return dp_accounting.pld.PLDAccountant(neighboring_relation=neighboring_relation)


def halve_gaussian_noise(event):
  """The same event with every Gaussian noise multiplier halved (add/remove-one -> replace-one sensitivity)."""
  if isinstance(event, dp_accounting.GaussianDpEvent):
    return dp_accounting.GaussianDpEvent(event.noise_multiplier / 2.0)
  if isinstance(event, dp_accounting.ComposedDpEvent):
    return dp_accounting.ComposedDpEvent([halve_gaussian_noise(e) for e in event.events])
  if isinstance(event, dp_accounting.SelfComposedDpEvent):
    return dp_accounting.SelfComposedDpEvent(halve_gaussian_noise(event.event), event.count)
  if isinstance(event, (dp_accounting.NoOpDpEvent, dp_accounting.NonPrivateDpEvent)):
    return event
  raise ValueError(f"cannot restate {type(event).__name__} under replace-one adjacency.")


@dataclasses.dataclass(frozen=True)
class SampledEvent:
  """A round's privacy event with the sampling that produced it.

  Attributes:
    event: the ``DpEvent`` of one round, sampling included.
    neighboring_relation: the adjacency the accountant must use for it.
  """

  event: Any
  neighboring_relation: NeighboringRelation


def sampled_round_event(round_event, *, sampling: str, sampling_probability: float | None = None,
                        num_clients: int | None = None, clients_per_round: int | None = None) -> SampledEvent:
  """The event of one round: the aggregator's ``round_event`` under the given client sampling.

  Args:
    round_event: the DP aggregator's per-round ``DpEvent`` (add-or-remove-one sensitivity).
    sampling: ``'poisson'``, ``'without_replacement'`` or ``'all'``.
    sampling_probability: ``q`` in (0, 1] for Poisson sampling.
    num_clients: population size ``N`` for sampling without replacement.
    clients_per_round: cohort size ``m`` (1 <= m <= N) for sampling without replacement.
  """
  validation.check_choice("sampling", sampling, SAMPLINGS)
  if sampling == "poisson":
    validation.check_float("sampling_probability", sampling_probability, low=0.0, high=1.0, low_inclusive=False)
    if sampling_probability == 1.0:
      return SampledEvent(round_event, NeighboringRelation.ADD_OR_REMOVE_ONE)
    return SampledEvent(dp_accounting.PoissonSampledDpEvent(float(sampling_probability), round_event),
                        NeighboringRelation.ADD_OR_REMOVE_ONE)
  if sampling == "without_replacement":
    validation.check_int("num_clients", num_clients, minimum=1)
    validation.check_int("clients_per_round", clients_per_round, minimum=1, maximum=num_clients)
    return SampledEvent(
        dp_accounting.SampledWithoutReplacementDpEvent(int(num_clients), int(clients_per_round),
                                                       halve_gaussian_noise(round_event)),
        NeighboringRelation.REPLACE_ONE)
  return SampledEvent(round_event, NeighboringRelation.ADD_OR_REMOVE_ONE)


def epsilon_of(event, delta: float, *, accountant: str = "rdp",
               neighboring_relation: NeighboringRelation = NeighboringRelation.ADD_OR_REMOVE_ONE,
               count: int = 1) -> float:
  """``epsilon`` at ``delta`` of ``event`` composed ``count`` times, by the chosen accountant."""
  check_delta(delta)
  validation.check_int("count", count, minimum=0)
  fresh = make_accountant(accountant, neighboring_relation)
  if not fresh.supports(event):
    raise ValueError(f"the {accountant!r} accountant does not support {type(event).__name__} under "
                     f"{neighboring_relation.name}; use the other accountant or another sampling.")
  if count:
    fresh.compose(event, count)
  return float(fresh.get_epsilon(delta))


def run_epsilon(sampled: SampledEvent, rounds: int, delta: float, *, accountant: str = "rdp") -> float:
  """``epsilon`` at ``delta`` after ``rounds`` rounds of ``sampled.event``."""
  return epsilon_of(sampled.event, delta, accountant=accountant,
                    neighboring_relation=sampled.neighboring_relation, count=rounds)


def planned_epsilon(noise_multiplier: float, *, rounds: int, delta: float, sampling: str = "poisson",
                    sampling_probability: float | None = None, num_clients: int | None = None,
                    clients_per_round: int | None = None, accountant: str = "rdp",
                    round_event_fn: Callable[[float], Any] | None = None) -> float:
  """The epsilon a planned DP-FedAvg run will spend.

  Args:
    noise_multiplier: ``z > 0`` of each round's Gaussian mechanism.
    rounds: number of rounds ``T >= 1``.
    delta: target delta in (0, 1).
    sampling, sampling_probability, num_clients, clients_per_round: see :func:`sampled_round_event`.
    accountant: ``'rdp'`` or ``'pld'``.
    round_event_fn: ``z -> round DpEvent``; default ``GaussianDpEvent(z)`` (fixed clipping). For adaptive
      clipping pass e.g. ``lambda z: gaussian_adaptive(z, m).dp_event()``.
  """
  validation.check_positive("noise_multiplier", noise_multiplier)
  validation.check_int("rounds", rounds, minimum=1)
  round_event = (round_event_fn or dp_accounting.GaussianDpEvent)(float(noise_multiplier))
  sampled = sampled_round_event(round_event, sampling=sampling, sampling_probability=sampling_probability,
                                num_clients=num_clients, clients_per_round=clients_per_round)
  return run_epsilon(sampled, rounds, delta, accountant=accountant)


def calibrate_noise_multiplier(target_epsilon: float, *, rounds: int, delta: float, sampling: str = "poisson",
                               sampling_probability: float | None = None, num_clients: int | None = None,
                               clients_per_round: int | None = None, accountant: str = "rdp",
                               round_event_fn: Callable[[float], Any] | None = None,
                               tolerance: float = 1e-3) -> float:
  """The smallest noise multiplier (within ``tolerance`` relative) whose run meets ``(target_epsilon, delta)``.

  A bisection by ``dp_accounting.calibrate_dp_mechanism``; the returned value always meets the target.
  """
  validation.check_positive("target_epsilon", target_epsilon)
  validation.check_int("rounds", rounds, minimum=1)
  check_delta(delta)
  validation.check_positive("tolerance", tolerance)

  def make_event(noise_multiplier: float):
    round_event = (round_event_fn or dp_accounting.GaussianDpEvent)(float(noise_multiplier))
    sampled = sampled_round_event(round_event, sampling=sampling, sampling_probability=sampling_probability,
                                  num_clients=num_clients, clients_per_round=clients_per_round)
    return dp_accounting.SelfComposedDpEvent(sampled.event, rounds), sampled.neighboring_relation

  relation = make_event(1.0)[1]
  lower = 1e-2 if round_event_fn is None else _smallest_valid(round_event_fn)
  bracket = dp_accounting.ExplicitBracketInterval(lower, 1e3)
  return float(dp_accounting.calibrate_dp_mechanism(
      lambda: make_accountant(accountant, relation), lambda z: make_event(z)[0], float(target_epsilon),
      float(delta), bracket_interval=bracket, tol=tolerance * lower))


def _smallest_valid(round_event_fn) -> float:
  """A lower bracket at which ``round_event_fn`` accepts the noise multiplier (adaptive clipping limits it)."""
  for candidate in (1e-2, 1e-1, 0.5, 1.0):
    try:
      round_event_fn(candidate)
      return candidate
    except ValueError:
      continue
  raise ValueError("round_event_fn accepts none of the noise multipliers 0.01 .. 1.0.")


@dataclasses.dataclass(frozen=True, eq=False)
class PrivacyLedger:
  """The privacy a run has spent: ``epsilon_after(rounds)`` at the run's ``delta`` (a pure function, cached).

  Attributes:
    sampled: the round's event and adjacency (:func:`sampled_round_event`).
    delta: the run's delta in (0, 1).
    accountant: ``'rdp'`` or ``'pld'``.
    epsilon_budget: optional cap: training stops before a round that would exceed it.
  """

  sampled: SampledEvent
  delta: float
  accountant: str = "rdp"
  epsilon_budget: float | None = None

  def __post_init__(self):
    if not isinstance(self.sampled, SampledEvent):
      raise TypeError(f"sampled must be a SampledEvent, got {type(self.sampled).__name__}.")
    check_delta(self.delta)
    validation.check_choice("accountant", self.accountant, ACCOUNTANTS)
    validation.check_positive("epsilon_budget", self.epsilon_budget, allow_none=True)
    if not make_accountant(self.accountant, self.sampled.neighboring_relation).supports(self.sampled.event):
      raise ValueError(f"the {self.accountant!r} accountant does not support this run's event "
                       f"({type(self.sampled.event).__name__}); use accountant='rdp'.")
    if self.epsilon_budget is not None and self.epsilon_after(1) > self.epsilon_budget:
      raise ValueError(f"epsilon_budget ({self.epsilon_budget}) is exceeded by the very first round "
                       f"(epsilon {self.epsilon_after(1):.4g} at delta {self.delta}); raise the budget or the "
                       "noise, or lower the sampling rate.")

  @functools.lru_cache(maxsize=None)
  def epsilon_after(self, rounds: int) -> float:
    """Epsilon at ``delta`` after ``rounds`` rounds (0 rounds: 0)."""
    return run_epsilon(self.sampled, rounds, self.delta, accountant=self.accountant)

  def allows(self, rounds: int) -> bool:
    """Whether ``rounds`` rounds stay within the budget (always True without one)."""
    return self.epsilon_budget is None or self.epsilon_after(rounds) <= self.epsilon_budget
