"""dp_accounting's "failed to converge" lines are silenced while the library's accounting runs, and only then.

The RDP accountant logs ``_compute_log_a_frac failed to converge`` for each Renyi order whose series it gives up on
(the order is left out of the minimum; the epsilon stays a valid bound). Notebook 03's plan (q = 0.1, 30 rounds,
delta 1e-3) triggers it: a direct dp_accounting call logs it (so the test provokes what it claims), the library's
calls do not, and afterwards the ``absl`` logger has exactly the filters it had before.
"""

from __future__ import annotations

import contextlib
import logging

import dp_accounting
from absl import logging as absl_logging

from fedjax_lite import privacy
from fedjax_lite.privacy import quiet_logs

PLAN = dict(rounds=30, delta=1e-3, sampling_probability=0.1)


class _Records(logging.Handler):

  def __init__(self):
    super().__init__(logging.DEBUG)
    self.messages: list[str] = []

  def emit(self, record):
    self.messages.append(record.getMessage())


@contextlib.contextmanager
def absl_records():
  logger = logging.getLogger("absl")
  handler, level = _Records(), logger.level
  logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  try:
    yield handler.messages
  finally:
    logger.removeHandler(handler)
    logger.setLevel(level)


def _non_convergence(messages):
  return [message for message in messages if message.startswith(quiet_logs.NON_CONVERGENCE_MESSAGE)]


def test_dp_accounting_itself_logs_the_lines_for_this_plan():
  event = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(0.5)), 30)
  with absl_records() as messages:
    dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(1e-3)
  assert _non_convergence(messages), "the plan no longer provokes the warning: pick another one"


def test_planning_calibration_and_the_ledger_log_none_of_them():
  filters_before = list(logging.getLogger("absl").filters)
  with absl_records() as messages:
    for z in (0.5, 1.0, 2.0, 4.0):
      privacy.planned_epsilon(z, **PLAN)
    privacy.calibrate_noise_multiplier(2.0, **PLAN)
    privacy.calibrate_noise_multiplier(2.0, accountant="pld", **PLAN)
    run = privacy.sampled_run_events(dp_accounting.GaussianDpEvent(0.5), sampling="poisson",
                                     sampling_probability=0.1)
    privacy.PrivacyLedger(run, delta=1e-3).epsilon_after(30)
  assert _non_convergence(messages) == []
  assert logging.getLogger("absl").filters == filters_before  # scoped: nothing left installed


def test_only_that_message_is_dropped_and_nesting_is_safe():
  with absl_records() as messages:
    with quiet_logs.quiet_rdp_orders():
      with quiet_logs.quiet_rdp_orders():
        absl_logging.warning("%s after 1000 iterations", quiet_logs.NON_CONVERGENCE_MESSAGE)
      absl_logging.warning("%s after 1000 iterations", quiet_logs.NON_CONVERGENCE_MESSAGE)
      absl_logging.warning("Negative Renyi divergence of -1e-3")
    absl_logging.warning("%s outside", quiet_logs.NON_CONVERGENCE_MESSAGE)
  assert messages == ["Negative Renyi divergence of -1e-3", f"{quiet_logs.NON_CONVERGENCE_MESSAGE} outside"]
