"""What the sections time: :class:`msn.train.MSNStep`, the object the trainer calls, or the
reconstruction of the authors' step (:class:`reference_recipe.AuthorsStep`), on a benchmark
config with synthetic data and a fixed pre-augmented batch."""

from __future__ import annotations

import tempfile
from typing import Callable

import torch
from torch import nn

from msn.architectures import MODELS as PRESETS
from msn.config import MSNConfig, load_config
from msn.data import MultiViewBatch
from msn.models import MSNNetwork
from msn.runtime import resolve_device
from msn.train import MSNStep
from reference_recipe import AuthorsStep

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
