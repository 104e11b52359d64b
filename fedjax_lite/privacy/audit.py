"""Privacy auditing in simulation: one-shot empirical privacy estimation with random canary clients.

Andrew, Kairouz, Oh, Oprea, McMahan & Suriyakumar 2024, "One-shot Empirical Privacy Estimation for Federated
Learning" (ICLR; arXiv:2302.03098). Insert ``k`` canary clients whose update is a fixed random direction (uniform
on the sphere, scaled to the clip: :func:`canary_directions`; ``aggregators.insert_canaries`` adds them to a
round), train ONCE, and compare the final model delta ``Delta = theta_0 - theta_T`` (the updates' orientation) with each inserted canary and
with ``k'`` held-out canaries that never took part. In high dimension a held-out direction is nearly orthogonal to
everything: its cosine with ``Delta`` is about ``N(0, 1/d)``; an inserted canary's cosine is shifted by what the
model remembers of it. With ``m_in, m_out, s_out`` the means and the held-out standard deviation of the cosines,
the canaries' distinguishability is that of ``N(0, 1)`` and ``N(mu, 1)``, ``mu = (m_in - m_out) / s_out``, and the
estimate is the epsilon of ``mu``-Gaussian DP at ``delta`` (Dong, Roth & Su 2019, Cor. 2.13:
``delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)``).

:func:`audit` returns

* ``epsilon_estimate``: the paper's point estimate (not a bound: for a run whose last model carries everything the
  accountant counts, e.g. the plain Gaussian mechanism summed over rounds, it sits AT the accountant's epsilon);
* ``epsilon_lower_bound``: the same at a one-sided ``1 - significance`` confidence lower bound of ``mu`` (normal
  interval of ``m_in - m_out`` and a chi-square upper bound of ``s_out``, Bonferroni-split), assuming the scores
  are Gaussian as the paper does;
* ``epsilon_lower_bound_clopper_pearson``: a distribution-free lower bound at the same confidence from the scores'
  true/false positive rates (Jagielski et al. 2020; jax_privacy's ``CanaryScoreAuditor.epsilon_clopper_pearson``,
  needs the ``[dp_mf]`` extra; None without it).

A lower bound above the accountant's epsilon means a bug in the mechanism or in its accounting.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from scipy import optimize, stats

from fedjax_lite.core import validation
from fedjax_lite.privacy.accounting import check_delta

from fedjax_lite.core.tree import PyTree


def canary_directions(rng: jax.Array, template: PyTree, num_canaries: int, norm: float = 1.0) -> PyTree:
  """``num_canaries`` independent directions uniform on the sphere of radius ``norm`` in the space of
  ``template``'s leaves taken together (float32), stacked on a leading canary axis."""
  validation.check_int("num_canaries", num_canaries, minimum=1)
  validation.check_positive("norm", norm)
  leaves, treedef = jax.tree.flatten(template)
  sizes = [int(np.prod(jnp.shape(leaf), dtype=np.int64)) for leaf in leaves]
  flat = jax.random.normal(rng, (num_canaries, sum(sizes)), jnp.float32)
  flat = flat * (norm / jnp.linalg.norm(flat, axis=1, keepdims=True))
  pieces = jnp.split(flat, np.cumsum(sizes)[:-1], axis=1)
  return jax.tree.unflatten(treedef, [p.reshape((num_canaries,) + tuple(jnp.shape(leaf)))
                                      for p, leaf in zip(pieces, leaves)])


def canary_cosines(model_delta: PyTree, canaries: PyTree) -> np.ndarray:
  """The cosine of ``model_delta`` with each canary (leading axis), float64 ``[num_canaries]``."""
  delta = np.concatenate([np.asarray(leaf, np.float64).ravel() for leaf in jax.tree.leaves(model_delta)])
  stacked = np.concatenate([np.asarray(leaf, np.float64).reshape(np.shape(leaf)[0], -1)
                            for leaf in jax.tree.leaves(canaries)], axis=1)
  if stacked.shape[1] != delta.size:
    raise ValueError(f"canaries must have the model delta's {delta.size} coordinates per canary, got "
                     f"{stacked.shape[1]}.")
  norms = np.linalg.norm(stacked, axis=1) * np.linalg.norm(delta)
  if not np.all(np.isfinite(norms)) or np.any(norms == 0):
    raise ValueError("model_delta and every canary must be finite and non-zero.")
  return stacked @ delta / norms


