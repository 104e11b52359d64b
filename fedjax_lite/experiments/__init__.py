"""Running experiments: the training loop, plotting and the ``fedjax-lite`` command line."""

from fedjax_lite.experiments.loop import TrainingResult, flatten_metrics, run_training
from fedjax_lite.experiments.plotting import plot_history

__all__ = ["TrainingResult", "flatten_metrics", "plot_history", "run_training"]
