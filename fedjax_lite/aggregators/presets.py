"""The recommended aggregators, with the reference's exact defaults and nesting (TFF ``tff.learning``
``robust_aggregator``, ``dp_aggregator``, ``compression_aggregator``, ``secure_aggregator``).

The client-side order is zeroing, then clipping, then everything else:

* zeroing: L-infinity norm, threshold ``2 * Q_0.98 + 1`` of the clients' norms, estimated without noise from
  ``C_0 = 10`` with learning rate ``ln 10`` (so it starts at 21 and can move by a factor of 10 a round);
* clipping: L2 norm at the estimated 0.8-quantile, from ``C_0 = 1`` with learning rate 0.2.

All four presets live here, above the primitives (sums, means, quantization, rotation, secure sums, DP) and the
wrappers (zeroing, clipping) they compose, so the package imports only downward: ``estimation`` -> ``wrapping``
-> ``secure`` -> ``quantile_estimation`` -> wrappers -> ``presets``.

``compression_aggregator`` (TFF-0.82 ``tff.learning.compression_aggregator``) is ``robust_aggregator`` with a
quantizing value sum inside the mean, outer to inner::

  zeroing(Linf, adaptive q = 0.98)          x_i <- 0 if max|x_i| > 2 * Q_0.98 + 1   (starts at 21)
    clipping(L2, adaptive q = 0.8)          x_i <- x_i * C / ||x_i||_2 if larger    (starts at 1)
      [debug_measurements_fn](
        mean(value_sum = [hadamard_rotation](quantize_above_threshold(8 bits, 20000))))

so in the weighted form each client quantizes its WEIGHTED clipped update ``w_i * Delta_i`` (the mean scales before
its value sum) and the result is ``sum_i Q(w_i Delta_i) / sum_i w_i``; the unweighted form quantizes ``Delta_i``
and divides by the number of clients. The norm estimators are the reference's (Andrew et al. 2021, "Differentially
Private Learning with Adaptive Clipping", arXiv:1905.03871): zeroing ``no_noise(10.0, 0.98, ln 10,
multiplier=2.0, increment=1.0)``, clipping ``no_noise(1.0, 0.8, 0.2)``. The quantizer is unbiased stochastic
rounding on a per-client, per-leaf min/max grid, applied to leaves with more than ``threshold`` elements
(``fedjax_lite.aggregators.quantization``). ``rotation=True`` adds a randomized Hadamard rotation just outside
the quantizer (Suresh et al. 2017, arXiv:1611.00429), which shrinks the quantization error of spiky updates;
the threshold then applies to the padded power-of-two lengths.

Upload per client (``upload_bits``): the quantizer's exact payload for the value plus a float32 weight (or int32
count) and the two wrappers' norm records and counts; for the original FedAvg CNN (1,663,370 float32 parameters)
this is about 3.95x less than the uncompressed mean (TFF's sizing reported 3.47x, counting 28-bit packed words).
"""

from __future__ import annotations

import math
from typing import Callable

from fedjax_lite.aggregators import robust
from fedjax_lite.aggregators.base import Aggregator
from fedjax_lite.aggregators.differential_privacy import gaussian_adaptive
from fedjax_lite.aggregators.mean import mean, unweighted_mean
from fedjax_lite.aggregators.quantile_estimation import no_noise_quantile_estimator
from fedjax_lite.aggregators.quantization import quantize_above_threshold
from fedjax_lite.aggregators.robust import clipping, zeroing
from fedjax_lite.aggregators.rotation import hadamard_rotation
from fedjax_lite.aggregators.secure import secure_sum
from fedjax_lite.core import validation

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


def dp_aggregator(noise_multiplier: float, clients_per_round: float, *, zeroing: bool = True) -> Aggregator:
  """The reference's DP preset: ``zeroing(Linf, adaptive 0.98-quantile) o gaussian_adaptive(z, m)``.

  Unweighted: use it with ``fed_avg(..., weighting='uniform')``. The adaptive clip starts at 0.1 with target
  quantile 0.5, learning rate 0.2 and ``sigma_b = m / 20`` (Andrew et al. 2021's recommendation, TFF defaults).
  """
  dp = gaussian_adaptive(noise_multiplier, clients_per_round)
  return default_zeroing(dp) if zeroing else dp


