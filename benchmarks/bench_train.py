"""Benchmark harness: ``python benchmarks/bench_train.py`` prints Markdown tables and writes JSON.

Every timed step is :class:`msn.train.MSNStep`, the object the trainer calls; the baseline is
the authors' step and data path, :mod:`reference_recipe` (eager attention, one shared mask,
full last block, per-parameter EMA loop, gradient norms read every step, per-image PIL
augmentation). Comparisons are ratios of runs taken in turn (:func:`alternate`), the median
over alternations: on a shared machine single readings move by 10% and a matmul peak read at
another moment cannot rank two implementations.

1. ``step``: one full MSN training step (all 12 views, forward + backward + AdamW + EMA),
   ours and the authors', images/s, FLOPs (``torch.utils.flop_counter``), MFU against the
   measured fp32 (bf16 on CUDA) matmul peak, peak memory, and the speed-up.
2. ``levers``: one change at a time from our default step: mask ratio, per-view forwards,
   eager attention, zeroed instead of dropped tokens, channels_last, ``torch.compile``; and
   the anchor branch (forward + backward of the masked anchors alone) at each mask ratio.
3. ``data``: 12-view samples/s on ONE core for each ``data.augment`` mode (for ``device``
   the host's share, and the device's share run on the CPU) and the authors' PIL pipeline,
   on generated 375x500 JPEGs and on 28 px images.
4. ``e2e``: loader + step throughput, ours against the authors' recipe, and our step alone
   on a fixed batch (what the loader should keep up with).
5. ``profile``: our step's top operators (``torch.profiler``), and its smaller parts alone:
   EMA, AdamW kernels, clipping, attention kernel at the model's shapes, autocast context.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

# Idle OpenMP threads sleep instead of spinning (loader workers share the cores with the step).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from torch import nn  # noqa: E402

from msn.architectures import MODELS as PRESETS  # noqa: E402
from msn.config import MSNConfig, load_config  # noqa: E402
from msn.data import MultiViewBatch  # noqa: E402
from msn.models import MSNNetwork  # noqa: E402
from msn.runtime import resolve_device  # noqa: E402
from msn.train import MSNStep  # noqa: E402
from reference_recipe import AuthorsStep, ReferencePILDataset  # noqa: E402

# ---------------------------------------------------------------------------- configs

MODELS = {
    # name: (model preset of msn.architectures.MODELS, rand size, focal size, mask ratio)
    "vit_tiny_16@224": ("vit_tiny_16", 224, 96, 0.15),
    "vit_small_16@224": ("vit_small_16", 224, 96, 0.15),
    "vit_base_16@224": ("vit_base_16", 224, 96, 0.3),
    "fmnist_demo": ("vit_mini_4", 28, 12, 0.15),
}
assert all(preset in PRESETS for preset, *_ in MODELS.values())


def bench_config(model: str, batch: int, *, ratio: float | None = None, attention: str = "sdpa",
                 device: str = "cpu", precision: str = "fp32", **sections) -> MSNConfig:
    """A config with the named model on synthetic data (no files needed)."""
    preset, rand, focal, default_ratio = MODELS[model]
    head = {"hidden_dim": 512, "output_dim": 128} if model == "fmnist_demo" else {}
    loss = {"num_prototypes": 256} if model == "fmnist_demo" else {}
    raw = {
        "output_dir": tempfile.mkdtemp(prefix="msn-bench-"),
        "device": device,
        "precision": precision,
        "model": {"name": preset, "attention": attention},
        "head": head,
        "loss": loss,
        "mask": {"ratio": default_ratio if ratio is None else ratio},
        "data": {"name": "synthetic", "num_workers": 0, "synthetic_size": batch, "synthetic_image_size": rand,
                 "views": {"rand_size": rand, "focal_size": focal}},
        "optim": {"batch_size": batch, "epochs": 1},
        "train": {"progress": False},
    }
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return load_config(raw)


def random_batch(cfg: MSNConfig, device: torch.device, seed: int = 0) -> MultiViewBatch:
    """A pre-augmented batch of the right shapes (to time the model step alone)."""
    g = torch.Generator().manual_seed(seed)
    b, v = cfg.optim.batch_size, cfg.data.views
    batch = MultiViewBatch(
        target=torch.randn(b, 3, v.rand_size, v.rand_size, generator=g),
        anchor=torch.randn(b, 3, v.rand_size, v.rand_size, generator=g),
        focal=torch.randn(v.num_focal * b, 3, v.focal_size, v.focal_size, generator=g),
        labels=torch.zeros(b, dtype=torch.long),
        skipped=0,
    )
    return batch.to(device)


# ---------------------------------------------------------------------------- timing

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def alternate(fns: dict[str, Callable[[], Any]], device: torch.device, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Wall times of each of ``fns``, run in turn ``repeats`` times after ``warmup`` rounds:
    on a shared machine only ratios measured this way compare two implementations."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            _sync(device)
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


# ---------------------------------------------------------------------------- steps

class PerViewForward(nn.Module):
    """The online forwards view by view (the straightforward way) instead of one forward per
    resolution group; optionally the anchor's masked tokens zeroed, the sequence kept full
    length, instead of removed."""

    def __init__(self, network: MSNNetwork, per_view: bool = True, zero_tokens: bool = False):
        super().__init__()
        self.network, self.per_view, self.zero_tokens = network, per_view, zero_tokens

    def _anchor(self, anchor: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        if not (self.zero_tokens and keep is not None):
            return self.network(anchor, keep)
        backbone = self.network.backbone
        tokens = backbone.embed(anchor)
        kept = torch.zeros(tokens.shape[:2], device=tokens.device, dtype=tokens.dtype).scatter_(1, keep, 1.0)
        tokens = backbone.vit.blocks(tokens * kept.unsqueeze(-1))
        return self.network.head(backbone.vit.norm(tokens)[:, 0])

    def forward(self, anchor: torch.Tensor, keep: torch.Tensor | None, focal: torch.Tensor) -> torch.Tensor:
        outputs = [self._anchor(anchor, keep)]
        if focal.numel():
            outputs += [self.network(view) for view in focal.split(anchor.shape[0])] if self.per_view else [self.network(focal)]
        return torch.cat(outputs)


class StepRunner:
    """:class:`msn.train.MSNStep` (or, with ``authors``, the reconstruction of the authors' step
    :class:`reference_recipe.AuthorsStep`) on a fixed batch; ``forward`` swaps its
    online-forward module (``None``: the trainer's own)."""

    def __init__(self, cfg: MSNConfig, channels_last: bool = False, authors: bool = False, **forward):
        self.device = resolve_device(cfg.device)
        if authors:  # the reconstruction of the authors' step (benchmarks/reference_recipe.py)
            self.step_fn = AuthorsStep.from_reference_config(cfg, self.device)
        else:
            self.step_fn = MSNStep.from_config(cfg, self.device, steps_per_epoch=1)
        if forward:
            self.step_fn.online = PerViewForward(self.step_fn.network, **forward)
        self.batch = random_batch(cfg, self.device)
        if channels_last:
            self.batch = MultiViewBatch(*(t.contiguous(memory_format=torch.channels_last)
                                          for t in (self.batch.target, self.batch.anchor, self.batch.focal)),
                                        self.batch.labels, 0)
            self.step_fn.network.to(memory_format=torch.channels_last)
        self.step_fn.train()
        self.step = 0

    def __call__(self) -> None:
        self.step_fn(self.batch, self.step)
        self.step += 1


def anchor_branch(runner: StepRunner) -> Callable[[], None]:
    """Forward + backward of the masked anchors alone (the cost the mask ratio shrinks)."""
    step_fn = runner.step_fn
    keep = step_fn.masks(0, runner.batch.size, runner.device)

    def run() -> None:
        with step_fn.autocast():
            z = step_fn.network(runner.batch.anchor, keep)
        z.float().square().mean().backward()

    return run


# ---------------------------------------------------------------------------- sections

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


# ---------------------------------------------------------------------------- data

def write_jpeg_folder(root: Path, count: int, size: tuple[int, int] = (375, 500)) -> Path:
    """An ImageFolder of ``count`` smooth random JPEGs (ImageNet-like size) in 2 classes."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for i in range(count):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        low = torch.rand(3, size[0] // 16, size[1] // 16, generator=g)
        image = F.interpolate(low[None], size=size, mode="bicubic", align_corners=False)[0].clamp(0, 1)
        image = (image * 255).to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(image).save(folder / f"img{i:04d}.jpg", quality=90)
    return root


def _loader(cfg: MSNConfig, dataset, augment: str, workers: int, pin_memory: bool = False):
    """A train loader over ``dataset``: ``augment`` is a ``data.augment`` mode of ours, or
    ``reference`` (per-image PIL, :class:`reference_recipe.ReferencePILDataset`)."""
    from dataclasses import replace
    from msn.data import MultiViewCollate, ResumableSampler, build_multiview_data, build_train_loader

    if augment == "reference":
        data = ReferencePILDataset(dataset, cfg.data.views, pil_images=hasattr(dataset, "samples"))
        collate = MultiViewCollate()
    else:
        data, collate = build_multiview_data(dataset, replace(cfg.data, augment=augment), cfg.seed)
    sampler = ResumableSampler(len(dataset), cfg.optim.batch_size, cfg.seed)
    return build_train_loader(data, sampler, workers, pin_memory=pin_memory, collate=collate)


DATA_PIPELINES = {
    # name: (augment mode, what the host does)
    "batched": "ours, data.augment=batched: uint8 crops, photometric ops per batch, on the host",
    "device": "ours, data.augment=device, host share: decode, uint8 crops, parameters drawn",
    "per_sample": "ours, data.augment=per_sample: torchvision v2 image by image",
    "reference": "plain PIL per image (the authors' recipe)",
}


def bench_data(batch: int, repeats: int, workdir: Path, images: int) -> list[dict]:
    """Samples/s on one core (num_workers=0, one thread) for each pipeline; for
    ``data.augment=device`` also the device share run on this CPU (what a GPU takes over)."""
    from msn.data import ImageFolderDataset, SyntheticImages

    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    try:
        folder = ImageFolderDataset(str(write_jpeg_folder(workdir / "jpegs", images)))
        small = SyntheticImages(images, 10, 28)
        for name, dataset, model in (("ImageFolder JPEG 375x500 -> 224/96", folder, "vit_small_16@224"),
                                     ("28 px images -> 28/12", small, "fmnist_demo")):
            cfg = bench_config(model, batch)
            for augment, pipeline in DATA_PIPELINES.items():
                loader = _loader(cfg, dataset, augment, 0)
                runs, device_runs = [], []
                for _ in range(repeats):
                    start = time.perf_counter()
                    batches = list(loader)
                    runs.append(sum(b.size for b in batches) / (time.perf_counter() - start))
                    if augment == "device":
                        start = time.perf_counter()
                        for b in batches:
                            b.to(cpu)
                        device_runs.append(sum(b.size for b in batches) / (time.perf_counter() - start))
                rows.append({"data": name, "pipeline": pipeline, "samples_per_s_per_core": statistics.median(runs)})
                if device_runs:
                    rows.append({"data": name, "pipeline": "ours, data.augment=device, device share run on this CPU core",
                                 "samples_per_s_per_core": statistics.median(device_runs)})
            if hasattr(dataset, "samples"):  # the decoder alone bounds every pipeline on JPEGs
                from msn.data.datasets import decode_rgb

                start = time.perf_counter()
                for path, _ in dataset.samples:
                    decode_rgb(path)
                rows.append({"data": name, "pipeline": "JPEG decode only (PIL), no augmentation: the ceiling",
                             "samples_per_s_per_core": len(dataset.samples) / (time.perf_counter() - start)})
    finally:
        torch.set_num_threads(threads)
    for row in rows:
        row["vs_reference"] = row["samples_per_s_per_core"] / next(
            r["samples_per_s_per_core"] for r in rows if r["data"] == row["data"] and r["pipeline"] == DATA_PIPELINES["reference"])
    return rows


class LoaderSteps:
    """``steps`` training steps fed by a loader, continuing where the last call stopped
    (epochs restart as needed): one e2e measurement."""

    def __init__(self, loader, runner: "StepRunner", steps: int):
        self.loader, self.runner, self.steps = loader, runner, steps
        self.epoch, self.done, self.iterator = 0, 0, None

    def __call__(self) -> None:
        for _ in range(self.steps):
            batch = next(self.iterator, None) if self.iterator is not None else None
            if batch is None:
                self.loader.sampler.set_position(self.epoch)
                self.epoch += 1
                self.iterator = iter(self.loader)
                batch = next(self.iterator)
            self.runner.step_fn(batch, self.done)
            self.done += 1


def bench_e2e(model: str, batch: int, steps: int, repeats: int, workdir: Path, workers: int, augment: str,
              device: torch.device, precision: str) -> list[dict]:
    """Loader + step throughput, ours (``augment``) against the authors' recipe (per-image PIL
    augmentation, :class:`reference_recipe.AuthorsStep`), measured alternately; and our step
    alone on one fixed batch (the ceiling the loader should reach)."""
    from msn.data import ImageFolderDataset, SyntheticImages

    # enough images that no epoch ends within the warm-up and the timed runs of either loader
    # (an epoch end restarts the workers, and their first burst would be timed)
    needed = batch * steps * (repeats + 2)
    if model == "fmnist_demo":
        dataset, data_name = SyntheticImages(needed, 10, 28), "28 px images"
    else:
        folder = workdir / "jpegs"
        if not folder.is_dir() or len(list(folder.rglob("*.jpg"))) < needed:
            shutil.rmtree(folder, ignore_errors=True)
            write_jpeg_folder(folder, max(64, needed))
        dataset, data_name = ImageFolderDataset(str(folder)), "ImageFolder JPEG 375x500"
    cfg = bench_config(model, batch, device=str(device), precision=precision)
    pin = device.type == "cuda"
    runs = {"ours": LoaderSteps(_loader(cfg, dataset, augment, workers, pin), StepRunner(cfg), steps),
            "authors": LoaderSteps(_loader(cfg, dataset, "reference", workers, pin), StepRunner(cfg, authors=True), steps),
            "ours, step only": StepRunner(cfg)}
    step_only = runs["ours, step only"]
    runs["ours, step only"] = lambda: [step_only() for _ in range(steps)]
    times = alternate(runs, device, warmup=1, repeats=repeats)
    ratio = speedup(times, "ours", "authors")
    rows = []
    for variant, seconds in times.items():
        rows.append({"model": model, "data": data_name, "variant": variant,
                     "augment": augment if variant == "ours" else ("-" if "only" in variant else "reference"),
                     "workers": workers, "img_per_s": steps * batch / statistics.median(seconds),
                     "speedup_vs_authors": ratio if variant == "ours" else None})
    only = next(r for r in rows if r["variant"] == "ours, step only")["img_per_s"]
    for row in rows:
        row["share_of_step_only"] = row["img_per_s"] / only
    return rows


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
        _sync(device)
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


# ---------------------------------------------------------------------------- report

def markdown_table(rows: list[dict], columns: list[str], titles: list[str] | None = None) -> str:
    """A markdown table of ``rows`` (dicts) with the keys ``columns``, headed ``titles``
    (default: the keys)."""
    def fmt(value):
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(titles or columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python benchmarks/bench_train.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default="step,levers,data,e2e,profile",
                        help="comma-separated: step,levers,data,e2e,profile")
    parser.add_argument("--models", default="vit_tiny_16@224,vit_small_16@224,fmnist_demo")
    parser.add_argument("--lever-model", default="vit_tiny_16@224")
    parser.add_argument("--e2e-models", default=None, help="models of the e2e section (default: fmnist_demo and the first of --models)")
    parser.add_argument("--batch", type=int, default=8, help="batch for the 224 px models")
    parser.add_argument("--small-batch", type=int, default=128, help="batch for fmnist_demo")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (alternations where two are compared)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--e2e-steps", type=int, default=8, help="steps per timed e2e run")
    parser.add_argument("--data-images", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="loader workers in the e2e section")
    parser.add_argument("--augment", default=None, choices=["batched", "device", "per_sample"],
                        help="our data.augment in the e2e section (default: device on CUDA, batched on a CPU)")
    parser.add_argument("--compile", action="store_true", help="include torch.compile (slow to compile on CPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", default="benchmarks/results.json")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    precision = "bf16" if device.type == "cuda" else "fp32"
    augment = args.augment or ("device" if device.type == "cuda" else "batched")
    sections = set(args.sections.split(","))
    peak = matmul_peak(device, torch.bfloat16 if precision == "bf16" else torch.float32)
    report: dict[str, Any] = {
        "machine": {"device": str(device), "name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "precision": precision, "matmul_peak_gflops": peak / 1e9},
    }
    print(f"# MSN benchmarks ({report['machine']['name']}, {device}, {precision}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; measured matmul peak {peak / 1e9:.1f} GFLOP/s)\n")
    print("Ratios (speedup_vs_authors) are medians over runs of ours and the authors' recipe "
          "(benchmarks/reference_recipe.py) taken in turn; absolute rates move with the machine's load.\n")
    batch_of = lambda m: args.small_batch if m == "fmnist_demo" else args.batch  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="msn-bench-") as tmp:
        work = Path(tmp)
        if "step" in sections:
            rows = []
            for model in args.models.split(","):
                rows += bench_step([model], batch_of(model), device, precision, args.warmup, args.repeats, peak)
            report["step"] = rows
            print("## Train step (12 views, fwd + bwd + AdamW + EMA), ours against the authors'\n")
            print(markdown_table(rows, ["model", "variant", "batch", "precision", "step_s", "img_per_s", "gflop_per_step",
                                        "achieved_gflops", "mfu", "speedup_vs_authors", "peak_mem_gb"]) + "\n")
        if "levers" in sections:
            model = args.lever_model
            rows = bench_levers(model, batch_of(model), device, precision, args.warmup, args.repeats, args.compile)
            report["levers"] = rows
            print(f"## Levers, one at a time ({model})\n")
            print(markdown_table(rows, ["lever", "setting", "step_s", "img_per_s"]) + "\n")
        if "data" in sections:
            rows = bench_data(args.small_batch // 4, args.repeats, work, args.data_images)
            report["data"] = rows
            print("## Data pipeline (12-view samples per second on one core)\n")
            print(markdown_table(rows, ["data", "pipeline", "samples_per_s_per_core", "vs_reference"]) + "\n")
        if "e2e" in sections:
            rows = []
            models = args.e2e_models.split(",") if args.e2e_models else ["fmnist_demo", args.models.split(",")[0]]
            for model in models:
                rows += bench_e2e(model, batch_of(model), args.e2e_steps, args.repeats, work, args.workers, augment,
                                  device, precision)
            report["e2e"] = rows
            print("## End to end (loader + step), ours against the authors' recipe\n")
            print(markdown_table(rows, ["model", "data", "variant", "augment", "workers", "img_per_s",
                                        "speedup_vs_authors", "share_of_step_only"]) + "\n")
        if "profile" in sections:
            model = args.lever_model
            profiled = bench_profile(model, batch_of(model), device, precision, args.repeats)
            report["profile"] = profiled
            print(f"## Profile of our step ({model}): top operators by self time\n")
            print(markdown_table(profiled["operators"], ["operator", "self_ms", "calls", "share"]) + "\n")
            print("## The step's smaller parts, alone\n")
            print(markdown_table(profiled["parts"], ["part", "choice", "ms"]) + "\n")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    main()
