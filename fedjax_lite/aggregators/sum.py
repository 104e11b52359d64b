"""The plain federated sum: ``result = sum_i x_i`` (TFF ``SumFactory``); state ``()``, measurements ``()``.

It is the innermost aggregator of most compositions (the value and weight sums of a mean, the counts of clipping
and zeroing); weights are ignored.
"""

from __future__ import annotations

from fedjax_lite.aggregators.base import Aggregator
from fedjax_lite.core.process import MeasuredOutput


def sum_aggregator() -> Aggregator:
  """``sum_i x_i`` over real clients; ignores weights. State ``()``; measurements ``()``."""
  return Aggregator(
      init=lambda value_template: (),
      broadcast=lambda state: (),
      client=lambda client_params, value, weight, rng: value,
      server=lambda state, total, rng, context: MeasuredOutput(state=state, result=total, measurements=()),
  )
