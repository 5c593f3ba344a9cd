"""Benchmark harness: ``python benchmarks/bench_train.py`` prints Markdown tables and writes JSON.

Every timed step is :class:`msn.train.MSNStep`, the object the trainer calls; the variants
(one forward per view, masked tokens zeroed instead of dropped) only swap its online-forward
module, so what is measured is what trains.

What it measures (each number is the median of ``--repeats`` timed runs after warm-up):

1. ``step``: one full MSN training step (all 12 views, forward + backward + AdamW + EMA) in
   images/s, its FLOPs (``torch.utils.flop_counter``), achieved FLOP/s and MFU against the
   machine's measured fp32 (or bf16 on CUDA) matmul peak, and peak memory.
2. ``levers``: one change at a time from our default step: mask ratio 0 / 0.15 / 0.5 / 0.7,
   per-view forwards instead of one forward per resolution group, eager instead of SDPA
   attention, ``torch.compile`` on, channels_last; and the anchor branch (forward + backward
   of the masked anchors alone) at each mask ratio.
3. ``data``: decoded + augmented 12-view samples/s on ONE core, for our pipeline (uint8 crops
   per image, batched photometric augmentation) and for a plain per-image PIL pipeline that
   follows the reference recipe, on an ImageFolder of JPEGs written by the harness, and on
   Fashion-MNIST-sized 28 px images.
4. ``e2e``: end-to-end training throughput (loader + step) of our trainer against a
   straightforward baseline that follows the reference recipe (per-image PIL augmentation,
   per-view forwards, eager attention, dropped tokens replaced by zeroed tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
    """:class:`msn.train.MSNStep` on a fixed batch; ``forward`` swaps its online-forward module
    (``None``: the trainer's own)."""

    def __init__(self, cfg: MSNConfig, channels_last: bool = False, **forward):
        self.device = resolve_device(cfg.device)
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
    rows = []
    for model in models:
        cfg = bench_config(model, batch, device=str(device), precision=precision)
        runner = StepRunner(cfg)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = timed(runner, device, warmup, repeats)
        flops = count_flops(runner)
        memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        rows.append({"model": model, "batch": batch, "precision": precision, "step_s": seconds,
                     "img_per_s": batch / seconds, "gflop_per_step": flops / 1e9,
                     "achieved_gflops": flops / seconds / 1e9, "mfu": flops / seconds / peak,
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


class ReferencePILViews:
    """Per-image PIL pipeline following the reference recipe (torchvision v1 on PIL)."""

    def __init__(self, views_cfg):
        from PIL import ImageFilter
        from torchvision import transforms as T

        class Blur:
            def __init__(self, p, lo, hi):
                self.p, self.lo, self.hi = p, lo, hi

            def __call__(self, image):
                if torch.rand(()) > self.p:
                    return image
                radius = self.lo + (self.hi - self.lo) * float(torch.rand(()))
                return image.filter(ImageFilter.GaussianBlur(radius=radius))

        s = views_cfg.color_jitter

        def build(size, scale):
            return T.Compose([
                T.RandomResizedCrop(size, scale=tuple(scale)),
                T.RandomHorizontalFlip(),
                T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
                T.RandomGrayscale(p=0.2),
                Blur(views_cfg.blur_prob, *views_cfg.blur_sigma),
                T.ToTensor(),
                T.Normalize(views_cfg.mean, views_cfg.std),
            ])

        self.rand = build(views_cfg.rand_size, views_cfg.rand_scale)
        self.focal = build(views_cfg.focal_size, views_cfg.focal_scale)
        self.num_focal = views_cfg.num_focal

    def __call__(self, image):
        return [self.rand(image), self.rand(image)] + [self.focal(image) for _ in range(self.num_focal)]


class ReferencePILDataset(torch.utils.data.Dataset):
    """ImageFolder read with PIL and augmented image by image (the baseline loader)."""

    def __init__(self, base, views_cfg, pil_images: bool):
        self.base, self.views = base, ReferencePILViews(views_cfg)
        self.pil_images = pil_images

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        from PIL import Image
        from torchvision.transforms.v2 import functional as TF

        _, index = key
        if self.pil_images:
            path, label = self.base.samples[index]
            with Image.open(path) as image:
                pil = image.convert("RGB")
        else:
            tensor, label = self.base[index]
            pil = TF.to_pil_image(tensor)
        return self.views(pil), label, key


def _loader(cfg: MSNConfig, dataset, batched: bool, workers: int, plain: bool):
    from dataclasses import replace
    from msn.data import MultiViewCollate, ResumableSampler, build_multiview_data, build_train_loader

    views = cfg.data.views
    if plain:
        data = ReferencePILDataset(dataset, views, pil_images=hasattr(dataset, "samples"))
        collate = MultiViewCollate()
    else:
        data_cfg = replace(cfg.data, augment="batched" if batched else "per_sample")
        data, collate = build_multiview_data(dataset, data_cfg, cfg.seed)
    sampler = ResumableSampler(len(dataset), cfg.optim.batch_size, cfg.seed)
    return build_train_loader(data, sampler, workers, collate=collate)


def bench_data(batch: int, repeats: int, workdir: Path, images: int) -> list[dict]:
    """Samples/s on one core (num_workers=0, one thread) for each pipeline."""
    from msn.data import ImageFolderDataset, SyntheticImages, fixed_image_size

    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        folder = ImageFolderDataset(str(write_jpeg_folder(workdir / "jpegs", images)))
        small = SyntheticImages(images, 10, 28)
        for name, dataset, model in (("ImageFolder JPEG 375x500 -> 224/96", folder, "vit_small_16@224"),
                                     ("28 px images -> 28/12", small, "fmnist_demo")):
            cfg = bench_config(model, batch)
            ours = "ours: batched crops + photometric" if fixed_image_size(dataset) else "ours: uint8 crops + batched photometric"
            for pipeline, batched, plain in ((ours, True, False),
                                             ("torchvision v2 per image", False, False),
                                             ("plain PIL per image (reference recipe)", False, True)):
                loader = _loader(cfg, dataset, batched, 0, plain)
                runs = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    count = sum(b.size for b in loader)
                    runs.append(count / (time.perf_counter() - start))
                rows.append({"data": name, "pipeline": pipeline, "samples_per_s_per_core": statistics.median(runs)})
            if hasattr(dataset, "samples"):  # the decoder alone bounds every pipeline on JPEGs
                from msn.data.datasets import decode_rgb

                start = time.perf_counter()
                for path, _ in dataset.samples:
                    decode_rgb(path)
                rows.append({"data": name, "pipeline": "JPEG decode only (PIL), no augmentation: the ceiling",
                             "samples_per_s_per_core": len(dataset.samples) / (time.perf_counter() - start)})
    finally:
        torch.set_num_threads(threads)
    return rows


def bench_e2e(model: str, batch: int, steps: int, workdir: Path, workers: int) -> list[dict]:
    """Loader + step throughput of our trainer vs the reference-recipe baseline."""
    from msn.data import ImageFolderDataset, SyntheticImages

    rows = []
    if model == "fmnist_demo":
        dataset, data_name = SyntheticImages(batch * (steps + 1), 10, 28), "28 px images"
    else:
        folder = workdir / "jpegs"
        if not folder.is_dir():
            write_jpeg_folder(folder, max(64, batch * 2))
        dataset, data_name = ImageFolderDataset(str(folder)), "ImageFolder JPEG"
    for variant in ("ours", "baseline"):
        ours = variant == "ours"
        cfg = bench_config(model, batch, attention="sdpa" if ours else "eager", mask={"shared": not ours})
        runner = StepRunner(cfg) if ours else StepRunner(cfg, per_view=True, zero_tokens=True)
        loader = _loader(cfg, dataset, batched=ours, workers=workers, plain=not ours)
        done, start = 0, None
        for epoch in range(10**6):
            loader.sampler.set_position(epoch)
            for b in loader:
                if done == 1:
                    start = time.perf_counter()  # the first step warms up
                runner.step_fn(b, done)
                done += 1
                if done > steps:
                    break
            if done > steps:
                break
        seconds = time.perf_counter() - start
        rows.append({"model": model, "data": data_name, "variant": variant, "img_per_s": steps * batch / seconds})
    return rows


# ---------------------------------------------------------------------------- report

def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(value):
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python benchmarks/bench_train.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default="step,levers,data,e2e", help="comma-separated: step,levers,data,e2e")
    parser.add_argument("--models", default="vit_tiny_16@224,vit_small_16@224,fmnist_demo")
    parser.add_argument("--lever-model", default="vit_tiny_16@224")
    parser.add_argument("--batch", type=int, default=8, help="batch for the 224 px models")
    parser.add_argument("--small-batch", type=int, default=128, help="batch for fmnist_demo")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--e2e-steps", type=int, default=8)
    parser.add_argument("--data-images", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="loader workers in the e2e section")
    parser.add_argument("--compile", action="store_true", help="include torch.compile (slow to compile on CPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", default="benchmarks/results.json")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    precision = "bf16" if device.type == "cuda" else "fp32"
    sections = set(args.sections.split(","))
    peak = matmul_peak(device, torch.bfloat16 if precision == "bf16" else torch.float32)
    report: dict[str, Any] = {
        "machine": {"device": str(device), "name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "precision": precision, "matmul_peak_gflops": peak / 1e9},
    }
    print(f"# MSN benchmarks ({report['machine']['name']}, {device}, {precision}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; measured matmul peak {peak / 1e9:.1f} GFLOP/s)\n")
    batch_of = lambda m: args.small_batch if m == "fmnist_demo" else args.batch  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="msn-bench-") as tmp:
        work = Path(tmp)
        if "step" in sections:
            rows = []
            for model in args.models.split(","):
                rows += bench_step([model], batch_of(model), device, precision, args.warmup, args.repeats, peak)
            report["step"] = rows
            print("## Train step (12 views, fwd + bwd + AdamW + EMA)\n")
            print(markdown_table(rows, ["model", "batch", "precision", "step_s", "img_per_s", "gflop_per_step",
                                        "achieved_gflops", "mfu", "peak_mem_gb"]) + "\n")
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
            print(markdown_table(rows, ["data", "pipeline", "samples_per_s_per_core"]) + "\n")
        if "e2e" in sections:
            rows = []
            for model in ("fmnist_demo", args.models.split(",")[0]):
                rows += bench_e2e(model, batch_of(model), args.e2e_steps, work, args.workers)
            report["e2e"] = rows
            print("## End to end (loader + step)\n")
            print(markdown_table(rows, ["model", "data", "variant", "img_per_s"]) + "\n")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    main()
