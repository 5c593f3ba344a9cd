"""The baseline of the benchmarks: a reconstruction of the authors' step, tested equal in float64,
and of their data path. It is written from their published description and code structure
(docs/method.md Sec. 6) as a subclass of our :class:`msn.train.MSNStep`, not taken from their code.
Tested equal: one update of :class:`AuthorsStep` and one of our step, on the same weights, batch
and kept tokens, give the same weights, target, prototypes and loss in float64 (to 1e-9), with
nothing masked (tests/test_benchmarks.py::test_authors_baseline_is_the_same_step_in_exact_arithmetic)
and with the paper's ViT-S mask, ratio 0.15 shared by the batch (tests/test_authors_step.py).

What the authors' step does, and this reconstruction does too:

* one forward per resolution group (anchors, then all focal views), the anchors' dropped
  tokens removed with ONE random subset for the whole batch;
* eager attention (``q @ k^T``, softmax, ``@ v``), the full last block (all tokens);
* the MSN loss in float32 (ours: equal to theirs to 1e-12, tests/test_losses.py);
* ``torch.optim.AdamW`` with PyTorch's default kernel choice, ``clip_grad_norm_`` of the
  encoder, a norm per weight gradient read to the host for logging every step;
* the EMA as a Python loop of ``mul_`` / ``add_`` per parameter;
* per-image PIL augmentation (torchvision v1 transforms on PIL images).

Where it is not the authors' code: the shared subset is drawn by our
:class:`msn.masking.AnchorMasks` (a generator seeded by the run's seed and the step, positions
sorted), theirs by ``1 + torch.randperm(N)[:K]`` from the global generator at each anchor forward,
in that random order. The order of the kept tokens does not change the update (tested in
tests/test_authors_step.py); which subset a step keeps differs, which changes neither the number
of kept tokens nor the work of the step.
"""

from __future__ import annotations

import torch
from torch import nn

from msn.config import MSNConfig
from msn.models import MSNNetwork
from msn.train import MSNStep


class FullBlocksForward(nn.Module):
    """The online forwards as the authors run them: one call per resolution group, every
    block on every token (the CLS-only last block is ours)."""

    def __init__(self, network: MSNNetwork):
        super().__init__()
        self.network = network

    def _embed(self, images: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        tokens, _ = self.network.backbone.forward_blocks(images, keep)
        return self.network.head(tokens[:, 0])

    def forward(self, anchor: torch.Tensor, keep: torch.Tensor | None, focal: torch.Tensor) -> torch.Tensor:
        outputs = [self._embed(anchor, keep)]
        if focal.numel():
            outputs.append(self._embed(focal, None))
        return torch.cat(outputs)


class AuthorsStep(MSNStep):
    """A reconstruction of the authors' step, tested equal in float64 (module docstring;
    tests/test_authors_step.py, tests/test_benchmarks.py): :class:`msn.train.MSNStep` with the
    authors' choices wherever they differ from ours. Build with :meth:`from_reference_config`."""

    @classmethod
    def from_reference_config(cls, cfg: MSNConfig, device: torch.device) -> "AuthorsStep":
        """``cfg`` with eager attention, one shared mask and PyTorch's default AdamW kernel."""
        from dataclasses import replace

        cfg = replace(cfg, model=replace(cfg.model, attention="eager"), mask=replace(cfg.mask, shared=True),
                      optim=replace(cfg.optim, fused="false"))
        step = cls.from_config(cfg, device, steps_per_epoch=1)
        step.online = FullBlocksForward(step.network)
        return step

    def update(self, out, step: int) -> None:
        from msn.train.optim import set_lr_and_wd

        values = self.schedules.at_update(step)
        set_lr_and_wd(self.optimizer, values["lr"], values["wd"])
        self.optimizer.zero_grad()
        out.loss.backward()
        self._reduce_prototype_grad()
        self.grad_norms = [float(torch.norm(p.grad)) for n, p in self.network.named_parameters()
                           if p.grad is not None and not (n.endswith(".bias") or p.ndim == 1)]
        if self.cfg.optim.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.cfg.optim.clip_grad)
        self.optimizer.step()
        with torch.no_grad():
            m = values["momentum"]
            for online, target in zip(self.network.parameters(), self.target.parameters()):
                target.mul_(m).add_((1.0 - m) * online.detach())


class ReferencePILViews:
    """Per-image PIL augmentation following the reference recipe (torchvision v1 on PIL)."""

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
