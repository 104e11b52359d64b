"""Client sampling per round, reproducible from ``(seed, round_num)`` alone.

Each round's cohort is drawn from a numpy generator seeded with ``(seed, round_num, stream)``, so it does not
depend on which rounds ran before: a resumed run samples exactly the cohorts the uninterrupted run would have
(TFF's ``build_uniform_sampling_fn`` has the same property).

Each distribution's parameters, their checks and the cohort size they imply are defined once
(:class:`UniformCohorts`, :class:`PoissonCohorts`, :class:`CyclicCohorts`) and shared by the host samplers here and
the device samplers of :mod:`fedjax_lite.core.device_rounds`, which draw the same distributions with ``jax.random``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fedjax_lite.core import validation

# Distinct streams keep the cohort draw independent of other host-side randomness of the same round.
SAMPLING_STREAM = 0x5A3D
PACKING_STREAM = 0x9AC4


def round_generator(seed: int, round_num: int, stream: int) -> np.random.Generator:
  """A numpy generator for one purpose (``stream``) in one round of one run."""
  return np.random.default_rng([int(seed), int(round_num), int(stream)])


def _check_seed_round(seed: int, round_num: int) -> None:
  validation.check_int("seed", seed, minimum=0)
  validation.check_int("round_num", round_num, minimum=0)


def sample_clients(
    num_clients: int, cohort_size: int, *, seed: int, round_num: int, replace: bool = False
) -> np.ndarray:
  """Indices of the clients of round ``round_num``, drawn uniformly.

  Args:
    num_clients: size of the population, >= 1.
    cohort_size: clients per round, >= 1 (and <= num_clients without replacement).
    seed: the run's seed (>= 0).
    round_num: the round (>= 0).
    replace: sample with replacement (a client may appear more than once).

  Returns:
    int64 array of ``cohort_size`` indices into the population. Without replacement they are distinct.
  """
  validation.check_int("num_clients", num_clients, minimum=1)
  validation.check_int("cohort_size", cohort_size, minimum=1)
  if not replace and cohort_size > num_clients:
    raise ValueError(
        f"cohort_size ({cohort_size}) must be <= num_clients ({num_clients}) when sampling without replacement."
    )
  _check_seed_round(seed, round_num)
  generator = round_generator(seed, round_num, SAMPLING_STREAM)
  return generator.choice(num_clients, size=cohort_size, replace=replace).astype(np.int64)


POISSON_STREAM = 0x7015
CYCLIC_STREAM = 0xC1C1
# A Poisson cohort is padded to the size it stays below except with this probability per round.
POISSON_OVERFLOW_PROBABILITY = 1e-9


def poisson_sample_clients(num_clients: int, sampling_probability: float, *, seed: int, round_num: int
                           ) -> np.ndarray:
  """Poisson sampling: every client joins round ``round_num`` independently with probability ``q``.

  The cohort's size varies from round to round (Binomial(N, q)); it may be empty. Reproducible from
  ``(seed, round_num)`` alone. This is the sampling DP-SGD/DP-FedAvg amplification analyses assume.
  """
  validation.check_int("num_clients", num_clients, minimum=1)
  validation.check_float("sampling_probability", sampling_probability, low=0.0, high=1.0, low_inclusive=False)
  _check_seed_round(seed, round_num)
  generator = round_generator(seed, round_num, POISSON_STREAM)
  return np.flatnonzero(generator.random(num_clients) < sampling_probability).astype(np.int64)


def poisson_cohort_capacity(num_clients: int, sampling_probability: float,
                            overflow_probability: float = POISSON_OVERFLOW_PROBABILITY) -> int:
  """The padded cohort size for Poisson sampling: the Binomial(N, q) quantile at ``1 - overflow_probability``.

  Rounds are padded to this size with empty client slots, so different cohort sizes share one compiled round;
  a larger cohort (probability ``overflow_probability`` per round) is padded to the next power of two instead
  (one more compilation, never a dropped client).
  """
  from scipy import stats

  validation.check_int("num_clients", num_clients, minimum=1)
  validation.check_float("sampling_probability", sampling_probability, low=0.0, high=1.0, low_inclusive=False)
  quantile = stats.binom.ppf(1.0 - overflow_probability, num_clients, sampling_probability)
  return max(1, min(num_clients, int(quantile)))


@dataclasses.dataclass(frozen=True)
class UniformCohorts:
  """Uniform cohorts of ``clients_per_round`` out of ``num_clients`` clients, without replacement unless
  ``replace`` (the parameters and their checks)."""

  num_clients: int
  clients_per_round: int
  replace = False  # not a field here: the samplers declare it as their own (after ``seed`` on the host)

  def __post_init__(self):
    validation.check_int("num_clients", self.num_clients, minimum=1)
    validation.check_int("clients_per_round", self.clients_per_round, minimum=1,
                         maximum=None if self.replace else self.num_clients)

  @property
  def cohort_capacity(self) -> int:
    """Client slots of a round's data: ``clients_per_round``."""
    return self.clients_per_round


