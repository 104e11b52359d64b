"""Federated analytics: statistics of the clients' data computed like a federated round, with optional DP.

Each builder returns a query with a jittable ``compute`` (vectorized over clients, padding slots masked) and the
``dp_accounting`` event of one release (``dp_event()``, for :class:`fedjax_lite.privacy.PrivacyLedger`):

* :func:`federated_mean`, :func:`federated_sum` -- any aggregator (DP, secure, robust) over client values;
  :func:`aggregate_client_statistics` computes the values from packed client data with the client runner;
* :func:`iterative_quantile` -- the quantile estimation process run to convergence; :func:`histogram_quantile` --
  one-shot quantiles from a private histogram;
* :func:`private_histogram` -- Gaussian-noised histograms of L2-clipped client counts;
* :func:`count_sketch_heavy_hitters` -- the items most clients hold, from a private count sketch;
* :func:`randomized_response_histogram`, :func:`randomized_response_heavy_hitters` -- the same under LOCAL DP
  (k-ary randomized response and its unbiased decoder; each client's epsilon in ``dp_event()``).
"""

from fedjax_lite.analytics.aggregate import aggregate_client_statistics, federated_mean, federated_sum
from fedjax_lite.analytics.base import Query
from fedjax_lite.analytics.heavy_hitters import HeavyHitters, SketchQuery, count_sketch_heavy_hitters
from fedjax_lite.analytics.histogram import private_histogram
from fedjax_lite.analytics.local import (
    LocalHeavyHitters,
    randomized_response_heavy_hitters,
    randomized_response_histogram,
)
from fedjax_lite.analytics.quantiles import (
    QuantileEstimate,
    histogram_quantile,
    iterative_quantile,
    quantiles_from_counts,
)

__all__ = [
    "HeavyHitters",
    "LocalHeavyHitters",
    "QuantileEstimate",
    "Query",
    "SketchQuery",
    "aggregate_client_statistics",
    "count_sketch_heavy_hitters",
    "federated_mean",
    "federated_sum",
    "histogram_quantile",
    "iterative_quantile",
    "private_histogram",
    "quantiles_from_counts",
    "randomized_response_heavy_hitters",
    "randomized_response_histogram",
]
