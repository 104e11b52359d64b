"""Silences dp_accounting's log lines that carry no information, only while this library's accounting runs.

Where this sits: around every call of :mod:`fedjax_lite.privacy.accounting` into ``dp_accounting``'s RDP accountant
(an epsilon, a calibration, the ledger's shortcut).

Why: the RDP accountant evaluates the Poisson-subsampled Gaussian at each of its ~60 default Renyi orders; at large
fractional orders the series of ``_compute_log_a_frac`` does not converge within its iteration cap, and
dp_accounting then logs ``WARNING:absl:_compute_log_a_frac failed to converge ...`` and leaves that order out of the
minimum over orders. The epsilon it returns is still a valid upper bound (a minimum over the remaining orders), and
those orders are never the minimizing ones in the regimes where it happens, so the line says nothing the user can
act on -- yet one PLD calibration printed 58 of them. (Its other warnings, a negative Renyi divergence from
numerically extreme events, do carry information and are kept.)

How: a :class:`logging.Filter` on the ``absl`` logger that drops exactly that message, installed for the duration of
the call (:func:`quiet_rdp_orders`) and removed afterwards -- no global logging setting changes, and a direct call
of ``dp_accounting`` outside this library logs as before.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Callable, Iterator, TypeVar

__all__ = ["NON_CONVERGENCE_MESSAGE", "quiet_rdp_orders", "quiet_accounting"]

# The start of dp_accounting's message (rdp_privacy_accountant._compute_log_a_frac).
NON_CONVERGENCE_MESSAGE = "_compute_log_a_frac failed to converge"
_ABSL_LOGGER_NAME = "absl"

Function = TypeVar("Function", bound=Callable)


class _DropNonConvergence(logging.Filter):
  """Drops the records of the RDP order that did not converge; passes every other record."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(NON_CONVERGENCE_MESSAGE)


@contextlib.contextmanager
def quiet_rdp_orders() -> Iterator[None]:
  """Within the ``with`` block, dp_accounting's "failed to converge" lines are not logged (every other line is).

  Re-entrant: each entry installs its own filter object and removes only that one.
  """
  logger = logging.getLogger(_ABSL_LOGGER_NAME)
  dropper = _DropNonConvergence()
  logger.addFilter(dropper)
  try:
    yield
  finally:
    logger.removeFilter(dropper)


def quiet_accounting(function: Function) -> Function:
  """Decorator: runs ``function`` inside :func:`quiet_rdp_orders`."""

  @functools.wraps(function)
  def wrapped(*args, **kwargs):
    with quiet_rdp_orders():
      return function(*args, **kwargs)

  return wrapped  # type: ignore[return-value]
