"""Section ``step``: one full MSN training step (all 12 views, forward + backward + AdamW + EMA),
ours and the authors', measured alternately: images/s, FLOPs, MFU, peak memory, speed-up."""

from __future__ import annotations

import statistics

import torch

from train_harness.runner import StepRunner, bench_config
from train_harness.timing import alternate, count_flops, speedup


def bench_step(models: list[str], batch: int, device: torch.device, precision: str, warmup: int, repeats: int,
               peak: float) -> list[dict]:
    """Our step and the authors' (benchmarks/reference_recipe.py), measured alternately."""
    rows = []
    for model in models:
        cfg = bench_config(model, batch, device=str(device), precision=precision)
        runners = {"ours": StepRunner(cfg), "authors": StepRunner(cfg, authors=True)}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = alternate(runners, device, warmup, repeats)
        memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        ratio = speedup(times, "ours", "authors")
        for variant, runner in runners.items():
            seconds = statistics.median(times[variant])
            flops = count_flops(runner)
            rows.append({"model": model, "variant": variant, "batch": batch, "precision": precision, "step_s": seconds,
                         "img_per_s": batch / seconds, "gflop_per_step": flops / 1e9,
                         "achieved_gflops": flops / seconds / 1e9, "mfu": flops / seconds / peak,
                         "speedup_vs_authors": ratio if variant == "ours" else 1.0,
                         "peak_mem_gb": None if memory is None else memory / 2**30})
    return rows
