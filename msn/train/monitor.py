"""The live low-shot monitor, the trainer's side (``monitor.*``; docs/eval.md "Live monitor").

:class:`LiveMonitor` decides when the monitor runs (every ``monitor.every`` steps and at the
last step) and runs a *probe* on the EMA target encoder, the encoder the paper evaluates,
without touching the training trajectory: the target in eval mode, under ``torch.no_grad``,
with the global generators forked (torch's CPU and CUDA ones, numpy's and Python's come back
as they were),
its training mode restored afterwards. It times each evaluation (``monitor/seconds``); the
trainer keeps that time out of ``img_per_s`` and adds it to ``time_s``.

What a probe measures lives one floor up, in :class:`msn.eval.monitor.LowShotProbe` (k-NN and
k-shot logistic regression with the evaluator's own classifiers): this package may not import
``msn.eval`` (docs/architecture.md, "Floors"), so the entry points hand the trainer a
:data:`ProbeFactory`, as they hand it ``init_state``.

With several processes every rank runs the same probe on the same images: the target is the
same on every rank, and under FSDP2 its forward is a collective, so no rank may sit it out.
Rank 0 logs the values.
"""

from __future__ import annotations

import contextlib
import random
import time
from typing import Any, Callable, ContextManager, Iterator, Protocol

import numpy as np
import torch
from torch import nn

from msn.config import MonitorConfig, MSNConfig
from msn.train import sharding


class Probe(Protocol):
    """Scores a frozen encoder: ``probe(backbone, device, dtype, autocast) -> {name: value}``.

    The backbone is the target's :class:`msn.models.MSNViT`, already in eval mode and under
    ``no_grad``; ``dtype`` is the parameters' dtype (inputs must match it), ``autocast()``
    the training forwards' autocast context.
    """

    def __call__(self, backbone: nn.Module, device: torch.device, dtype: torch.dtype,
                 autocast: Callable[[], ContextManager]) -> dict[str, float]: ...


#: ``(cfg, training data set) -> Probe``: builds a run's probe once, before the first step.
ProbeFactory = Callable[[MSNConfig, Any], Probe]

#: The record key of the seconds one evaluation took.
SECONDS = "monitor/seconds"


class LiveMonitor:
    """When to evaluate, and one evaluation of the target encoder that leaves training as it was.

    Args:
        cfg: the ``monitor`` section.
        probe: what is measured.
    """

    def __init__(self, cfg: MonitorConfig, probe: Probe):
        self.every = cfg.every
        self.probe = probe
        #: the values of the latest evaluation (the progress bar shows its k-NN accuracy)
        self.last: dict[str, float] = {}

    def due(self, step: int, finished: bool) -> bool:
        """Whether to evaluate after ``step`` updates: every ``every`` steps and at the end."""
        return finished or step % self.every == 0

    def __call__(self, target: nn.Module, device: torch.device, dtype: torch.dtype,
                 autocast: Callable[[], ContextManager]) -> dict[str, float]:
        """Evaluate ``target`` (an :class:`msn.models.MSNNetwork`; its backbone is scored) and
        return the probe's values plus :data:`SECONDS`. Collective under FSDP2."""
        start = time.perf_counter()
        was_training = target.training
        with _own_random_state(device), torch.no_grad(), _gathered(target):
            target.eval()
            try:
                values = dict(self.probe(target.backbone, device, dtype, autocast))
            finally:
                target.train(was_training)
        values[SECONDS] = time.perf_counter() - start
        self.last = values
        return values


@contextlib.contextmanager
def _own_random_state(device: torch.device) -> Iterator[None]:
    """Fork the global generators (torch's CPU one and the CUDA device trained on, numpy's,
    Python's): whatever the probe draws, the training's streams continue as if it had not run."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
            yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


@contextlib.contextmanager
def _gathered(target: nn.Module) -> Iterator[None]:
    """Under FSDP2 the probe calls the backbone's blocks, not the root's forward, so the root's
    own parameters (embeddings, final norm) are gathered here for the duration; each block
    gathers its own when called. Elsewhere a no-op."""
    if not sharding.is_sharded(target):
        yield
        return
    target.unshard()
    try:
        yield
    finally:
        target.reshard()
