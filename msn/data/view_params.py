"""The one source of every random choice of MSN's views (docs/method.md Sec. 1).

Each image draws a block of uniforms keyed by its ``(seed, epoch, index)`` alone
(:func:`view_uniforms`); its crop boxes, flips and photometric parameters are functions of
those uniforms (:func:`crop_boxes`, :func:`group_params`, :func:`photometric_params`). Every
``data.augment`` mode turns the same uniforms into views: per image with torchvision's
functionals (:mod:`msn.data.transforms`) or over a whole batch
(:mod:`msn.data.batch_augment`), so an image's views depend neither on the batch it is in
nor on the number of ranks sharing the global batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from msn.data.seeds import sample_seed

#: RandomResizedCrop's aspect-ratio range (torchvision's default, the reference's)
CROP_RATIO = (3 / 4, 4 / 3)
#: RandomResizedCrop's tries of an area and an aspect ratio before its central fallback
CROP_ATTEMPTS = 10
#: Uniforms of one crop: the area fraction of each attempt, the log aspect ratio of each
#: attempt, then the top and the left offset (:func:`crop_boxes`).
CROP_DRAWS = 2 * CROP_ATTEMPTS + 2
#: Uniforms of one view's photometric parameters: 4 jitter factors, whether to jitter, 4 sort
#: keys of the jitter order, grayscale, blur, blur sigma (:func:`photometric_params`).
PHOTOMETRIC_DRAWS = 12
#: Uniforms of one view, in this order: its crop, its flip, its photometric parameters.
VIEW_DRAWS = CROP_DRAWS + 1 + PHOTOMETRIC_DRAWS
#: The column of a view's flip, and those of its photometric parameters.
FLIP_COLUMN = CROP_DRAWS
PHOTOMETRIC_COLUMNS = slice(CROP_DRAWS + 1, VIEW_DRAWS)


def view_uniforms(keys: Sequence[tuple[int, int]], seed: int, num_views: int) -> torch.Tensor:
    """Every random number of the views of a batch: float32 [B, num_views, VIEW_DRAWS] uniforms
    in [0, 1) (``torch.rand``'s), view ``v`` of image ``b`` in ``[b, v]`` (0 the target, 1 the
    anchor, then the focal views; columns as :data:`VIEW_DRAWS` says).

    Row ``b`` is drawn from torch's CPU generator seeded by ``sample_seed(seed, *keys[b])``
    (its 63 bits folded into the 32 that the generator keeps) and from nothing else, so it is
    the same whatever batch, rank or worker the image ``keys[b] = (epoch, index)`` lands in.
    """
    draws = torch.empty(len(keys), num_views * VIEW_DRAWS)
    generator = torch.Generator()
    for row, (epoch, index) in zip(draws, keys):
        key = sample_seed(seed, epoch, index)
        generator.manual_seed(key ^ (key >> 32))
        torch.rand(row.shape, generator=generator, out=row)
    return draws.view(len(keys), num_views, VIEW_DRAWS)


def view_major(per_image: torch.Tensor) -> torch.Tensor:
    """[B, V, ...] -> [V * B, ...]: view 0 of every image, then view 1... (the loader's order)."""
    return per_image.transpose(0, 1).flatten(0, 1)


def blur_kernel_size(sigma_max: float, image_size: int) -> int:
    """Odd kernel covering +-3 sigma, no wider than the image (reflect padding needs that)."""
    size = 2 * math.ceil(3 * sigma_max) + 1
    largest_odd = image_size - 1 if image_size % 2 == 0 else image_size
    return max(3, min(size, largest_odd))


def min_decode_pixels(views_cfg) -> int:
    """The fewest pixels a decoded image may have so that every random-resized crop of every
    view is still shrunk (or kept) to its output size, never enlarged: a crop of area fraction
    ``s`` and aspect ``r`` of an ``A``-pixel image has sides ``sqrt(s A r)`` and ``sqrt(s A / r)``,
    the shorter at least ``sqrt(s_min A 3/4)``, which must reach the view's side ``size``:
    ``A >= size^2 / (s_min * 3/4)``. Decoding a JPEG down to that size changes no crop's
    box (the fractions are drawn as before) and enlarges no crop."""
    shortest = min(CROP_RATIO[0], 1 / CROP_RATIO[1])
    groups = ((views_cfg.rand_size, views_cfg.rand_scale[0]), (views_cfg.focal_size, views_cfg.focal_scale[0]))
    return max(math.ceil(size**2 / (scale * shortest)) for size, scale in groups)


@dataclass
class PhotometricParams:
    """Per-view photometric parameters of ``N`` views (:func:`photometric_params`)."""

    jitter: torch.Tensor     # [N] bool, colour jitter applied
    factors: torch.Tensor    # [N, 4] brightness, contrast, saturation factors and hue shift
    order: torch.Tensor      # [N, 4] permutation of the four jitter operations
    gray: torch.Tensor       # [N] bool
    blur: torch.Tensor       # [N] bool
    sigma: torch.Tensor      # [N]


def photometric_params(uniforms: torch.Tensor, views_cfg) -> PhotometricParams:
    """The parameters of ``N`` views from their uniforms [N, PHOTOMETRIC_DRAWS] (on the CPU, so
    identical on every device): ``ColorJitter``'s factors uniform in ``[max(0, 1 - s), 1 + s]``
    (hue ``[-s, s]``) for the strengths ``0.8, 0.8, 0.8, 0.2`` times ``views_cfg.color_jitter``
    and a uniformly random order of its four operations (the argsort of four uniforms), each
    operation applied with its probability, blur sigma uniform in its range."""
    strength = views_cfg.color_jitter
    brightness = contrast = saturation = 0.8 * strength
    hue = 0.2 * strength
    low = torch.tensor([max(0.0, 1 - brightness), max(0.0, 1 - contrast), max(0.0, 1 - saturation), -hue])
    high = torch.tensor([1 + brightness, 1 + contrast, 1 + saturation, hue])
    sigma_low, sigma_high = views_cfg.blur_sigma
    return PhotometricParams(
        jitter=uniforms[:, 4] < views_cfg.color_jitter_prob,
        factors=low + (high - low) * uniforms[:, 0:4],
        order=uniforms[:, 5:9].argsort(dim=1, stable=True),
        gray=uniforms[:, 9] < views_cfg.grayscale_prob,
        blur=uniforms[:, 10] < views_cfg.blur_prob,
        sigma=sigma_low + (sigma_high - sigma_low) * uniforms[:, 11],
    )


def crop_boxes(uniforms: torch.Tensor, height: int, width: int, scale: tuple[float, float],
               ratio: tuple[float, float] = CROP_RATIO) -> torch.Tensor:
    """RandomResizedCrop boxes of an ``height x width`` image from uniforms, vectorised.

    Same algorithm as torchvision's ``RandomResizedCrop``: up to ``attempts`` draws of an area
    fraction in ``scale`` and a log-uniform aspect ratio, the first that fits wins, else a
    central crop. ``uniforms`` [count, 2 * attempts + 2]: the area draws, the aspect draws,
    the top and the left offset (:data:`CROP_DRAWS` columns at the default 10 attempts).
    Returns float [count, 4] boxes ``(x0, y0, x1, y1)`` in pixels.
    """
    count, attempts = uniforms.shape[0], (uniforms.shape[1] - 2) // 2
    # contiguous copies: the kernels below see the layouts of separate draws, so that
    # sample_crop_boxes gives the boxes it gave before these were one tensor (bit for bit)
    area_draws = uniforms[:, :attempts].contiguous()
    aspect_draws = uniforms[:, attempts:2 * attempts].contiguous()
    top_draws, left_draws = uniforms[:, 2 * attempts].contiguous(), uniforms[:, 2 * attempts + 1].contiguous()
    target_area = height * width * (scale[0] + (scale[1] - scale[0]) * area_draws)
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_low + (log_high - log_low) * aspect_draws)
    crop_width = torch.round(torch.sqrt(target_area * aspect))
    crop_height = torch.round(torch.sqrt(target_area / aspect))
    fits = (crop_width > 0) & (crop_width <= width) & (crop_height > 0) & (crop_height <= height)
    first = torch.where(fits.any(dim=1), fits.float().argmax(dim=1), torch.full((count,), -1))
    rows, chosen = torch.arange(count), first.clamp_min(0)
    crop_width, crop_height = crop_width[rows, chosen], crop_height[rows, chosen]
    top = torch.floor(top_draws * (height - crop_height + 1))
    left = torch.floor(left_draws * (width - crop_width + 1))
    fallback = first < 0
    if fallback.any():
        in_ratio = width / height
        if in_ratio < ratio[0]:
            fallback_width, fallback_height = width, round(width / ratio[0])
        elif in_ratio > ratio[1]:
            fallback_width, fallback_height = round(height * ratio[1]), height
        else:
            fallback_width, fallback_height = width, height
        crop_width[fallback], crop_height[fallback] = float(fallback_width), float(fallback_height)
        top[fallback] = float((height - fallback_height) // 2)
        left[fallback] = float((width - fallback_width) // 2)
    return torch.stack([left, top, left + crop_width, top + crop_height], dim=1)


def sample_crop_boxes(count: int, height: int, width: int, scale: tuple[float, float],
                      generator: torch.Generator, ratio: tuple[float, float] = CROP_RATIO,
                      attempts: int = CROP_ATTEMPTS) -> torch.Tensor:
    """:func:`crop_boxes` of ``count`` crops drawn from one ``generator`` (the area draws
    [count, attempts], the aspect draws, the tops [count], the lefts, in that order)."""
    uniforms = torch.cat([torch.rand(count, attempts, generator=generator),
                          torch.rand(count, attempts, generator=generator),
                          torch.rand(count, 1, generator=generator),
                          torch.rand(count, 1, generator=generator)], dim=1)
    return crop_boxes(uniforms, height, width, scale, ratio)


def group_params(draws: torch.Tensor, height: int, width: int, scale, views_cfg):
    """``(boxes [N, 4], flip [N] bool, PhotometricParams)`` of ``N`` views of one size group
    (the target/anchor pair, or the focal views) of ``height x width`` images, from their
    uniforms [N, VIEW_DRAWS]."""
    boxes = crop_boxes(draws[:, :CROP_DRAWS], height, width, tuple(scale))
    return boxes, draws[:, FLIP_COLUMN] < views_cfg.hflip, photometric_params(draws[:, PHOTOMETRIC_COLUMNS], views_cfg)
