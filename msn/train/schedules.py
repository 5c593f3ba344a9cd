"""Per-step schedules of the reference recipe (docs/method.md Sec. 6).

All schedules run over the stretched length ``schedule_stretch * total_steps`` (stretch 1.25
in the reference), so the run ends before the schedule does: the LR never reaches its final
value and the EMA momentum ends near 0.9992 instead of 1. As in the reference, the LR and
weight-decay cosines use the integer length ``T = int(stretch * epochs * steps_per_epoch)``,
while the EMA momentum and the sharpening temperature advance by the float increment
``(final - start) / (steps_per_epoch * epochs * stretch)``; each value is computed with the
reference's order of float operations, so both agree to the last bit.

Step conventions (matching the reference's iterator/``step()`` calls): the optimiser update
number ``s`` (0-based) uses ``lr(s + 1)`` and ``weight_decay(s + 1)`` (the reference's
schedulers advance before returning) and ``momentum(s)`` / ``sharpen(s)`` (its generators
yield index 0 first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from msn.config import LossConfig, OptimConfig


@dataclass(frozen=True)
class Schedules:
    """Learning rate, weight decay, EMA momentum and sharpening temperature per step.

    Args:
        total_steps: ``epochs * steps_per_epoch``.
        steps_per_epoch: optimiser steps in one epoch.
        lr, start_lr, final_lr, warmup_epochs: linear warm-up ``start_lr -> lr`` over
            ``warmup_epochs``, then cosine ``lr -> final_lr`` until step ``T``.
        weight_decay, final_weight_decay: cosine from the first to the second over ``T``.
        ema_start, ema_end: momentum linear from the first toward the second over ``T``.
        sharpen_start, sharpen_final: target temperature linear over ``T``.
        schedule_stretch: ``T / total_steps``.
    """

    total_steps: int
    steps_per_epoch: int
    # defaults: the schema's (one home), OptimConfig's and LossConfig's
    lr: float = OptimConfig.lr
    start_lr: float = OptimConfig.start_lr
    final_lr: float = OptimConfig.final_lr
    warmup_epochs: float = OptimConfig.warmup_epochs
    weight_decay: float = OptimConfig.weight_decay
    final_weight_decay: float = OptimConfig.final_weight_decay
    ema_start: float = OptimConfig.ema_start
    ema_end: float = OptimConfig.ema_end
    sharpen_start: float = LossConfig.sharpen_start
    sharpen_final: float = LossConfig.sharpen_final
    schedule_stretch: float = OptimConfig.schedule_stretch

    def __post_init__(self) -> None:
        if self.steps_per_epoch < 1 or self.total_steps % self.steps_per_epoch:
            raise ValueError(f"total_steps ({self.total_steps}) must be a whole number of epochs of "
                             f"steps_per_epoch ({self.steps_per_epoch}) steps")

    @classmethod
    def from_config(cls, optim, loss, steps_per_epoch: int) -> "Schedules":
        """The schedules of ``optim`` (:class:`msn.config.OptimConfig`) and ``loss``
        (:class:`msn.config.LossConfig`, the sharpening temperature) for ``steps_per_epoch``."""
        return cls(
            total_steps=optim.epochs * steps_per_epoch, steps_per_epoch=steps_per_epoch, lr=optim.lr,
            start_lr=optim.start_lr, final_lr=optim.final_lr, warmup_epochs=optim.warmup_epochs,
            weight_decay=optim.weight_decay, final_weight_decay=optim.final_weight_decay,
            ema_start=optim.ema_start, ema_end=optim.ema_end, sharpen_start=loss.sharpen_start,
            sharpen_final=loss.sharpen_final, schedule_stretch=optim.schedule_stretch,
        )

    @property
    def epochs(self) -> int:
        return self.total_steps // max(1, self.steps_per_epoch)

    @property
    def stretched_steps(self) -> int:
        """Integer length of the LR and WD cosines (reference ``int(ipe_scale * epochs * ipe)``)."""
        return int(self.schedule_stretch * self.epochs * self.steps_per_epoch)

    @property
    def stretched_length(self) -> float:
        """Float length of the linear EMA and temperature ramps (reference ``ipe * epochs * 1.25``)."""
        return self.steps_per_epoch * self.epochs * self.schedule_stretch

    @property
    def warmup_steps(self) -> int:
        return int(self.warmup_epochs * self.steps_per_epoch)

    def learning_rate(self, step: int) -> float:
        """Warm-up then cosine (reference ``WarmupCosineSchedule``) at scheduler step ``step``."""
        warmup = self.warmup_steps
        if step < warmup:
            return self.start_lr + step / max(1, warmup) * (self.lr - self.start_lr)
        progress = (step - warmup) / max(1, self.stretched_steps - warmup)
        cosine = self.final_lr + (self.lr - self.final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(self.final_lr, cosine) if self.final_lr <= self.lr else min(self.final_lr, cosine)

    def weight_decay_at(self, step: int) -> float:
        """Cosine from ``weight_decay`` to ``final_weight_decay`` (reference ``CosineWDSchedule``)."""
        progress = step / max(1, self.stretched_steps)
        value = self.final_weight_decay + (self.weight_decay - self.final_weight_decay) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.final_weight_decay <= self.weight_decay:
            return max(self.final_weight_decay, value)
        return min(self.final_weight_decay, value)

    def _ramp(self, start: float, final: float, step: int) -> float:
        """``start + increment * step`` with the reference's float increment."""
        return start + (final - start) / max(1e-12, self.stretched_length) * step

    def momentum(self, step: int) -> float:
        """EMA momentum ``ema_start + step * (ema_end - ema_start) / (1.25 * total_steps)``."""
        return self._ramp(self.ema_start, self.ema_end, step)

    def sharpen_temperature(self, step: int) -> float:
        """Target sharpening temperature ``sharpen_start + step * (final - start) / (1.25 * total_steps)``."""
        return self._ramp(self.sharpen_start, self.sharpen_final, step)

    def at_update(self, update: int) -> dict[str, float]:
        """All values used by 0-based optimiser update ``update`` (see module docstring)."""
        return {
            "lr": self.learning_rate(update + 1),
            "wd": self.weight_decay_at(update + 1),
            "momentum": self.momentum(update),
            "sharpen_T": self.sharpen_temperature(update),
        }
