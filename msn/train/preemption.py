"""Preemption: a signal stops training at the next step boundary, after ``latest.pt``.

Slurm (``--signal``), Kubernetes and schedulers send a signal before they kill a job. While
:class:`PreemptionFlag` is active those signals only set a flag; the trainer checks it once per
step (one all-reduce with several processes, so every rank stops at the same step), writes
``latest.pt`` and raises :class:`Preempted`; the command line exits with
:data:`EXIT_PREEMPTED` and the same command with ``resume=auto`` continues (docs/scaling.md).
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Iterable

# torch and msn.distributed are imported in :meth:`PreemptionFlag.agreed` only: ``train.py``
# installs the flag before the heavy imports, so that a signal during start-up is caught

#: Exit status of a run stopped by a preemption signal after writing ``latest.pt``
#: (``EX_TEMPFAIL``: run the same command again, ``resume: auto`` continues).
EXIT_PREEMPTED = 75


def signal_number(name: str) -> signal.Signals:
    """``USR1``, ``SIGUSR1`` or ``usr1`` -> ``signal.SIGUSR1``."""
    return getattr(signal, "SIG" + name.upper().removeprefix("SIG"))


class Preempted(Exception):
    """A preemption signal stopped training at ``step``; ``latest.pt`` holds that step."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(f"stopped by {signal_name} at step {step}, checkpoint written")
        self.step, self.signal_name = step, signal_name


class PreemptionFlag:
    """Context manager: while active, ``names`` only set a flag (the previous handlers are
    restored on exit). :meth:`agreed` tells every rank whether any rank got one.

    Args:
        names: signal names (``USR1``, ``SIGTERM``, ...).
        device: where the one-element flag is all-reduced (the process group's device; the
            trainer sets it when it is known).
    """

    def __init__(self, names: Iterable[str], device="cpu"):
        self.signals = [signal_number(name) for name in names]
        self.device = device
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "PreemptionFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                if sig not in self._previous:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def watch(self, names: Iterable[str]) -> "PreemptionFlag":
        """Watch ``names`` instead (the config's ``dist.preempt_signals``, once it is read);
        a signal already received is kept."""
        wanted = [signal_number(name) for name in names]
        for sig in [s for s in self._previous if s not in wanted]:
            signal.signal(sig, self._previous.pop(sig))
        self.signals = wanted
        return self.__enter__()

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        if self.received is None:
            self.received = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a signal on another rank"

    def agreed(self) -> bool:
        """True on every rank when any rank received a signal (one all-reduce per call)."""
        import torch

        from msn import distributed

        if not distributed.is_distributed():
            return self.received is not None
        flag = torch.tensor([0.0 if self.received is None else 1.0], device=self.device)
        return bool(distributed.all_reduce_max_(flag).item() > 0)


class IgnoreSignals:
    """``worker_init_fn`` of the data-loader workers: ignore the preemption signals (the main
    process stops at the next step boundary and shuts the workers down)."""

    def __init__(self, names: Iterable[str]):
        self.names = list(names)

    def __call__(self, worker_id: int) -> None:  # noqa: ARG002
        for name in self.names:
            signal.signal(signal_number(name), signal.SIG_IGN)
