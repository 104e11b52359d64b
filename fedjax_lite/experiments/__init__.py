"""Running experiments: the training loop, plotting and the ``fedjax-lite`` command line."""

from fedjax_lite.experiments.loop import TrainingResult, flatten_metrics, run_training
from fedjax_lite.experiments.plotting import plot_history
from fedjax_lite.experiments.tracking import CsvTracker, JsonlTracker, TensorBoardTracker, Tracker, make_trackers

__all__ = ["CsvTracker", "JsonlTracker", "TensorBoardTracker", "Tracker", "TrainingResult", "flatten_metrics",
           "make_trackers", "plot_history", "run_training"]
