"""The federated vocabulary, free of any algorithm: records, the process template, pytree math, placement,
federated data (partitioning, sampling, packing), parameter partitions (global / local / frozen) and the client
runner."""

from fedjax_lite.core.client_state import ClientStateStore
from fedjax_lite.core.cpu import configure_cpu, usable_cores
from fedjax_lite.core.device_rounds import (
    DevicePoissonSampler,
    DevicePopulation,
    DeviceShuffledCyclicSampler,
    DeviceUniformSampler,
    build_scanned_rounds,
    device_sampler,
)
from fedjax_lite.core.federated_data import FederatedData
from fedjax_lite.core.model import (
    Model,
    accuracy_metric,
    finalize_metric_sums,
    masked_loss_and_metric_sums,
    masked_loss_metric_sums_and_state,
    softmax_cross_entropy_loss,
    split_model_state,
    with_model_state,
)
from fedjax_lite.core.packing import ClientSpec, bucket_num_steps, max_num_steps, pack_centralized, pack_clients
from fedjax_lite.core.param_partition import (
    FROZEN,
    GLOBAL,
    LOCAL,
    PARAM_LABELS,
    count_params,
    label_params,
    merge_params,
    overlay_params,
    partial_model,
    partition_optimizer,
    path_names,
    select_params,
    split_params,
)
from fedjax_lite.core.partition import dirichlet_partition, iid_partition, partition_dataset, shard_partition
from fedjax_lite.core.placement import broadcast, federated_mean, federated_sum, map_clients
from fedjax_lite.core.process import MeasuredOutput, Process, RoundOutput
from fedjax_lite.core.records import ClientOutput
from fedjax_lite.core.runner import Runner, client_mask, client_mesh, host_client_mesh, run_clients
from fedjax_lite.core.sampling import (
    CyclicSampler,
    PoissonSampler,
    ShuffledCyclicSampler,
    UniformSampler,
    poisson_cohort_capacity,
    poisson_sample_clients,
    sample_clients,
)
from fedjax_lite.core.tree import tree_all_finite, tree_select, tree_size_bits

__all__ = [
    "FROZEN",
    "GLOBAL",
    "LOCAL",
    "PARAM_LABELS",
    "count_params",
    "label_params",
    "masked_loss_metric_sums_and_state",
    "merge_params",
    "overlay_params",
    "partial_model",
    "partition_optimizer",
    "path_names",
    "select_params",
    "split_model_state",
    "split_params",
    "with_model_state",
    "configure_cpu",
    "host_client_mesh",
    "usable_cores",
    "CyclicSampler",
    "PoissonSampler",
    "ShuffledCyclicSampler",
    "UniformSampler",
    "poisson_cohort_capacity",
    "poisson_sample_clients",
    "ClientOutput",
    "ClientStateStore",
    "DevicePoissonSampler",
    "DevicePopulation",
    "DeviceShuffledCyclicSampler",
    "DeviceUniformSampler",
    "build_scanned_rounds",
    "device_sampler",
    "ClientSpec",
    "FederatedData",
    "MeasuredOutput",
    "Model",
    "Process",
    "RoundOutput",
    "Runner",
    "accuracy_metric",
    "broadcast",
    "bucket_num_steps",
    "client_mask",
    "client_mesh",
    "dirichlet_partition",
    "federated_mean",
    "federated_sum",
    "finalize_metric_sums",
    "iid_partition",
    "map_clients",
    "masked_loss_and_metric_sums",
    "max_num_steps",
    "pack_centralized",
    "pack_clients",
    "partition_dataset",
    "run_clients",
    "sample_clients",
    "shard_partition",
    "softmax_cross_entropy_loss",
    "tree_all_finite",
    "tree_select",
    "tree_size_bits",
]
