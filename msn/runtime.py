"""Where and in what precision things run: one device resolver and one autocast rule for
training, evaluation and benchmarks (bottom floor: imports nothing from ``msn``)."""

from __future__ import annotations

import os
from contextlib import nullcontext
from typing import ContextManager

import torch


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """The device named by a ``device`` setting.

    Args:
        name: ``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        local_rank: with several processes, ``auto`` and ``cuda`` mean ``cuda:LOCAL_RANK``
            (``cuda:0`` when each process sees one GPU, as with ``--gpus-per-task=1``).

    Raises:
        ValueError: ``device: ...``, one line, when CUDA is asked for but not available or
            the local rank has no GPU of its own.
    """
    if name == "cpu":
        return torch.device("cpu")
    if name in ("auto", "cuda"):
        if not torch.cuda.is_available():
            if name == "cuda":
                raise ValueError("device: 'cuda' requested but CUDA is not available")
            return torch.device("cpu")
        if local_rank is None:
            return torch.device("cuda")
        count = torch.cuda.device_count()
        if local_rank >= count and count > 1:
            raise ValueError(f"device: local rank {local_rank} but only {count} visible GPUs (one process per GPU)")
        return torch.device("cuda", local_rank if count > 1 else 0)
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} requested but CUDA is not available")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a ``precision`` setting: bf16 for ``bf16``, and for ``auto`` on
    CUDA (bf16 matrix products are very slow on most CPUs); ``None`` (no autocast) otherwise."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> ContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``, or a no-op context for ``None``."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


#: Loader workers a process starts at most when ``data.num_workers`` is null.
MAX_DEFAULT_WORKERS = 8


def loader_workers(requested: int | None) -> int:
    """``data.num_workers``: the number asked for, or (null) as many as the CPUs this
    process may use, at most :data:`MAX_DEFAULT_WORKERS` (more would only make torch warn on
    a small machine and compete with the step for the cores)."""
    if requested is not None:
        return requested
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(MAX_DEFAULT_WORKERS, cpus)