def gdp_epsilon(mu: float, delta: float) -> float:
  """The epsilon of ``mu``-Gaussian DP at ``delta`` (Dong, Roth & Su 2019, Cor. 2.13); 0 for ``mu <= 0``."""
  check_delta(delta)
  if mu <= 0:
    return 0.0

  def gap(epsilon):
    return (stats.norm.cdf(-epsilon / mu + mu / 2) - math.exp(epsilon) * stats.norm.cdf(-epsilon / mu - mu / 2)
            - delta)

  if gap(0.0) <= 0:
    return 0.0
  high = 1.0
  while gap(high) > 0:
    high *= 2
  return float(optimize.brentq(gap, 0.0, high, xtol=1e-10))


@dataclasses.dataclass(frozen=True)
class AuditResult:
  """What :func:`audit` found (module docstring).

  Attributes:
    epsilon_estimate: Andrew et al.'s one-shot estimate.
    epsilon_lower_bound: at a ``1 - significance`` confidence lower bound of ``mu`` (Gaussian scores).
    epsilon_lower_bound_clopper_pearson: jax_privacy's distribution-free bound, or None without jax_privacy.
    mu_estimate, mu_lower_bound: the Gaussian-DP parameter and its lower confidence bound.
    inserted_cosines, held_out_cosines: the scores.
    delta, significance: as given.
  """

  epsilon_estimate: float
  epsilon_lower_bound: float
  epsilon_lower_bound_clopper_pearson: float | None
  mu_estimate: float
  mu_lower_bound: float
  inserted_cosines: np.ndarray
  held_out_cosines: np.ndarray
  delta: float
  significance: float


def audit(model_delta: PyTree, inserted_canaries: PyTree, held_out_canaries: PyTree, *, delta: float,
          significance: float = 0.05) -> AuditResult:
  """One-shot empirical privacy estimation (Andrew et al. 2024) from the final model delta; module docstring.

  Args:
    model_delta: the released total in the canaries' orientation: the sum of the aggregated updates, e.g.
      ``theta_0 - theta_T`` for a server SGD step on pseudo-gradients (``update = initial - final``).
    inserted_canaries: the canary updates that took part (leading canary axis, >= 2).
    held_out_canaries: canaries drawn the same way that never took part (>= 2).
    delta: the delta the epsilons are stated at, in (0, 1).
    significance: ``alpha`` in (0, 0.5): the lower bounds hold with probability ``1 - alpha``.

  Example::

    canaries = privacy.canary_directions(jax.random.key(7), params, 200, norm=clip)
    inserted, held_out = jax.tree.map(lambda c: c[:100], canaries), jax.tree.map(lambda c: c[100:], canaries)
    # ... train with aggregators.insert_canaries(aggregator, inserted) ...
    result = privacy.audit(final_delta, inserted, held_out, delta=1e-5)
  """
  check_delta(delta)
  validation.check_float("significance", significance, low=0.0, high=0.5, low_inclusive=False,
                         high_inclusive=False)
  inserted = canary_cosines(model_delta, inserted_canaries)
  held_out = canary_cosines(model_delta, held_out_canaries)
  if inserted.size < 2 or held_out.size < 2:
    raise ValueError("audit needs at least 2 inserted and 2 held-out canaries.")
  spread = float(np.std(held_out, ddof=1))
  difference = float(inserted.mean() - held_out.mean())
  mu = difference / spread
  standard_error = math.sqrt(np.var(inserted, ddof=1) / inserted.size + spread ** 2 / held_out.size)
  difference_low = difference - stats.norm.ppf(1 - significance / 2) * standard_error
  spread_high = spread * math.sqrt((held_out.size - 1) / stats.chi2.ppf(significance / 2, held_out.size - 1))
  mu_low = max(0.0, difference_low / spread_high)
  clopper_pearson = None
  try:
    from jax_privacy import auditing
  except ImportError:
    auditing = None
  if auditing is not None:
    clopper_pearson = float(auditing.CanaryScoreAuditor(inserted, held_out).epsilon_clopper_pearson(
        significance, delta))
  return AuditResult(gdp_epsilon(mu, delta), gdp_epsilon(mu_low, delta), clopper_pearson, mu, mu_low, inserted,
                     held_out, float(delta), float(significance))
