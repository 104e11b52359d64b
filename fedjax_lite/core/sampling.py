"""Client sampling per round, reproducible from ``(seed, round_num)`` alone.

Each round's cohort is drawn from a numpy generator seeded with ``(seed, round_num, stream)``, so it does not
depend on which rounds ran before: a resumed run samples exactly the cohorts the uninterrupted run would have
(TFF's ``build_uniform_sampling_fn`` has the same property).
"""

from __future__ import annotations

import numpy as np

# Distinct streams keep the cohort draw independent of other host-side randomness of the same round.
SAMPLING_STREAM = 0x5A3D
PACKING_STREAM = 0x9AC4


def round_generator(seed: int, round_num: int, stream: int) -> np.random.Generator:
  """A numpy generator for one purpose (``stream``) in one round of one run."""
  return np.random.default_rng([int(seed), int(round_num), int(stream)])


def _check_seed_round(seed: int, round_num: int) -> None:
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be a non-negative int, got {seed!r}.")
  if not isinstance(round_num, (int, np.integer)) or round_num < 0:
    raise ValueError(f"round_num must be a non-negative int, got {round_num!r}.")


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
  if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
    raise ValueError(f"num_clients must be an int >= 1, got {num_clients!r}.")
  if not isinstance(cohort_size, (int, np.integer)) or cohort_size < 1:
    raise ValueError(f"cohort_size must be an int >= 1, got {cohort_size!r}.")
  if not replace and cohort_size > num_clients:
    raise ValueError(
        f"cohort_size ({cohort_size}) must be <= num_clients ({num_clients}) when sampling without replacement."
    )
  _check_seed_round(seed, round_num)
  generator = round_generator(seed, round_num, SAMPLING_STREAM)
  return generator.choice(num_clients, size=cohort_size, replace=replace).astype(np.int64)
