"""Section ``data``: 12-view samples/s on one core for each ``data.augment`` mode and the
authors' per-image PIL pipeline, on generated JPEGs and on 28 px images; and the loaders and
JPEG folders the ``e2e`` section reads."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from msn.config import MSNConfig
from reference_recipe import ReferencePILDataset
from train_harness.runner import bench_config


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


def train_loader(cfg: MSNConfig, dataset, augment: str, workers: int, pin_memory: bool = False):
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
                loader = train_loader(cfg, dataset, augment, 0)
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
                from msn.data.decode import decode_rgb

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
