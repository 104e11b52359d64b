"""The training loop, checkpoints, trackers, plotting and the ``fedjax-lite`` command line: what runs a federated
experiment end to end on top of the algorithms."""

from fedjax_lite.training.checkpoint import (ConfigMismatchError, RunCheckpointer, TrainingInterrupted,
                                                read_checkpoint)
from fedjax_lite.training.loop import TrainingResult, TrainingStalledError, flatten_metrics, run_training
from fedjax_lite.training.plotting import history_figure, plot_history
from fedjax_lite.training.tracking import (CsvTracker, JsonlTracker, TensorBoardTracker, Tracker, WandbTracker,
                                              make_trackers)

__all__ = ["ConfigMismatchError", "CsvTracker", "JsonlTracker", "RunCheckpointer", "TensorBoardTracker", "Tracker",
           "TrainingInterrupted", "TrainingResult", "TrainingStalledError", "WandbTracker", "flatten_metrics",
           "history_figure", "make_trackers", "plot_history", "read_checkpoint", "run_training"]
