"""Timing of the benchmark sections: medians of runs, runs of several candidates taken in turn
(on a shared machine only their ratios compare two implementations), the matmul peak and FLOP
counts of the MFU column."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def sync(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def alternate(fns: dict[str, Callable[[], Any]], device: torch.device, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Wall times of each of ``fns``, run in turn ``repeats`` times after ``warmup`` rounds:
    on a shared machine only ratios measured this way compare two implementations."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def speedup(times: dict[str, list[float]], ours: str, baseline: str) -> float:
    """Median over alternations of ``baseline time / our time`` (> 1: ours is faster)."""
    return statistics.median(b / a for a, b in zip(times[ours], times[baseline]))


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 10) -> float:
    """Measured FLOP/s of a large square matmul (the MFU denominator)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = timed(lambda: a @ b, device, warmup=3, repeats=repeats)
    return 2 * size**3 / seconds


def count_flops(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()
