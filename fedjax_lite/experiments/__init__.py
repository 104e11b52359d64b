"""Running experiments: the training loop, plotting and the ``fedjax-lite`` command line."""

from fedjax_lite.experiments.checkpoint import (ConfigMismatchError, RunCheckpointer, TrainingInterrupted,
                                                read_checkpoint)
from fedjax_lite.experiments.loop import TrainingResult, TrainingStalledError, flatten_metrics, run_training
from fedjax_lite.experiments.plotting import plot_history
from fedjax_lite.experiments.tracking import (CsvTracker, JsonlTracker, TensorBoardTracker, Tracker, WandbTracker,
                                              make_trackers)

__all__ = ["ConfigMismatchError", "CsvTracker", "JsonlTracker", "RunCheckpointer", "TensorBoardTracker", "Tracker",
           "TrainingInterrupted", "TrainingResult", "TrainingStalledError", "WandbTracker", "flatten_metrics",
           "make_trackers", "plot_history", "read_checkpoint", "run_training"]
