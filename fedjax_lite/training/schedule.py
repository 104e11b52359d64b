"""When a training run evaluates, checkpoints and stops: the cadence shared by the drivers and the recorder.

:func:`~fedjax_lite.training.run_training` runs rounds ``0 .. num_rounds - 1``. After round ``r`` (``r + 1`` rounds
completed) it evaluates when ``evaluate_every`` divides ``r + 1`` or the round is the last one; it checkpoints when
``checkpoint_every`` divides ``r + 1`` or the run ends there; and with a privacy ledger the last round is the last one
its budget allows. The scanned driver cuts its dispatches at exactly these rounds, so both drivers evaluate and
checkpoint the same states.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class RoundSchedule:
  """The cadence of one run.

  Attributes:
    num_rounds: rounds of the run.
    evaluate_every: rounds between evaluations, or None without evaluation.
    checkpoint_every: rounds between checkpoints, or None without checkpoints.
    privacy: the run's :class:`~fedjax_lite.privacy.PrivacyLedger`, or None.
  """

  num_rounds: int
  evaluate_every: int | None = None
  checkpoint_every: int | None = None
  privacy: Any = None

  def allows(self, rounds: int) -> bool:
    """Whether the privacy budget allows running ``rounds`` rounds in all (always, without a ledger)."""
    return self.privacy is None or self.privacy.allows(rounds)

  def is_last(self, round_num: int) -> bool:
    """Round ``round_num`` is the run's last: the end, or the budget forbids the next one."""
    return round_num + 1 == self.num_rounds or not self.allows(round_num + 2)

  def evaluates_after(self, round_num: int) -> bool:
    return self.evaluate_every is not None and ((round_num + 1) % self.evaluate_every == 0 or self.is_last(round_num))

  def checkpoints_after(self, rounds_completed: int) -> bool:
    """A regular checkpoint (stops and signals add their own)."""
    return self.checkpoint_every is not None and (rounds_completed % self.checkpoint_every == 0
                                                  or rounds_completed == self.num_rounds)

  def budget_message(self, rounds_done: int) -> str:
    """Why the run stops after ``rounds_done`` rounds for its privacy budget."""
    ledger = self.privacy
    return (f"privacy budget: another round would bring epsilon to {ledger.epsilon_after(rounds_done + 1):.4g} > "
            f"{ledger.epsilon_budget:g} at delta {ledger.delta:g}; stopped after {rounds_done} rounds at "
            f"epsilon {ledger.epsilon_after(rounds_done):.4g}")

  def scan_length(self, rounds_per_dispatch: int) -> int:
    """The length of every scan of the scanned driver: no dispatch is longer (shorter ones skip their end)."""
    return min(rounds_per_dispatch, self.num_rounds, self.evaluate_every or self.num_rounds,
               self.checkpoint_every or self.num_rounds)

  def dispatch_length(self, first_round: int, rounds_per_dispatch: int) -> int:
    """Rounds of the dispatch starting at ``first_round``: at most ``rounds_per_dispatch``, ending at the next
    evaluation round, checkpoint round, the last round and the last round the privacy budget allows."""
    end = min(first_round + rounds_per_dispatch, self.num_rounds)
    for every in (self.evaluate_every, self.checkpoint_every):
      if every is not None:
        end = min(end, (first_round // every + 1) * every)
    if self.privacy is not None:
      for rounds_done in range(first_round + 1, end):
        if not self.allows(rounds_done + 1):
          return rounds_done - first_round
    return end - first_round
