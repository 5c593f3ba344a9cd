"""Photometric augmentation of a whole batch with per-sample random parameters.

The reference applies colour jitter, grayscale and blur image by image with PIL, which costs
more than the model step on small images. Here each operation runs once over the batch
(on uint8->float tensors, on the CPU in the loader or on the GPU), with every image drawing
its own parameters, including the random order of the four colour-jitter operations, so the
distribution is the one of torchvision's ``ColorJitter``/``RandomGrayscale``/``GaussianBlur``
applied per image (docs/method.md Sec. 1). Each operation matches the torchvision functional
of the same name on float images (tests/test_data_batch_augment.py).

Every random number of a view comes from :func:`view_uniforms`, the one source of the
``batched`` and ``device`` paths: a block of uniforms per image, drawn from a generator
seeded by the image's ``(seed, epoch, index)`` alone. The parameters are functions of those
uniforms (:func:`crop_boxes`, :meth:`BatchPhotometric.params`, :meth:`BatchMultiView.sample`),
so an image's views do not depend on the batch it is in: not on the number of ranks the global
batch is split over, nor on the unreadable images dropped beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from msn.data.transforms import CROP_RATIO, blur_kernel_size, sample_seed

LUMA = (0.2989, 0.587, 0.114)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of [N, 3, H, W] images, [N, 1, H, W]."""
    r, g, b = images.unbind(dim=1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(1)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    factor = factor.view(-1, 1, 1, 1)
    return (factor * images + (1.0 - factor) * other).clamp_(0.0, 1.0)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (images * factor.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(images, mean, factor)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(images, grayscale(images), factor)


def rgb_to_hsv(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] RGB in [0, 1] -> HSV with hue in [0, 1)."""
    r, g, b = images.unbind(dim=1)
    maxc, _ = images.max(dim=1)
    minc, _ = images.min(dim=1)
    delta = maxc - minc
    flat = delta == 0
    safe_delta = torch.where(flat, torch.ones_like(delta), delta)
    saturation = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    hue_r = ((g - b) / safe_delta) % 6.0
    hue_g = (b - r) / safe_delta + 2.0
    hue_b = (r - g) / safe_delta + 4.0
    hue = torch.where(maxc == r, hue_r, torch.where(maxc == g, hue_g, hue_b))
    hue = torch.where(flat, torch.zeros_like(hue), hue) / 6.0
    return torch.stack([hue % 1.0, saturation, maxc], dim=1)


def hsv_to_rgb(images: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv`."""
    hue, saturation, value = images.unbind(dim=1)
    sector = hue * 6.0
    # each channel n in (5, 3, 1) for (r, g, b): v - v*s*max(0, min(k, 4-k, 1)), k = (n + 6h) mod 6
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = (n + sector) % 6.0
        weight = torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)
        channels.append(value - value * saturation * weight)
    return torch.stack(channels, dim=1)


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    hsv = rgb_to_hsv(images)
    hue = (hsv[:, 0] + shift.view(-1, 1, 1)) % 1.0
    return hsv_to_rgb(torch.stack([hue, hsv[:, 1], hsv[:, 2]], dim=1)).clamp_(0.0, 1.0)


def gaussian_kernels(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Normalised 1-D Gaussian kernels [N, kernel_size], one per sigma."""
    half = (kernel_size - 1) / 2.0
    offsets = torch.linspace(-half, half, kernel_size, device=sigma.device, dtype=sigma.dtype)
    weights = torch.exp(-0.5 * (offsets[None, :] / sigma[:, None]) ** 2)
    return weights / weights.sum(dim=1, keepdim=True)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma and reflect padding."""
    n, c, h, w = images.shape
    kernels = gaussian_kernels(sigma.to(images.dtype), kernel_size).repeat_interleave(c, dim=0)
    pad = kernel_size // 2
    x = images.reshape(1, n * c, h, w)
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, kernels.view(n * c, 1, 1, kernel_size), groups=n * c)
    x = F.conv2d(x, kernels.view(n * c, 1, kernel_size, 1), groups=n * c)
    return x.view(n, c, h, w)


def _update_rows(x: torch.Tensor, chosen: torch.Tensor, op, by_mask: bool) -> torch.Tensor:
    """``x`` with the rows where ``chosen`` holds replaced by ``op(rows)``.

    ``by_mask`` runs ``op`` on every row (``rows`` is a slice) and selects with
    ``torch.where``; otherwise only the chosen rows are gathered, transformed and written back.
    """
    if by_mask:
        return torch.where(chosen.view(-1, 1, 1, 1), op(slice(None)), x)
    rows = chosen.nonzero().flatten()
    if rows.numel():
        x[rows] = op(rows)
    return x


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)

