"""Section ``levers``: one change at a time from our default step (mask ratio, per-view forwards,
eager attention, zeroed instead of dropped tokens, channels_last, ``torch.compile``), and the
anchor branch alone at each mask ratio."""

from __future__ import annotations

import torch

from train_harness.runner import StepRunner, anchor_branch, bench_config
from train_harness.timing import timed


def bench_levers(model: str, batch: int, device: torch.device, precision: str, warmup: int, repeats: int,
                 with_compile: bool) -> list[dict]:
    rows = []

    def add(lever: str, setting: str, seconds: float) -> None:
        rows.append({"model": model, "lever": lever, "setting": setting, "step_s": seconds, "img_per_s": batch / seconds})

    for ratio in (0.0, 0.15, 0.5, 0.7):
        runner = StepRunner(bench_config(model, batch, ratio=ratio, device=str(device), precision=precision))
        add("mask ratio", f"{ratio}", timed(runner, device, warmup, repeats))
        branch = anchor_branch(runner)
        rows.append({"model": model, "lever": "anchor branch (fwd+bwd)", "setting": f"mask {ratio}",
                     "step_s": timed(branch, device, warmup, repeats), "img_per_s": None})
    base = StepRunner(bench_config(model, batch, device=str(device), precision=precision))
    add("views", "one forward per resolution group (ours)", timed(base, device, warmup, repeats))
    per_view = StepRunner(bench_config(model, batch, device=str(device), precision=precision), per_view=True)
    add("views", "one forward per view", timed(per_view, device, warmup, repeats))
    add("attention", "sdpa (ours)", timed(base, device, warmup, repeats))
    eager = StepRunner(bench_config(model, batch, attention="eager", device=str(device), precision=precision))
    add("attention", "eager", timed(eager, device, warmup, repeats))
    add("tokens", "dropped (ours)", timed(base, device, warmup, repeats))
    zeroed = StepRunner(bench_config(model, batch, device=str(device), precision=precision), per_view=False,
                        zero_tokens=True)
    add("tokens", "zeroed (sequence kept)", timed(zeroed, device, warmup, repeats))
    last = StepRunner(bench_config(model, batch, device=str(device), precision=precision), channels_last=True)
    add("memory format", "channels_last", timed(last, device, warmup, repeats))
    if with_compile:
        compiled = StepRunner(bench_config(model, batch, device=str(device), precision=precision, train={"compile": True}))
        add("torch.compile", "on", timed(compiled, device, max(warmup, 2), repeats))
    return rows
