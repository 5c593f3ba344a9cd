"""Pre-training: schedules, optimiser groups, EMA and the step loop."""

from msn.train.ema import ema_update
from msn.train.optim import build_optimizer, parameter_groups, set_lr_and_wd
from msn.train.schedules import Schedules
from msn.train.step import STAT_NAMES, MSNStep
from msn.train.trainer import Trainer, TrainingDivergedError

__all__ = [
    "MSNStep",
    "STAT_NAMES",
    "Schedules",
    "Trainer",
    "TrainingDivergedError",
    "build_optimizer",
    "ema_update",
    "parameter_groups",
    "set_lr_and_wd",
]
