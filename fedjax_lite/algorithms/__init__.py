"""Federated algorithms, each a ``Process(init, next)``: short configurations of one round template.

:func:`build_round` composes a round from its four parts (distributor, client work, aggregator, finalizer);
every algorithm here is such a configuration, read like optax's ``alias.py``.
"""

from fedjax_lite.algorithms.compressed_uploads import ErrorFeedbackState, compressing_work
from fedjax_lite.algorithms.ditto import ditto
from fedjax_lite.algorithms.dp_fed_avg import PrivateTraining, dp_fed_avg, dp_ftrl
from fedjax_lite.algorithms.evaluation import (
    centralized_evaluation,
    client_distribution,
    evaluate_clients,
    fairness_metrics,
    federated_evaluation,
)
from fedjax_lite.algorithms.example_dp import ExampleDp
from fedjax_lite.algorithms.fed_dyn import FedDynServerState, fed_dyn
from fedjax_lite.algorithms.fed_avg import FED_AVG_OPTIONS, fed_avg, fed_avg_options, local_training_work
from fedjax_lite.algorithms.fed_buff import FedBuff, FedBuffState, fed_buff, inverse_sqrt_staleness, staleness_work
from fedjax_lite.algorithms.fed_bn import batch_norm_labels, fed_bn
from fedjax_lite.algorithms.fed_per import fed_per, fed_rep
from fedjax_lite.algorithms.fed_recon import DatasetSplit, fed_recon
from fedjax_lite.algorithms.fed_recon_eval import fed_recon_evaluation
from fedjax_lite.algorithms.fed_kmeans import KMeansServerState, fed_kmeans, initial_centroids
from fedjax_lite.algorithms.fed_opt import (
    adaptive_server_optimizer,
    fed_adagrad,
    fed_adam,
    fed_avgm,
    fed_yogi,
    scale_by_adaptive_server,
)
from fedjax_lite.algorithms.fed_nova import fed_nova, nova_normalizer
from fedjax_lite.algorithms.fed_prox import fed_prox, proximal_term
from fedjax_lite.algorithms.fed_sgd import fed_sgd
from fedjax_lite.algorithms.lora_fine_tuning import frozen_base_training_work, lora_fine_tuning
from fedjax_lite.algorithms.q_ffl import q_ffl
from fedjax_lite.algorithms.mime import MimeServerState, frozen_state, mime, mime_lite
from fedjax_lite.algorithms.scaffold import ScaffoldServerState, control_variate_correction, scaffold
from fedjax_lite.algorithms.local_training import client_gradient, train_locally
from fedjax_lite.algorithms.personalization import personalization_evaluation, personalized_evaluation
from fedjax_lite.algorithms.optimizers import ScheduledOptimizer, scheduled_optimizer
from fedjax_lite.algorithms.template import (
    BitCount,
    Broadcast,
    CohortWork,
    Finalizer,
    FinalizerOutput,
    Prepass,
    RoundParts,
    ServerState,
    apply_optimizer_rejecting_non_finite,
    bits_per_client,
    build_round,
    client_work_and_aggregate,
    communication_bits,
    model_distributor,
    optimizer_finalizer,
    partition_upload,
    reject_non_finite_update,
    round_bits,
)

__all__ = [
    "FedBuff",
    "FedBuffState",
    "fed_buff",
    "inverse_sqrt_staleness",
    "staleness_work",
    "apply_optimizer_rejecting_non_finite",
    "reject_non_finite_update",
    "FED_AVG_OPTIONS",
    "ExampleDp",
    "compressing_work",
    "ErrorFeedbackState",
    "FinalizerOutput",
    "Prepass",
    "RoundParts",
    "fed_avg_options",
    "BitCount",
    "CohortWork",
    "KMeansServerState",
    "MimeServerState",
    "ScaffoldServerState",
    "bits_per_client",
    "communication_bits",
    "round_bits",
    "fed_kmeans",
    "frozen_base_training_work",
    "lora_fine_tuning",
    "batch_norm_labels",
    "fed_bn",
    "fed_per",
    "fed_rep",
    "initial_centroids",
    "personalization_evaluation",
    "personalized_evaluation",
    "client_distribution",
    "ditto",
    "fed_dyn",
    "fed_recon",
    "fed_recon_evaluation",
    "DatasetSplit",
    "FedDynServerState",
    "adaptive_server_optimizer",
    "control_variate_correction",
    "fed_adagrad",
    "fed_adam",
    "fed_avgm",
    "fed_nova",
    "fed_prox",
    "fed_yogi",
    "frozen_state",
    "mime",
    "mime_lite",
    "nova_normalizer",
    "proximal_term",
    "q_ffl",
    "scaffold",
    "scale_by_adaptive_server",
    "Broadcast",
    "Finalizer",
    "PrivateTraining",
    "ScheduledOptimizer",
    "ServerState",
    "build_round",
    "centralized_evaluation",
    "client_gradient",
    "client_work_and_aggregate",
    "dp_fed_avg",
    "dp_ftrl",
    "evaluate_clients",
    "fairness_metrics",
    "fed_avg",
    "fed_sgd",
    "federated_evaluation",
    "local_training_work",
    "model_distributor",
    "optimizer_finalizer",
    "partition_upload",
    "scheduled_optimizer",
    "train_locally",
]
