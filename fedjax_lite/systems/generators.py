"""Built-in populations of client systems: log-normal speeds and bandwidths (FedScale's model), or constants.

Device speeds and network bandwidths of real phone populations are heavy-tailed: a few slow devices on slow links
take many times the median's time, which is why deadlines and over-selection matter (Bonawitz et al. 2019). The
usual model, and FedScale's (Lai et al. 2022, "FedScale: Benchmarking Model and System Performance of Federated
Learning at Scale", ICML), is log-normal. :func:`lognormal_systems` draws

  ``seconds_per_example_k = m_c * exp(s_c * Z_k)``,  ``download_bps_k = m_b * exp(s_b * W_k)``,
  ``upload_bps_k = upload_ratio * download_bps_k``,

with ``Z_k, W_k`` independent standard normals from ``round_generator(seed, 0, SYSTEMS_STREAM)``, so ``m`` is the
median and ``s`` the standard deviation of the logarithm. Defaults and their sources:

* compute: ``m_c = 0.005 * e = 0.01359`` s per example, ``s_c = 0.6`` -- FedScale's
  ``ClientMetadata.get_completion_time_lognormal`` (``fedscale/cloud/internal/client_metadata.py``), which draws
  ``numpy.random.lognormal(1, 0.6)`` times 0.005 s per sample (its ``mean_seconds_per_sample`` and ``tail_skew``
  defaults, citing the PAPAYA and GFL production papers). The scale is model-specific: set ``m_c`` to your model's
  per-example training time on a median phone.
* bandwidth: ``m_b = 6.1e6`` bit/s, ``s_b = 1.1``, the same in both directions (``upload_ratio = 1``, as FedScale's
  simulator divides upload plus download bits by one ``communication`` rate). FedScale's
  ``client_device_capacity`` trace (MobiPerf WiFi measurements; ``benchmark/dataset/README.md``) has a median
  near 6 Mbit/s with about a quarter of devices under 3 Mbit/s; ``s_b = 1.1`` makes ``P(bps < 3e6) = 0.26`` at that
  median. These two summary figures are the trace as its users report it, not re-measured here (the pickle is
  not redistributed with FedScale's sources): treat them as order-of-magnitude defaults, and load the trace itself
  (:func:`~fedjax_lite.systems.load_trace`) when conclusions depend on it.
"""

from __future__ import annotations

import math

import numpy as np

from fedjax_lite.core import sampling, validation
from fedjax_lite.systems.availability import AlwaysOn, Availability
from fedjax_lite.systems.population import ClientSystems

SYSTEMS_STREAM = 0x5953
FEDSCALE_SECONDS_PER_EXAMPLE_MEDIAN = 0.005 * math.e
FEDSCALE_SECONDS_PER_EXAMPLE_SIGMA = 0.6
FEDSCALE_BANDWIDTH_MEDIAN = 6.1e6
FEDSCALE_BANDWIDTH_SIGMA = 1.1


def lognormal_systems(
    num_clients: int,
    *,
    seed: int = 0,
    seconds_per_example_median: float = FEDSCALE_SECONDS_PER_EXAMPLE_MEDIAN,
    seconds_per_example_sigma: float = FEDSCALE_SECONDS_PER_EXAMPLE_SIGMA,
    bandwidth_median: float = FEDSCALE_BANDWIDTH_MEDIAN,
    bandwidth_sigma: float = FEDSCALE_BANDWIDTH_SIGMA,
    upload_ratio: float = 1.0,
    seconds_per_step: float = 0.0,
    availability: Availability = AlwaysOn(),
) -> ClientSystems:
  """Log-normal compute speeds and bandwidths (see the module docstring for the formula and the defaults' sources).

  Args:
    num_clients: the population's size (clients in its storage order).
    seed: the draws come from ``round_generator(seed, 0, SYSTEMS_STREAM)``: the same seed, the same population.
    seconds_per_example_median: median training seconds per example (> 0).
    seconds_per_example_sigma: standard deviation of its logarithm (>= 0; 0 gives every client the median).
    bandwidth_median: median download bandwidth in bit/s (> 0).
    bandwidth_sigma: standard deviation of its logarithm (>= 0).
    upload_ratio: upload bandwidth / download bandwidth of every client (> 0).
    seconds_per_step: a fixed cost per local step, the same for every client (>= 0).
    availability: when clients are online (default always).

  Example::

    >>> systems = lognormal_systems(1000, seed=0)
    >>> round(float(np.median(systems.download_bits_per_second)) / 1e6, 1)
    6.0
  """
  validation.check_int("num_clients", num_clients, minimum=1)
  validation.check_int("seed", seed, minimum=0)
  validation.check_positive("seconds_per_example_median", seconds_per_example_median)
  validation.check_float("seconds_per_example_sigma", seconds_per_example_sigma, low=0.0)
  validation.check_positive("bandwidth_median", bandwidth_median)
  validation.check_float("bandwidth_sigma", bandwidth_sigma, low=0.0)
  validation.check_positive("upload_ratio", upload_ratio)
  validation.check_float("seconds_per_step", seconds_per_step, low=0.0)
  normals = sampling.round_generator(seed, 0, SYSTEMS_STREAM).standard_normal((2, num_clients))
  per_example = seconds_per_example_median * np.exp(seconds_per_example_sigma * normals[0])
  download = bandwidth_median * np.exp(bandwidth_sigma * normals[1])
  return ClientSystems(seconds_per_example=per_example, download_bits_per_second=download,
                       upload_bits_per_second=upload_ratio * download,
                       seconds_per_step=np.full(num_clients, float(seconds_per_step)), availability=availability)


def constant_systems(
    num_clients: int,
    *,
    seconds_per_example: float = FEDSCALE_SECONDS_PER_EXAMPLE_MEDIAN,
    download_bits_per_second: float = FEDSCALE_BANDWIDTH_MEDIAN,
    upload_bits_per_second: float | None = None,
    seconds_per_step: float = 0.0,
    availability: Availability = AlwaysOn(),
) -> ClientSystems:
  """Every client alike (the defaults are :func:`lognormal_systems`' medians; upload defaults to download)."""
  validation.check_int("num_clients", num_clients, minimum=1)
  validation.check_float("seconds_per_example", seconds_per_example, low=0.0)
  validation.check_positive("download_bits_per_second", download_bits_per_second)
  validation.check_positive("upload_bits_per_second", upload_bits_per_second, allow_none=True)
  validation.check_float("seconds_per_step", seconds_per_step, low=0.0)
  upload = download_bits_per_second if upload_bits_per_second is None else upload_bits_per_second
  return ClientSystems(seconds_per_example=np.full(num_clients, float(seconds_per_example)),
                       download_bits_per_second=np.full(num_clients, float(download_bits_per_second)),
                       upload_bits_per_second=np.full(num_clients, float(upload)),
                       seconds_per_step=np.full(num_clients, float(seconds_per_step)), availability=availability)
