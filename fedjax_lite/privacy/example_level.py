"""Accounting of example-level DP-SGD inside clients: the epsilon of ONE example of one client's data.

Each local step of ``algorithms.ExampleDp`` training is a Gaussian mechanism of noise multiplier ``z`` on the sum of
the batch's per-example gradients clipped to ``C``. A client with ``n`` examples, batch size ``B`` and ``E`` local
epochs takes ``ceil(E n / B)`` steps per round it takes part in; its example-level guarantee after ``R`` such rounds
composes those steps, under one of three descriptions of how the batches are formed (``sampling``):

* ``'shuffled'`` -- what ``core.pack_clients`` does: every epoch is a shuffled pass, so one example is in exactly
  one batch per epoch and no amplification by sampling is claimed. Under replace-one adjacency (``n`` public) the
  batch holding the example moves by at most ``2C``: one Gaussian mechanism of multiplier ``z / 2`` per epoch
  (dp_accounting ``GaussianDpEvent``), ``E R`` of them. When epochs do not end on batch boundaries (``E > 1`` and
  ``B`` does not divide ``n``) a batch can hold an example twice; the bound then charges each round as one Gaussian
  of multiplier ``z / (2E)`` (all ``E`` appearances in one batch: ``sum_s m_s^2 <= E^2`` for the zCDP of the
  appearances ``m_s`` per step), which is never smaller than the truth.
* ``'poisson'`` -- the guarantee of batches Poisson-sampled with rate ``q = B / n`` at every step (Abadi et al.
  2016's accounting; add-or-remove adjacency): ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` per step.
* ``'without_replacement'`` -- batches of exactly ``B`` of the ``n`` examples drawn without replacement at every step
  (replace-one): ``SampledWithoutReplacementDpEvent(n, B, GaussianDpEvent(z / 2))`` per step.

The two sampled variants state what the guarantee WOULD be with sampled batches (the usual report of DP-SGD, whose
training shuffles); only ``'shuffled'`` describes the batches ``pack_clients`` builds. Every variant is through
``dp_accounting`` (RDP or PLD, :func:`fedjax_lite.privacy.epsilon_of`). The example-level epsilon is separate from
(and composes with) a user-level guarantee of the server's DP aggregator: each is stated for its own unit.
"""

from __future__ import annotations

import dp_accounting
from dp_accounting import NeighboringRelation

from fedjax_lite.core import validation
from fedjax_lite.privacy.accounting import AccountantSpec, RunEvents, run_epsilon, sampled_run_events

EXAMPLE_SAMPLINGS = ("shuffled", "poisson", "without_replacement")


def local_steps(num_examples: int, batch_size: int, num_epochs: int = 1) -> int:
  """``ceil(E n / B)``: the local steps a client of ``n`` examples takes in one round (``core.pack_clients``)."""
  return -(-int(num_examples) * int(num_epochs) // int(batch_size))


def example_level_run_events(noise_multiplier: float, *, num_examples: int, batch_size: int, num_epochs: int = 1,
                             sampling: str = "shuffled") -> RunEvents:
  """The example-level events of ONE client as a function of the rounds it took part in (module docstring).

  Args:
    noise_multiplier: ``z > 0`` of ``ExampleDp``.
    num_examples: the client's ``n >= 1`` examples.
    batch_size: ``B >= 1``, the local batch size (``<= n`` for ``'without_replacement'``).
    num_epochs: ``E >= 1`` local epochs per round.
    sampling: ``'shuffled'`` (the packing's epochs), ``'poisson'`` or ``'without_replacement'``.
  """
  validation.check_positive("noise_multiplier", noise_multiplier)
  n = validation.check_int("num_examples", num_examples, minimum=1)
  batch = validation.check_int("batch_size", batch_size, minimum=1)
  epochs = validation.check_int("num_epochs", num_epochs, minimum=1)
  validation.check_choice("sampling", sampling, EXAMPLE_SAMPLINGS)
  z = float(noise_multiplier)
  if sampling == "shuffled":
    aligned = epochs == 1 or n % batch == 0
    per_round, count = ((dp_accounting.GaussianDpEvent(z / 2.0), epochs) if aligned
                        else (dp_accounting.GaussianDpEvent(z / (2.0 * epochs)), 1))
    return RunEvents(lambda rounds: dp_accounting.SelfComposedDpEvent(per_round, int(rounds) * count),
                     NeighboringRelation.REPLACE_ONE,
                     f"example level, shuffled epochs, z={z:g}, E={epochs}, n={n}, B={batch}")
  steps = local_steps(n, batch, epochs)
  if sampling == "poisson":
    run = sampled_run_events(dp_accounting.GaussianDpEvent(z), sampling="poisson",
                             sampling_probability=min(1.0, batch / n))
  else:
    if batch > n:
      raise ValueError(f"sampling='without_replacement' needs batch_size <= num_examples, got {batch} > {n}.")
    run = sampled_run_events(dp_accounting.GaussianDpEvent(z), sampling="without_replacement", num_clients=n,
                             clients_per_round=batch)
  return RunEvents(lambda rounds: run.event_after(int(rounds) * steps), run.neighboring_relation,
                   f"example level, {sampling} batches of {batch} of {n}, z={z:g}, {steps} steps per round")


def example_level_epsilon(noise_multiplier: float, *, rounds: int, delta: float, num_examples: int, batch_size: int,
                          num_epochs: int = 1, sampling: str = "shuffled", accountant: AccountantSpec = "rdp"
                          ) -> float:
  """Example-level ``epsilon`` at ``delta`` of one client after ``rounds`` rounds it took part in (module
  docstring; arguments as :func:`example_level_run_events`); 0 for ``rounds = 0``.

  Example::

    eps = privacy.example_level_epsilon(1.1, rounds=20, delta=1e-5, num_examples=300, batch_size=20)
  """
  run = example_level_run_events(noise_multiplier, num_examples=num_examples, batch_size=batch_size,
                                 num_epochs=num_epochs, sampling=sampling)
  return run_epsilon(run, rounds, delta, accountant=accountant)
