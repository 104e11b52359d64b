"""The recommended aggregators, with the reference's exact defaults and nesting (TFF ``tff.learning``
``robust_aggregator``, ``dp_aggregator``, ``compression_aggregator``, ``secure_aggregator``).

The client-side order is zeroing, then clipping, then everything else:

* zeroing: L-infinity norm, threshold ``2 * Q_0.98 + 1`` of the clients' norms, estimated without noise from
  ``C_0 = 10`` with learning rate ``ln 10`` (so it starts at 21 and can move by a factor of 10 a round);
* clipping: L2 norm at the estimated 0.8-quantile, from ``C_0 = 1`` with learning rate 0.2.
"""

from __future__ import annotations

import math
from typing import Callable

from fedjax_lite.aggregators.base import Aggregator
from fedjax_lite.aggregators.mean import mean, unweighted_mean
from fedjax_lite.aggregators.quantile_estimation import no_noise_quantile_estimator
from fedjax_lite.aggregators.robust import clipping, zeroing

DebugFn = Callable[[Aggregator], Aggregator]


def default_zeroing_estimator(*, secure_estimation: bool = False):
  """``2 * Q_0.98 + 1`` of the norms, estimated from 10.0 with learning rate ``ln 10``."""
  return no_noise_quantile_estimator(10.0, 0.98, math.log(10.0), multiplier=2.0, increment=1.0,
                                     secure_estimation=secure_estimation)


def default_clipping_estimator(*, secure_estimation: bool = False):
  """``Q_0.8`` of the norms, estimated from 1.0 with learning rate 0.2."""
  return no_noise_quantile_estimator(1.0, 0.8, 0.2, secure_estimation=secure_estimation)


def default_zeroing(inner: Aggregator, **kwargs) -> Aggregator:
  """The reference's adaptive L-infinity zeroing around ``inner``."""
  return zeroing(default_zeroing_estimator(), inner, norm_order=math.inf, **kwargs)


def default_clipping(inner: Aggregator, **kwargs) -> Aggregator:
  """The reference's adaptive L2 clipping around ``inner``."""
  return clipping(default_clipping_estimator(), inner, **kwargs)


def check_flags(**flags) -> None:
  """Every keyword is a bool (the presets' switches)."""
  for name, value in flags.items():
    if not isinstance(value, bool):
      raise TypeError(f"{name} must be a bool, got {type(value).__name__}.")


def robust_aggregator(*, zeroing: bool = True, clipping: bool = True, weighted: bool = True,
                      debug_measurements_fn: DebugFn | None = None) -> Aggregator:
  """``zeroing(Linf, q=0.98) o clipping(L2, q=0.8) o [debug](mean or unweighted_mean)``.

  Example::

    aggregator = robust_aggregator()
    process = fed_avg(model, client_learning_rate=0.1, aggregator=aggregator)
  """
  check_flags(zeroing=zeroing, clipping=clipping, weighted=weighted)
  if debug_measurements_fn is not None and not callable(debug_measurements_fn):
    raise TypeError("debug_measurements_fn must be a function Aggregator -> Aggregator.")
  aggregator = mean() if weighted else unweighted_mean()
  if debug_measurements_fn is not None:
    aggregator = debug_measurements_fn(aggregator)
  if clipping:
    aggregator = default_clipping(aggregator)
  if zeroing:
    aggregator = default_zeroing(aggregator)
  return aggregator
