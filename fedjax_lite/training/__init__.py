"""The training loop, checkpoints, trackers, plotting and the ``fedjax-lite`` command line: what runs a federated
experiment end to end on top of the algorithms.

:func:`run_training` is built from parts that can be used on their own: a driver (:func:`drive_rounds`, rounds
packed on the host; :func:`drive_scanned_rounds`, rounds drawn and scanned on the device), a :class:`Recorder`
(metrics file, trackers, progress bar, stall detection, checkpoints, signals), a :class:`RoundSchedule` (when to
evaluate, checkpoint and stop) and :class:`RunCheckpoints` (what a run restores and saves). :func:`run_fed_buff`
(asynchronous FedBuff) is built from the same parts, a server step in place of a round, with
:func:`fed_buff_privacy` its privacy ledger.
"""

from fedjax_lite.training.buffered_driver import BufferedPacker, FedBuffRun, fed_buff_privacy, run_fed_buff
from fedjax_lite.training.checkpoint import (CheckpointError, CheckpointInUseError, CheckpointSaveError,
                                             ConfigMismatchError, RunCheckpointer, TrainingInterrupted,
                                             read_checkpoint)
from fedjax_lite.training.loop import TrainingResult, TrainingStalledError, flatten_metrics, run_training
from fedjax_lite.training.plotting import history_figure, plot_history
from fedjax_lite.training.recorder import Recorder
from fedjax_lite.training.round_driver import HostRoundPacker, PackedRound, drive_rounds
from fedjax_lite.training.run_checkpoints import Progress, RunCheckpoints
from fedjax_lite.training.scanned_driver import drive_scanned_rounds
from fedjax_lite.training.schedule import RoundSchedule
from fedjax_lite.training.tracking import (CsvTracker, JsonlTracker, TensorBoardTracker, Tracker, WandbTracker,
                                           make_trackers)

__all__ = ["BufferedPacker", "FedBuffRun", "fed_buff_privacy", "run_fed_buff", "CheckpointError", "CheckpointInUseError", "CheckpointSaveError", "ConfigMismatchError", "CsvTracker",
           "HostRoundPacker", "JsonlTracker", "PackedRound", "Progress", "Recorder", "RoundSchedule",
           "RunCheckpointer", "RunCheckpoints", "TensorBoardTracker", "Tracker", "TrainingInterrupted",
           "TrainingResult", "TrainingStalledError", "WandbTracker", "drive_rounds", "drive_scanned_rounds",
           "flatten_metrics", "history_figure", "make_trackers", "plot_history", "read_checkpoint", "run_training"]
