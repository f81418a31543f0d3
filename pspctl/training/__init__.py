"""Training in superposition: the paper's online protocol (`train`) and healing a merge (`tune`)."""

from pspctl.training.common import Diverged
from pspctl.training.online import TrainOptions, TrainReport, train
from pspctl.training.tune import TuneOptions, TuneReport, default_output, tune

__all__ = [
    "Diverged",
    "TrainOptions",
    "TrainReport",
    "TuneOptions",
    "TuneReport",
    "default_output",
    "train",
    "tune",
]
