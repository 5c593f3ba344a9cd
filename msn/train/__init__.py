"""Pre-training: the step object, the loop, schedules, optimiser groups, EMA, preemption.

The names below are imported on first use, so that ``msn.train.preemption`` (which
``train.py`` installs before torch is imported) stays light.
"""

from __future__ import annotations

import importlib

_HOMES = {
    "ema_update": "msn.train.ema",
    "build_optimizer": "msn.train.optim",
    "parameter_groups": "msn.train.optim",
    "set_lr_and_wd": "msn.train.optim",
    "Schedules": "msn.train.schedules",
    "STAT_NAMES": "msn.train.step",
    "MSNStep": "msn.train.step",
    "Trainer": "msn.train.trainer",
    "TrainingDivergedError": "msn.train.trainer",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'msn.train' has no attribute {name!r}")