@dataclasses.dataclass(frozen=True)
class PoissonCohorts:
  """Cohorts where each of ``num_clients`` clients joins independently with probability ``sampling_probability``."""

  num_clients: int
  sampling_probability: float

  def __post_init__(self):
    validation.check_int("num_clients", self.num_clients, minimum=1)
    validation.check_float("sampling_probability", self.sampling_probability, low=0.0, high=1.0,
                           low_inclusive=False)

  @property
  def cohort_capacity(self) -> int:
    """Client slots of a round's data: :func:`poisson_cohort_capacity`."""
    return poisson_cohort_capacity(self.num_clients, self.sampling_probability)

  @property
  def expected_clients_per_round(self) -> float:
    return self.num_clients * self.sampling_probability


@dataclasses.dataclass(frozen=True)
class CyclicCohorts:
  """Epochs of ``num_clients // clients_per_round`` rounds, each epoch a permutation of the clients cut into cohorts
  of ``clients_per_round``."""

  num_clients: int
  clients_per_round: int

  def __post_init__(self):
    validation.check_int("num_clients", self.num_clients, minimum=1)
    validation.check_int("clients_per_round", self.clients_per_round, minimum=1, maximum=self.num_clients)

  @property
  def cohort_capacity(self) -> int:
    """Client slots of a round's data: ``clients_per_round``."""
    return self.clients_per_round

  @property
  def rounds_per_epoch(self) -> int:
    return self.num_clients // self.clients_per_round


@dataclasses.dataclass(frozen=True)
class UniformSampler(UniformCohorts):
  """``clients_per_round`` clients drawn uniformly each round (:func:`sample_clients`)."""

  seed: int = 0
  replace: bool = False

  def __post_init__(self):
    super().__post_init__()
    validation.check_int("seed", self.seed, minimum=0)

  def __call__(self, round_num: int) -> np.ndarray:
    return sample_clients(self.num_clients, self.clients_per_round, seed=self.seed, round_num=round_num,
                          replace=self.replace)


@dataclasses.dataclass(frozen=True)
class PoissonSampler(PoissonCohorts):
  """Each client independently with probability ``sampling_probability`` (:func:`poisson_sample_clients`);
  rounds are padded to ``cohort_capacity`` client slots (:func:`poisson_cohort_capacity`)."""

  seed: int = 0

  def __post_init__(self):
    super().__post_init__()
    validation.check_int("seed", self.seed, minimum=0)

  def __call__(self, round_num: int) -> np.ndarray:
    return poisson_sample_clients(self.num_clients, self.sampling_probability, seed=self.seed,
                                  round_num=round_num)


