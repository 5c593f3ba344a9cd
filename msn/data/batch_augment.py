"""Photometric augmentation of a whole batch with per-sample random parameters.

The reference applies colour jitter, grayscale and blur image by image with PIL, which costs
more than the model step on small images. Here each operation runs once over the batch
(on uint8->float tensors, on the CPU in the loader or on the GPU), with every image drawing
its own parameters, including the random order of the four colour-jitter operations, so the
distribution is the one of torchvision's ``ColorJitter``/``RandomGrayscale``/``GaussianBlur``
applied per image (docs/method.md Sec. 1). Each operation matches the torchvision functional
of the same name on float images (tests/test_data_batch_augment.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from msn.data.transforms import blur_kernel_size

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

    def sample(self, n: int, generator: torch.Generator) -> PhotometricParams:
        """Draw every image's parameters on the CPU (identical on every device)."""
        b, c, s, h = self.strength
        low = torch.tensor([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h])
        high = torch.tensor([1 + b, 1 + c, 1 + s, h])
        factors = low + (high - low) * torch.rand(n, 4, generator=generator)
        lo, hi = self.sigma_range
        return PhotometricParams(
            jitter=torch.rand(n, generator=generator) < self.jitter_p,
            factors=factors,
            order=torch.rand(n, 4, generator=generator).argsort(dim=1),
            gray=torch.rand(n, generator=generator) < self.gray_p,
            blur=torch.rand(n, generator=generator) < self.blur_p,
            sigma=lo + (hi - lo) * torch.rand(n, generator=generator),
        )

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


def sample_crop_boxes(count: int, height: int, width: int, scale: tuple[float, float],
                      generator: torch.Generator, ratio: tuple[float, float] = (3 / 4, 4 / 3),
                      attempts: int = 10) -> torch.Tensor:
    """RandomResizedCrop boxes for ``count`` crops of an ``height x width`` image, vectorised.

    Same algorithm as torchvision's ``RandomResizedCrop``: up to ``attempts`` draws of an area
    fraction in ``scale`` and a log-uniform aspect ratio, the first that fits wins, else a
    central crop. Returns float [count, 4] boxes ``(x0, y0, x1, y1)`` in pixels.
    """
    area = height * width
    target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(count, attempts, generator=generator))
    low, high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(low + (high - low) * torch.rand(count, attempts, generator=generator))
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(fits.any(dim=1), fits.float().argmax(dim=1), torch.full((count,), -1))
    rows = torch.arange(count)
    w, h = w[rows, first.clamp_min(0)], h[rows, first.clamp_min(0)]
    u_top, u_left = torch.rand(count, generator=generator), torch.rand(count, generator=generator)
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
    batch. :meth:`sample` draws them (host, seeded generator), :meth:`render` applies them on
    whatever device holds the images.

    Args:
        views_cfg: a :class:`msn.config.ViewsConfig`.
    """

    def __init__(self, views_cfg):
        self.cfg = views_cfg
        self.rand = BatchPhotometric(views_cfg, views_cfg.rand_size)
        self.focal = BatchPhotometric(views_cfg, views_cfg.focal_size)

    def sample(self, count: int, height: int, width: int, generator: torch.Generator) -> ViewPlan:
        """The plan of a batch of ``count`` images of ``height x width``."""
        cfg = self.cfg

        def geometry(views: int, scale) -> tuple[torch.Tensor, torch.Tensor]:
            boxes = sample_crop_boxes(views * count, height, width, tuple(scale), generator)
            return boxes, torch.rand(views * count, generator=generator) < cfg.hflip

        rand_boxes, rand_flip = geometry(2, cfg.rand_scale)
        rand_params = self.rand.sample(2 * count, generator)
        focal_boxes = focal_flip = focal_params = None
        if cfg.num_focal:
            focal_boxes, focal_flip = geometry(cfg.num_focal, cfg.focal_scale)
            focal_params = self.focal.sample(cfg.num_focal * count, generator)
        return ViewPlan(rand_boxes, rand_flip, rand_params, focal_boxes, focal_flip, focal_params)

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
        """Sample and render at once (``data.augment=batched``)."""
        return self.render(images, self.sample(images.shape[0], *images.shape[-2:], generator))


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
