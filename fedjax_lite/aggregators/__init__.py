"""Aggregators: ``(init, next)`` pairs of pure functions, with a client/server split when they only sum."""

from fedjax_lite.aggregators.base import Aggregator, SumParts, split_rng, sum_based
from fedjax_lite.aggregators.mean import mean, unweighted_mean
from fedjax_lite.aggregators.sum import sum_aggregator

__all__ = [
    "Aggregator",
    "SumParts",
    "mean",
    "split_rng",
    "sum_aggregator",
    "sum_based",
    "unweighted_mean",
]
