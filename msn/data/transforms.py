"""MSN's multi-view augmentation (paper Sec. 3 / App. C; docs/method.md Sec. 1), torchvision v2.

One call turns a uint8 image into 1 target + 1 anchor view at ``rand_size`` (RandomResizedCrop
scale 0.3-1) and ``num_focal`` focal views at ``focal_size`` (scale 0.05-0.3), each with
horizontal flip, colour jitter, grayscale and Gaussian blur, then normalisation.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from msn.data.view_params import blur_kernel_size


def view_transform(views_cfg, size: int, scale: tuple[float, float]) -> v2.Compose:
    """Augmentation of one view on a uint8 tensor [3, H, W] -> normalised float32 [3, size, size].

    Args:
        views_cfg: a :class:`msn.config.ViewsConfig`.
        size: output side in pixels.
        scale: RandomResizedCrop area range.
    """
    s = views_cfg.color_jitter
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=tuple(scale), antialias=True),
            v2.RandomHorizontalFlip(views_cfg.hflip),
            v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=views_cfg.color_jitter_prob),
            v2.RandomGrayscale(views_cfg.grayscale_prob),
            v2.RandomApply(
                [v2.GaussianBlur(blur_kernel_size(views_cfg.blur_sigma[1], size), sigma=tuple(views_cfg.blur_sigma))],
                p=views_cfg.blur_prob,
            ),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(views_cfg.mean), list(views_cfg.std)),
        ]
    )


def geometric_transform(views_cfg, size: int, scale: tuple[float, float]) -> v2.Compose:
    """RandomResizedCrop + horizontal flip only, uint8 in and out (the per-image part of the
    ``batched`` augmentation; colour and blur follow in :mod:`msn.data.batch_augment`)."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=tuple(scale), antialias=True),
            v2.RandomHorizontalFlip(views_cfg.hflip),
        ]
    )


class MultiViewTransform:
    """uint8 image -> ``[target, anchor, focal_1, ..., focal_V]`` views.

    Target and anchor share a distribution but are independent draws; each focal view is an
    independent small crop of the image (not of the anchor).

    Args:
        views_cfg: a :class:`msn.config.ViewsConfig`.
        photometric: apply colour jitter, grayscale, blur and normalisation here, image by
            image (float32 views); ``False`` returns uint8 crops for batched photometric
            augmentation (:class:`msn.data.batch_augment.BatchPhotometric`).
    """

    def __init__(self, views_cfg, photometric: bool = True):
        self.num_focal = views_cfg.num_focal
        build = view_transform if photometric else geometric_transform
        self.rand = build(views_cfg, views_cfg.rand_size, views_cfg.rand_scale)
        self.focal = build(views_cfg, views_cfg.focal_size, views_cfg.focal_scale)

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        views = [self.rand(image), self.rand(image)]
        views.extend(self.focal(image) for _ in range(self.num_focal))
        return views


class CenterCrop(torch.nn.Module):
    """A centred ``size`` x ``size`` crop whose offsets are ``(H - size) // 2`` and
    ``(W - size) // 2``: transformers' image processors use this rule, so an exported model's
    ``preprocessor_config.json`` reproduces our evaluation pixel for pixel. (torchvision's
    ``CenterCrop`` rounds half to even, one pixel further when a margin is 3 modulo 4.)"""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        if height < self.size or width < self.size:
            raise ValueError(f"a {height}x{width} image is smaller than the {self.size} px centre crop")
        top, left = (height - self.size) // 2, (width - self.size) // 2
        return image[..., top: top + self.size, left: left + self.size]


def eval_transform(image_size: int, mean, std, resize_ratio: float = 256 / 224) -> v2.Compose:
    """Evaluation transform: Resize(image_size * 256/224) -> centre crop -> normalise.

    At 224 px this is the reference's Resize(256) -> CenterCrop(224) (the crop's offset rule:
    :class:`CenterCrop`).
    """
    return v2.Compose(
        [
            v2.Resize(int(round(image_size * resize_ratio)), antialias=True),
            CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )
