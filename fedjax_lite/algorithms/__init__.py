"""Federated algorithms, each a ``Process(init, next)`` built from the core, the aggregators and optax."""

from fedjax_lite.algorithms.evaluation import (
    centralized_evaluation,
    evaluate_clients,
    federated_evaluation,
)
from fedjax_lite.algorithms.dp_fed_avg import PrivateTraining, dp_fed_avg, dp_ftrl
from fedjax_lite.algorithms.fed_avg import ServerState, fed_avg
from fedjax_lite.algorithms.fed_sgd import fed_sgd
from fedjax_lite.algorithms.local_training import train_locally

__all__ = [
    "PrivateTraining",
    "ServerState",
    "centralized_evaluation",
    "dp_fed_avg",
    "dp_ftrl",
    "evaluate_clients",
    "fed_avg",
    "fed_sgd",
    "federated_evaluation",
    "train_locally",
]