# ---------------------------------------------------------------------------- random numbers
#: RandomResizedCrop's tries of an area and an aspect ratio before its central fallback
CROP_ATTEMPTS = 10
#: Uniforms of one crop: the area fraction of each attempt, the log aspect ratio of each
#: attempt, then the top and the left offset (:func:`crop_boxes`).
CROP_DRAWS = 2 * CROP_ATTEMPTS + 2
#: Uniforms of one view's photometric parameters: 4 jitter factors, whether to jitter, 4 sort
#: keys of the jitter order, grayscale, blur, blur sigma (:meth:`BatchPhotometric.params`).
PHOTOMETRIC_DRAWS = 12
#: Uniforms of one view, in this order: its crop, its flip, its photometric parameters.
VIEW_DRAWS = CROP_DRAWS + 1 + PHOTOMETRIC_DRAWS
_FLIP = CROP_DRAWS
_PHOTOMETRIC = slice(CROP_DRAWS + 1, VIEW_DRAWS)


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


@dataclass
class PhotometricParams:
    """Per-image parameters of one batch (see :meth:`BatchPhotometric.sample`)."""

    jitter: torch.Tensor     # [N] bool, colour jitter applied
    factors: torch.Tensor    # [N, 4] brightness, contrast, saturation factors and hue shift
    order: torch.Tensor      # [N, 4] permutation of the four jitter operations
    gray: torch.Tensor       # [N] bool
    blur: torch.Tensor       # [N] bool
    sigma: torch.Tensor      # [N]


