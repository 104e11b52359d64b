"""Aggregators: each one a client part and a server part, joined by a static combine (``'sum'`` or ``'stack'``).

Building blocks (``sum_aggregator``, ``mean``, ``unweighted_mean``), wrappers that compose like the reference's
factories (``zeroing``, ``clipping``, ``hadamard_rotation``, ``add_debug_measurements``; write your own with
``Inner`` and ``wrapper``), estimation processes for adaptive thresholds, differential privacy (Gaussian, tree and
matrix-factorization DP-FTRL), compression, simulated secure summation, robust statistics (median, trimmed mean,
Krum and multi-Krum), and the recommended presets (``robust_aggregator``, ``dp_aggregator``,
``compression_aggregator``, ``secure_aggregator``).
"""

from fedjax_lite.aggregators.base import (
    STACK,
    SUM,
    AggregationContext,
    Aggregator,
    aggregate_with_keys,
    broadcast_bits,
    client_total,
    client_upload_bits,
    split_rng,
)
from fedjax_lite.aggregators.canaries import insert_canaries
from fedjax_lite.aggregators.debug import add_debug_measurements
from fedjax_lite.aggregators.differential_privacy import (
    ExtractingDpEventFromInitialStateError,
    adaptive_clip_noise_params,
    extract_dp_event,
    gaussian_adaptive,
    gaussian_fixed,
)
from fedjax_lite.aggregators.krum import krum, multi_krum
from fedjax_lite.aggregators.local_dp import local_dp
from fedjax_lite.aggregators.matrix_factorization import dp_matrix_factorization
from fedjax_lite.aggregators.mean import mean, unweighted_mean
from fedjax_lite.aggregators.presets import compression_aggregator, dp_aggregator, robust_aggregator, secure_aggregator
from fedjax_lite.aggregators.estimation import EstimationProcess, as_estimation_process, constant_estimate
from fedjax_lite.aggregators.quantile_estimation import (
    QuantileEstimatorState,
    no_noise_quantile_estimator,
    private_quantile_estimator,
)
from fedjax_lite.aggregators.quantization import BroadcastEncoder, broadcast_encoder, quantize_above_threshold
from fedjax_lite.aggregators.robust import clipping, global_norm, zeroing
from fedjax_lite.aggregators.robust_statistics import coordinate_median, trimmed_mean
from fedjax_lite.aggregators.rotation import hadamard_rotation
from fedjax_lite.aggregators.secure import secure_modular_sum, secure_sum
from fedjax_lite.aggregators.sparsification import (
    Compressor,
    compressed,
    count_sketch,
    random_k,
    random_k_compressor,
    SharedSupport,
    shared_mask_key,
    shared_random_k,
    shared_random_k_compressor,
    sign_compression,
    sign_compressor,
    top_k,
    top_k_compressor,
)
from fedjax_lite.aggregators.sum import sum_aggregator
from fedjax_lite.aggregators.tree_aggregation import tree_aggregation
from fedjax_lite.aggregators.wrapping import Inner, total_upload_bits, wrapper

__all__ = [
    "as_estimation_process",
    "AggregationContext",
    "Aggregator",
    "STACK",
    "SUM",
    "aggregate_with_keys",
    "client_total",
    "Compressor",
    "compressed",
    "BroadcastEncoder",
    "EstimationProcess",
    "ExtractingDpEventFromInitialStateError",
    "Inner",
    "QuantileEstimatorState",
    "adaptive_clip_noise_params",
    "add_debug_measurements",
    "broadcast_bits",
    "broadcast_encoder",
    "client_upload_bits",
    "clipping",
    "compression_aggregator",
    "constant_estimate",
    "coordinate_median",
    "count_sketch",
    "dp_aggregator",
    "dp_matrix_factorization",
    "extract_dp_event",
    "gaussian_adaptive",
    "gaussian_fixed",
    "global_norm",
    "hadamard_rotation",
    "insert_canaries",
    "krum",
    "local_dp",
    "mean",
    "multi_krum",
    "no_noise_quantile_estimator",
    "private_quantile_estimator",
    "quantize_above_threshold",
    "random_k",
    "random_k_compressor",
    "robust_aggregator",
    "secure_aggregator",
    "secure_modular_sum",
    "SharedSupport",
    "shared_mask_key",
    "shared_random_k",
    "shared_random_k_compressor",
    "sign_compression",
    "sign_compressor",
    "secure_sum",
    "split_rng",
    "sum_aggregator",
    "top_k",
    "top_k_compressor",
    "total_upload_bits",
    "tree_aggregation",
    "trimmed_mean",
    "unweighted_mean",
    "wrapper",
    "zeroing",
]
