"""Privacy accounting speed and accuracy: PLD epsilon vs its discretization at long horizons, and the time of
``calibrate_noise_multiplier(accountant='pld')`` (bracketed from the RDP answer).

Run: ``python benchmarks/privacy_accounting.py`` (about a minute on a 2-core CPU). Not a test: timings depend on
the machine.
"""

from __future__ import annotations

import time

import dp_accounting

from fedjax_lite.privacy import calibrate_noise_multiplier, epsilon_of, planned_epsilon

DELTA = 1e-5


def pld_epsilon(event, interval):
  accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=interval)
  accountant.compose(event)
  return accountant.get_epsilon(DELTA)


def main():
  print("PLD epsilon by discretization interval (Poisson-sampled Gaussian, delta 1e-5)")
  for rounds, q, z in ((10_000, 0.001, 0.8), (3_000, 0.005, 0.7), (100, 0.01, 1.0)):
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    fixed = {h: pld_epsilon(event, h) for h in (1e-2, 1e-3, 1e-4)}
    start = time.perf_counter()
    ours = epsilon_of(event, DELTA, accountant="pld")
    seconds = time.perf_counter() - start
    print(f"  T={rounds} q={q} z={z}: " + ", ".join(f"h={h:g}: {e:.5f}" for h, e in fixed.items())
          + f"; default accuracy (1%): {ours:.5f} in {seconds:.2f} s")
  plan = dict(rounds=1000, delta=DELTA, sampling="poisson", sampling_probability=0.01)
  for accountant in ("rdp", "pld"):
    start = time.perf_counter()
    z = calibrate_noise_multiplier(2.0, accountant=accountant, **plan)
    seconds = time.perf_counter() - start
    print(f"calibrate_noise_multiplier(2.0, T=1000, q=0.01, accountant={accountant!r}): z = {z:.4f} "
          f"(epsilon {planned_epsilon(z, accountant=accountant, **plan):.4f}) in {seconds:.1f} s")


if __name__ == "__main__":
  main()
