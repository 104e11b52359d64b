"""Client sampling per round, reproducible from ``(seed, round_num)`` alone.

Each round's cohort is drawn from a numpy generator seeded with ``(seed, round_num, stream)``, so it does not
depend on which rounds ran before: a resumed run samples exactly the cohorts the uninterrupted run would have
(TFF's ``build_uniform_sampling_fn`` has the same property).
"""

from __future__ import annotations

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
