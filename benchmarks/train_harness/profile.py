"""Section ``profile``: our step's top operators (``torch.profiler``), and its smaller parts
alone, each choice against the authors': EMA, AdamW kernels, clipping, the attention kernel at
the model's shapes, the autocast context."""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from train_harness.runner import StepRunner, bench_config
from train_harness.timing import alternate, sync


def bench_profile(model: str, batch: int, device: torch.device, precision: str, repeats: int) -> dict[str, list[dict]]:
    """Where our step's time goes (``torch.profiler``, top operators by self time), and the
    step's smaller parts timed alone, each choice against the authors' (alternately)."""
    from torch.profiler import ProfilerActivity, profile

    cfg = bench_config(model, batch, device=str(device), precision=precision)
    runner = StepRunner(cfg)
    runner()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        runner()
        sync(device)
    events = sorted(prof.key_averages(), key=lambda e: e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total,
                    reverse=True)
    total = sum(e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total for e in events)
    ops = []
    for event in events[:12]:
        own = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        ops.append({"operator": event.key, "self_ms": own / 1e3, "calls": event.count, "share": own / max(total, 1)})

    step_fn, parts = runner.step_fn, []
    params = [p for p in step_fn.network.parameters()]
    targets = [p for p in step_fn.target.parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3

    def ema_loop():
        with torch.no_grad():
            for online, target in zip(params, targets):
                target.mul_(0.996).add_((1 - 0.996) * online)

    def ema_foreach():
        torch._foreach_lerp_(targets, params, 1 - 0.996)

    def adamw(**kwargs):
        optimizer = torch.optim.AdamW(params, lr=1e-9, **kwargs)
        return optimizer.step

    heads = step_fn.network.backbone.vit.blocks[0].attn.num_heads
    width = step_fn.network.backbone.embed_dim
    tokens = 1 + step_fn.masks.num_patches
    q = torch.randn(batch, heads, tokens, width // heads, device=device, requires_grad=True)

    def attention(fused: bool):
        def run():
            if fused:
                out = F.scaled_dot_product_attention(q, q, q)
            else:
                out = ((q * q.shape[-1] ** -0.5) @ q.transpose(-2, -1)).softmax(-1) @ q
            out.sum().backward()
        return run

    def autocast_enter():
        for _ in range(100):
            with step_fn.autocast():
                pass

    ours_fused = bool(step_fn.optimizer.defaults.get("fused"))  # what optim.fused=auto chose here
    choices = [
        ("EMA of the target", {"ours: one torch._foreach_lerp_": ema_foreach, "authors: mul_/add_ per parameter": ema_loop}),
        ("AdamW step", {"ours: " + ("fused" if ours_fused else "default kernel"):
                        adamw(fused=True) if ours_fused else adamw(),
                        "foreach": adamw(foreach=True), "fused": adamw(fused=True), "authors: default kernel": adamw()}),
        ("gradient clip", {"ours: clip_grad_norm_ (foreach where supported)": lambda: torch.nn.utils.clip_grad_norm_(params, 3.0),
                           "per tensor": lambda: torch.nn.utils.clip_grad_norm_(params, 3.0, foreach=False)}),
        (f"attention fwd+bwd [{batch}, {heads}, {tokens}, {width // heads}]",
         {"ours: sdpa": attention(True), "authors: eager": attention(False)}),
        ("autocast context x100", {"ours": autocast_enter}),
    ]
    for part, fns in choices:
        times = alternate(fns, device, warmup=1, repeats=max(repeats, 3))
        for name, seconds in times.items():
            parts.append({"part": part, "choice": name, "ms": statistics.median(seconds) * 1e3})
    return {"operators": ops, "parts": parts}