@dataclasses.dataclass(frozen=True)
class ShuffledCyclicSampler(CyclicCohorts):
  """Each epoch, a fresh permutation of the clients is cut into cohorts of ``clients_per_round``: every client
  takes part at most once per epoch (what DP-FTRL's tree aggregation needs; Kairouz et al. 2021).

  An epoch has ``num_clients // clients_per_round`` rounds; the ``num_clients % clients_per_round`` clients at the
  end of that epoch's permutation sit it out (a different few each epoch).
  """

  seed: int = 0

  def __post_init__(self):
    super().__post_init__()
    validation.check_int("seed", self.seed, minimum=0)

  def __call__(self, round_num: int) -> np.ndarray:
    _check_seed_round(self.seed, round_num)
    epoch, position = divmod(int(round_num), self.rounds_per_epoch)
    permutation = round_generator(self.seed, epoch, CYCLIC_STREAM).permutation(self.num_clients)
    return permutation[position * self.clients_per_round:(position + 1) * self.clients_per_round].astype(np.int64)


GROUP_STREAM = 0x6B0D


@dataclasses.dataclass(frozen=True)
class CyclicSampler:
  """b-min-separated participation: the clients are split ONCE into ``num_groups`` fixed groups (a seeded
  permutation cut into near-equal parts, sizes differing by at most one), and round ``t`` draws from group
  ``t mod num_groups``: the whole group (``sampling_probability = 1``) or each of its clients independently with
  probability ``q`` (Poisson sampling within the group).

  This is the participation that matrix-factorization DP-FTRL's accounting assumes (Choquette-Choo et al. 2023,
  "(Amplified) Banded Matrix Factorization", arXiv:2306.08153; jax_privacy's ``CyclicPoissonSampling``): a client
  takes part at most once every ``min_separation = num_groups`` rounds, so at most ``ceil(T / num_groups)`` times
  in ``T`` rounds, and with ``q < 1`` each participation is Poisson-sampled (BandMF's amplification). Unlike
  :class:`ShuffledCyclicSampler`, whose fresh permutation every epoch lets a client take the last round of one
  epoch and the first of the next, the groups never change. Reproducible from ``(seed, round_num)`` alone.
  """

  num_clients: int
  num_groups: int
  sampling_probability: float = 1.0
  seed: int = 0

  def __post_init__(self):
    validation.check_int("num_clients", self.num_clients, minimum=1)
    validation.check_int("num_groups", self.num_groups, minimum=1, maximum=self.num_clients)
    validation.check_float("sampling_probability", self.sampling_probability, low=0.0, high=1.0,
                           low_inclusive=False)
    validation.check_int("seed", self.seed, minimum=0)

  @property
  def groups(self) -> list[np.ndarray]:
    """The ``num_groups`` fixed groups of client indices (int64)."""
    permutation = round_generator(self.seed, 0, GROUP_STREAM).permutation(self.num_clients).astype(np.int64)
    return np.array_split(permutation, self.num_groups)

  @property
  def min_separation(self) -> int:
    """The fewest rounds between two participations of one client (``b``)."""
    return self.num_groups

  def max_participations(self, rounds: int) -> int:
    """The most rounds one client can take part in among the first ``rounds``: ``ceil(rounds / num_groups)``."""
    validation.check_int("rounds", rounds, minimum=0)
    return -(-int(rounds) // self.num_groups)

  @property
  def cohort_capacity(self) -> int:
    largest = -(-self.num_clients // self.num_groups)
    if self.sampling_probability == 1.0:
      return largest
    return poisson_cohort_capacity(largest, self.sampling_probability)

  @property
  def expected_clients_per_round(self) -> float:
    return self.num_clients * self.sampling_probability / self.num_groups

  def __call__(self, round_num: int) -> np.ndarray:
    _check_seed_round(self.seed, round_num)
    group = self.groups[int(round_num) % self.num_groups]
    if self.sampling_probability == 1.0:
      return np.sort(group)
    chosen = round_generator(self.seed, round_num, POISSON_STREAM).random(group.shape[0]) < self.sampling_probability
    return np.sort(group[chosen])