def compression_aggregator(
    *,
    zeroing: bool = True,
    clipping: bool = True,
    weighted: bool = True,
    debug_measurements_fn: Callable[[Aggregator], Aggregator] | None = None,
    quantization_bits: int = 8,
    threshold: int = 20000,
    rotation: bool = False,
) -> Aggregator:
  """Adaptive zeroing and clipping around a mean whose value sum is quantized; see the module docstring.

  Args:
    zeroing: wrap with adaptive L-inf zeroing (target quantile 0.98).
    clipping: wrap with adaptive L2 clipping (target quantile 0.8).
    weighted: the weighted mean (clients quantize ``w_i * x_i``) or the unweighted mean.
    debug_measurements_fn: ``fn(aggregator) -> aggregator`` wrapped around the mean (e.g. to add measurements).
    quantization_bits: bits per quantized element, an int in ``[1, 16]``.
    threshold: an int ``>= 0``; leaves with at most this many elements are summed exactly.
    rotation: rotate with :func:`hadamard_rotation` before quantizing.

  Example::

    >>> import jax, jax.numpy as jnp
    >>> aggregator = compression_aggregator(threshold=2)
    >>> values = {'w': jnp.full((3, 4), 0.1)}
    >>> state = aggregator.init({'w': jnp.zeros(4)})
    >>> output = aggregator.next(state, values, jnp.ones(3), jax.random.key(0))
    >>> bool(jnp.allclose(output.result['w'], 0.1))
    True
  """
  check_flags(zeroing=zeroing, clipping=clipping, weighted=weighted, rotation=rotation)
  if debug_measurements_fn is not None and not callable(debug_measurements_fn):
    raise TypeError(f"debug_measurements_fn must be None or a callable, got {type(debug_measurements_fn).__name__}.")
  quantization_bits = validation.check_int("quantization_bits", quantization_bits, minimum=1, maximum=16)
  threshold = validation.check_int("threshold", threshold, minimum=0)

  value_sum = quantize_above_threshold(quantization_bits, threshold)
  if rotation:
    value_sum = hadamard_rotation(value_sum)
  aggregator = mean(value_sum=value_sum) if weighted else unweighted_mean(value_sum=value_sum)
  if debug_measurements_fn is not None:
    aggregator = debug_measurements_fn(aggregator)
    if not isinstance(aggregator, Aggregator):
      raise TypeError(f"debug_measurements_fn must return an Aggregator, got {type(aggregator).__name__}.")
  if clipping:
    aggregator = default_clipping(aggregator)
  if zeroing:
    aggregator = default_zeroing(aggregator)
  return aggregator


def secure_aggregator(*, zeroing: bool = True, clipping: bool = True, weighted: bool = True) -> Aggregator:
  """The reference's secure preset (TFF ``tff.learning.secure_aggregator``); outer to inner::

    zeroing(L-inf, no_noise_quantile_estimator(10.0, 0.98, ln 10, multiplier=2, increment=1, secure_estimation=True),
            zeroed_count_sum=secure_sum(1, 0))
    clipping(L2, no_noise_quantile_estimator(1.0, 0.8, 0.2, secure_estimation=True),
             clipped_count_sum=secure_sum(1, 0))
    mean(value_sum=secure_sum(no_noise_quantile_estimator(50.0, 0.95, 1.0, multiplier=2, secure_estimation=True)),
         weight_sum=secure_sum(2^20 - 1.0, 0.0))

  The secure value sum's bound is ``U = 2 * Q_0.95(max_i |w_i x_i|)``, starting at 100, with ``L = -U``. Weights
  are clipped to ``[0, 2^20 - 1]``. Unweighted, the mean is ``unweighted_mean(value_sum=<same>,
  count_sum=secure_sum(1, 0))``.

  Args:
    zeroing: wrap in adaptive zeroing (threshold ``2 Q_0.98 + 1`` of the clients' L-inf norms, starting at 21).
    clipping: wrap in adaptive L2 clipping (the 0.8 quantile of the clients' L2 norms, starting at 1).
    weighted: weighted mean (default) or unweighted mean.
  """
  check_flags(zeroing=zeroing, clipping=clipping, weighted=weighted)
  value_sum = secure_sum(no_noise_quantile_estimator(50.0, 0.95, 1.0, multiplier=2.0, secure_estimation=True))
  if weighted:
    aggregator = mean(value_sum=value_sum, weight_sum=secure_sum(float(2**20 - 1), 0.0))
  else:
    aggregator = unweighted_mean(value_sum=value_sum, count_sum=secure_sum(1, 0))
  if clipping:
    aggregator = robust.clipping(default_clipping_estimator(secure_estimation=True), aggregator,
                                 clipped_count_sum=secure_sum(1, 0))
  if zeroing:
    aggregator = robust.zeroing(default_zeroing_estimator(secure_estimation=True), aggregator,
                                norm_order=math.inf, zeroed_count_sum=secure_sum(1, 0))
  return aggregator
