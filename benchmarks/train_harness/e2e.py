"""Section ``e2e``: loader + step throughput, ours against the authors' recipe, and our step
alone on a fixed batch (what the loader should keep up with)."""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path

import torch

from train_harness.data import train_loader, write_jpeg_folder
from train_harness.runner import StepRunner, bench_config
from train_harness.timing import alternate, speedup


class LoaderSteps:
    """``steps`` training steps fed by a loader, continuing where the last call stopped
    (epochs restart as needed): one e2e measurement."""

    def __init__(self, loader, runner: StepRunner, steps: int):
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
    runs = {"ours": LoaderSteps(train_loader(cfg, dataset, augment, workers, pin), StepRunner(cfg), steps),
            "authors": LoaderSteps(train_loader(cfg, dataset, "reference", workers, pin), StepRunner(cfg, authors=True), steps),
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