class BatchPhotometric:
    """Colour jitter (p), grayscale (p), Gaussian blur (p) and normalisation of a batch.

    Args:
        views_cfg: a :class:`msn.config.ViewsConfig` (jitter strength and probabilities,
            blur sigma range, mean/std).
        size: side of the views this instance handles (sets the blur kernel size).
    """

    def __init__(self, views_cfg, size: int):
        s = views_cfg.color_jitter
        self.strength = (0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)
        self.jitter_p = views_cfg.color_jitter_prob
        self.gray_p = views_cfg.grayscale_prob
        self.blur_p = views_cfg.blur_prob
        self.sigma_range = tuple(views_cfg.blur_sigma)
        self.kernel_size = blur_kernel_size(self.sigma_range[1], size)
        self.mean = torch.tensor(views_cfg.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(views_cfg.std).view(1, 3, 1, 1)

    def params(self, uniforms: torch.Tensor) -> PhotometricParams:
        """The parameters of ``N`` images from their uniforms [N, PHOTOMETRIC_DRAWS] (on the
        CPU, so identical on every device): ``ColorJitter``'s factors uniform in
        ``[max(0, 1 - s), 1 + s]`` (hue ``[-s, s]``) and a uniformly random order of its four
        operations (the argsort of four uniforms), each operation applied with its
        probability, blur sigma uniform in its range."""
        b, c, s, h = self.strength
        low = torch.tensor([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h])
        high = torch.tensor([1 + b, 1 + c, 1 + s, h])
        lo, hi = self.sigma_range
        return PhotometricParams(
            jitter=uniforms[:, 4] < self.jitter_p,
            factors=low + (high - low) * uniforms[:, 0:4],
            order=uniforms[:, 5:9].argsort(dim=1, stable=True),
            gray=uniforms[:, 9] < self.gray_p,
            blur=uniforms[:, 10] < self.blur_p,
            sigma=lo + (hi - lo) * uniforms[:, 11],
        )

    def sample(self, n: int, generator: torch.Generator) -> PhotometricParams:
        """The parameters of ``n`` images from one ``generator`` (tests, benchmarks; the loader
        draws per image, :func:`view_uniforms`)."""
        return self.params(torch.rand(n, PHOTOMETRIC_DRAWS, generator=generator))

    def apply(self, images: torch.Tensor, params: PhotometricParams, select: str = "auto") -> torch.Tensor:
        """uint8 or float [N, 3, H, W] -> normalised float32 views.

        Args:
            select: how an operation reaches the images that drew it. ``index``: gathered and
                written back (no wasted work; each gather synchronises a GPU with the host);
                ``mask``: computed for every image and kept where drawn (``torch.where``, no
                synchronisation: the GPU path). ``auto``: ``index`` on the CPU, else ``mask``.
                Both give the same values up to float rounding (tested).
        """
        device = images.device
        x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float().clone()
        jitter, factors, order = params.jitter.to(device), params.factors.to(device), params.order.to(device)
        gray, blur, sigma = params.gray.to(device), params.blur.to(device), params.sigma.to(device)
        by_mask = select == "mask" or (select == "auto" and device.type != "cpu")
        for position in range(4):
            for op_index, op in enumerate(JITTER_OPS):
                chosen = jitter & (order[:, position] == op_index)
                x = _update_rows(x, chosen, lambda rows: op(x[rows], factors[rows, op_index]), by_mask)
        x = _update_rows(x, gray, lambda rows: grayscale(x[rows]).expand(-1, 3, -1, -1), by_mask)
        x = _update_rows(x, blur, lambda rows: gaussian_blur(x[rows], sigma[rows], self.kernel_size), by_mask)
        return (x - self.mean.to(device)) / self.std.to(device)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(images, self.sample(images.shape[0], generator))


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
    u_area, u_aspect = uniforms[:, :attempts].contiguous(), uniforms[:, attempts:2 * attempts].contiguous()
    u_top, u_left = uniforms[:, 2 * attempts].contiguous(), uniforms[:, 2 * attempts + 1].contiguous()
    area = height * width
    target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
    low, high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(low + (high - low) * u_aspect)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(fits.any(dim=1), fits.float().argmax(dim=1), torch.full((count,), -1))
    rows = torch.arange(count)
    w, h = w[rows, first.clamp_min(0)], h[rows, first.clamp_min(0)]
    top = torch.floor(u_top * (height - h + 1))
    left = torch.floor(u_left * (width - w + 1))
    fallback = first < 0
    if fallback.any():
        in_ratio = width / height
        if in_ratio < ratio[0]:
            fw, fh = width, round(width / ratio[0])
        elif in_ratio > ratio[1]:
            fw, fh = round(height * ratio[1]), height
        else:
            fw, fh = width, height
        w[fallback], h[fallback] = float(fw), float(fh)
        top[fallback], left[fallback] = float((height - fh) // 2), float((width - fw) // 2)
    return torch.stack([left, top, left + w, top + h], dim=1)


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


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, image_index: torch.Tensor, size: int,
                  flip: torch.Tensor | None = None) -> torch.Tensor:
    """Crop ``boxes`` out of ``images[image_index]`` and resize each to ``size x size``.

    Bilinear sampling with 2x2 samples averaged per output pixel (``roi_align``), so shrinking
    crops are smoothed; optional horizontal flip per crop (selected without a device
    synchronisation off the CPU). Float in, float out.
    """
    from torchvision.ops import roi_align

    rois = torch.cat([image_index.to(boxes.dtype).unsqueeze(1), boxes], dim=1).to(images.device, images.dtype)
    crops = roi_align(images, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    if flip is not None:
        crops = _update_rows(crops, flip.to(crops.device), lambda rows: crops[rows].flip(-1), crops.device.type != "cpu")
    return crops


@dataclass
class ViewPlan:
    """Every random choice :class:`BatchMultiView` makes for one batch, drawn on the host:
    crop boxes, flips and photometric parameters of the target/anchor pair (``rand_*``, view
    0 of every image, then view 1) and of the focal views (``focal_*``, view-major)."""

    rand_boxes: torch.Tensor
    rand_flip: torch.Tensor
    rand_params: PhotometricParams
    focal_boxes: torch.Tensor | None
    focal_flip: torch.Tensor | None
    focal_params: PhotometricParams | None


class BatchMultiView:
    """All views of a batch of equal-size uint8 images at once: crops, flips, photometric.

    Used by ``data.augment=batched`` (and ``device``) when the data set has a fixed image size
    (Fashion-MNIST, synthetic): every crop box, flip and photometric parameter is drawn per
    view and image, as torchvision would image by image, but each operation runs once over the
    batch. :meth:`sample` turns each image's uniforms (:func:`view_uniforms`) into the batch's
    plan (host), :meth:`render` applies it on whatever device holds the images.

    Args:
        views_cfg: a :class:`msn.config.ViewsConfig`.
    """

    def __init__(self, views_cfg):
        self.cfg = views_cfg
        self.rand = BatchPhotometric(views_cfg, views_cfg.rand_size)
        self.focal = BatchPhotometric(views_cfg, views_cfg.focal_size)

    @property
    def num_views(self) -> int:
        """Views per image: target, anchor and the focal views."""
        return 2 + self.cfg.num_focal

    def sample(self, uniforms: torch.Tensor, height: int, width: int) -> ViewPlan:
        """The plan of a batch of images of ``height x width`` from their uniforms
        [B, num_views, VIEW_DRAWS] (:func:`view_uniforms`)."""
        cfg = self.cfg

        def group(views: torch.Tensor, scale, photometric: BatchPhotometric):
            draws = view_major(views)
            boxes = crop_boxes(draws[:, :CROP_DRAWS], height, width, tuple(scale))
            return boxes, draws[:, _FLIP] < cfg.hflip, photometric.params(draws[:, _PHOTOMETRIC])

        rand = group(uniforms[:, :2], cfg.rand_scale, self.rand)
        focal = group(uniforms[:, 2:], cfg.focal_scale, self.focal) if cfg.num_focal else (None, None, None)
        return ViewPlan(*rand, *focal)

    def render(self, images: torch.Tensor, plan: ViewPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """uint8 [B, 3, H, W] -> (target [B], anchor [B], focal [V*B] view-major), normalised."""
        cfg, b = self.cfg, images.shape[0]
        x = images.float().div_(255.0)
        index = torch.arange(b)  # view-major: view 0 of every image, then view 1...
        pair = resized_crops(x, plan.rand_boxes, index.repeat(2), cfg.rand_size, plan.rand_flip)
        pair = self.rand.apply(pair, plan.rand_params)
        if plan.focal_boxes is None:
            focal = x.new_zeros(0, 3, cfg.focal_size, cfg.focal_size)
        else:
            focal = resized_crops(x, plan.focal_boxes, index.repeat(cfg.num_focal), cfg.focal_size, plan.focal_flip)
            focal = self.focal.apply(focal, plan.focal_params)
        return pair[:b], pair[b:], focal

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample (from one ``generator``) and render at once (tests, benchmarks)."""
        uniforms = torch.rand(images.shape[0], self.num_views, VIEW_DRAWS, generator=generator)
        return self.render(images, self.sample(uniforms, *images.shape[-2:]))


# ---------------------------------------------------------------------------- device augmentation
# ``data.augment=device``: the loader draws every parameter and ships uint8 pixels with one of
# these; ``MultiViewBatch.to(device)`` runs it there (docs/method.md Sec. 1).

@dataclass
class DeferredPhotometric:
    """Photometric augmentation still to run on uint8 crops (data sets of varying image size)."""

    rand: BatchPhotometric
    focal: BatchPhotometric
    rand_params: PhotometricParams
    focal_params: PhotometricParams | None

    @classmethod
    def sample(cls, rand: BatchPhotometric, focal: BatchPhotometric, uniforms: torch.Tensor) -> "DeferredPhotometric":
        """The photometric parameters of every view from the images' uniforms
        [B, views, VIEW_DRAWS] (:func:`view_uniforms`; views 0 and 1 the target and anchor)."""
        draws = uniforms[..., _PHOTOMETRIC]
        focal_params = focal.params(view_major(draws[:, 2:])) if draws.shape[1] > 2 else None
        return cls(rand, focal, rand.params(view_major(draws[:, :2])), focal_params)

    def apply(self, target: torch.Tensor, anchor: torch.Tensor, focal: torch.Tensor):
        both = self.rand.apply(torch.cat([target, anchor]), self.rand_params)
        focal = focal.float() if self.focal_params is None else self.focal.apply(focal, self.focal_params)
        return both[: target.shape[0]], both[target.shape[0]:], focal


@dataclass
class DeferredViews:
    """Every view still to make from the raw uint8 images (``target`` holds them; the anchor
    and focal tensors are empty), by :meth:`BatchMultiView.render` of ``plan``."""

    views: BatchMultiView
    plan: ViewPlan

    def apply(self, images: torch.Tensor, anchor: torch.Tensor, focal: torch.Tensor):
        return self.views.render(images, self.plan)
