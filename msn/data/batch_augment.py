"""Photometric augmentation and crops of a whole batch with per-view parameters (docs/method.md Sec. 1).

The reference applies colour jitter, grayscale and blur image by image with PIL, which costs
more than the model step on small images. Here each operation runs once over the batch
(on uint8->float tensors, on the CPU in the loader or on the GPU), with every view taking
its own parameters, including the random order of the four colour-jitter operations, so the
distribution is the one of torchvision's ``ColorJitter``/``RandomGrayscale``/``GaussianBlur``
applied per image. Each operation matches the torchvision functional of the same name on
float images (tests/test_data_batch_augment.py).

Every parameter comes from :mod:`msn.data.view_params` (the uniforms of
:func:`~msn.data.view_params.view_uniforms`, keyed by each image's ``(seed, epoch, index)``),
the one source of the ``per_sample``, ``batched`` and ``device`` paths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from msn.data.view_params import (
    PHOTOMETRIC_COLUMNS,
    PHOTOMETRIC_DRAWS,
    VIEW_DRAWS,
    PhotometricParams,
    blur_kernel_size,
    group_params,
    photometric_params,
    view_major,
)


LUMA = (0.2989, 0.587, 0.114)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of [N, 3, H, W] images, [N, 1, H, W]."""
    red, green, blue = images.unbind(dim=1)
    return (LUMA[0] * red + LUMA[1] * green + LUMA[2] * blue).unsqueeze(1)


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
    red, green, blue = images.unbind(dim=1)
    maxc, _ = images.max(dim=1)
    minc, _ = images.min(dim=1)
    delta = maxc - minc
    flat = delta == 0
    safe_delta = torch.where(flat, torch.ones_like(delta), delta)
    saturation = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    hue_r = ((green - blue) / safe_delta) % 6.0
    hue_g = (blue - red) / safe_delta + 2.0
    hue_b = (red - green) / safe_delta + 4.0
    hue = torch.where(maxc == red, hue_r, torch.where(maxc == green, hue_g, hue_b))
    hue = torch.where(flat, torch.zeros_like(hue), hue) / 6.0
    return torch.stack([hue % 1.0, saturation, maxc], dim=1)


def hsv_to_rgb(images: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv`."""
    hue, saturation, value = images.unbind(dim=1)
    sector = hue * 6.0
    # channel offset n = 5, 3, 1 for red, green, blue: v - v*s*max(0, min(k, 4-k, 1)), k = (n + 6h) mod 6
    channels = []
    for offset in (5.0, 3.0, 1.0):
        position = (offset + sector) % 6.0
        weight = torch.clamp(torch.minimum(position, 4.0 - position), 0.0, 1.0)
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
    count, channels, height, width = images.shape
    planes = count * channels
    kernels = gaussian_kernels(sigma.to(images.dtype), kernel_size).repeat_interleave(channels, dim=0)
    pad = kernel_size // 2
    blurred = F.pad(images.reshape(1, planes, height, width), (pad, pad, pad, pad), mode="reflect")
    blurred = F.conv2d(blurred, kernels.view(planes, 1, 1, kernel_size), groups=planes)
    blurred = F.conv2d(blurred, kernels.view(planes, 1, kernel_size, 1), groups=planes)
    return blurred.view(count, channels, height, width)


def _update_rows(images: torch.Tensor, chosen: torch.Tensor, op, by_mask: bool) -> torch.Tensor:
    """``images`` with the rows where ``chosen`` holds replaced by ``op(rows)``.

    ``by_mask`` runs ``op`` on every row (``rows`` is a slice) and selects with
    ``torch.where``; otherwise only the chosen rows are gathered, transformed and written back.
    """
    if by_mask:
        return torch.where(chosen.view(-1, 1, 1, 1), op(slice(None)), images)
    rows = chosen.nonzero().flatten()
    if rows.numel():
        images[rows] = op(rows)
    return images


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)



class BatchPhotometric:
    """Colour jitter (p), grayscale (p), Gaussian blur (p) and normalisation of a batch.

    Args:
        views_cfg: a :class:`msn.config.ViewsConfig` (jitter strength and probabilities,
            blur sigma range, mean/std).
        size: side of the views this instance handles (sets the blur kernel size).
    """

    def __init__(self, views_cfg, size: int):
        self.views_cfg = views_cfg
        self.kernel_size = blur_kernel_size(views_cfg.blur_sigma[1], size)
        self.mean = torch.tensor(views_cfg.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(views_cfg.std).view(1, 3, 1, 1)

    def params(self, uniforms: torch.Tensor) -> PhotometricParams:
        """:func:`~msn.data.view_params.photometric_params` of ``N`` views' uniforms."""
        return photometric_params(uniforms, self.views_cfg)

    def sample(self, count: int, generator: torch.Generator) -> PhotometricParams:
        """The parameters of ``count`` images from one ``generator`` (tests, benchmarks; the loader
        draws per image, :func:`~msn.data.view_params.view_uniforms`)."""
        return self.params(torch.rand(count, PHOTOMETRIC_DRAWS, generator=generator))

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
        pixels = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float().clone()
        jitter, factors, order = params.jitter.to(device), params.factors.to(device), params.order.to(device)
        gray, blur, sigma = params.gray.to(device), params.blur.to(device), params.sigma.to(device)
        by_mask = select == "mask" or (select == "auto" and device.type != "cpu")
        for position in range(4):
            for op_index, op in enumerate(JITTER_OPS):
                chosen = jitter & (order[:, position] == op_index)
                pixels = _update_rows(pixels, chosen, lambda rows: op(pixels[rows], factors[rows, op_index]),
                                      by_mask)
        pixels = _update_rows(pixels, gray, lambda rows: grayscale(pixels[rows]).expand(-1, 3, -1, -1), by_mask)
        pixels = _update_rows(pixels, blur, lambda rows: gaussian_blur(pixels[rows], sigma[rows], self.kernel_size),
                              by_mask)
        return (pixels - self.mean.to(device)) / self.std.to(device)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(images, self.sample(images.shape[0], generator))


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
    batch. :meth:`sample` turns each image's uniforms
    (:func:`~msn.data.view_params.view_uniforms`) into the batch's plan (host), :meth:`render` applies it on whatever device holds the images.

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
        [B, num_views, VIEW_DRAWS] (:func:`~msn.data.view_params.view_uniforms`)."""
        cfg = self.cfg
        rand = group_params(view_major(uniforms[:, :2]), height, width, cfg.rand_scale, cfg)
        focal = (group_params(view_major(uniforms[:, 2:]), height, width, cfg.focal_scale, cfg) if cfg.num_focal
                 else (None, None, None))
        return ViewPlan(*rand, *focal)

    def render(self, images: torch.Tensor, plan: ViewPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """uint8 [B, 3, H, W] -> (target [B], anchor [B], focal [V*B] view-major), normalised."""
        cfg, batch_size = self.cfg, images.shape[0]
        pixels = images.float().div_(255.0)
        index = torch.arange(batch_size)  # view-major: view 0 of every image, then view 1...
        pair = resized_crops(pixels, plan.rand_boxes, index.repeat(2), cfg.rand_size, plan.rand_flip)
        pair = self.rand.apply(pair, plan.rand_params)
        if plan.focal_boxes is None:
            focal = pixels.new_zeros(0, 3, cfg.focal_size, cfg.focal_size)
        else:
            focal = resized_crops(pixels, plan.focal_boxes, index.repeat(cfg.num_focal), cfg.focal_size,
                                  plan.focal_flip)
            focal = self.focal.apply(focal, plan.focal_params)
        return pair[:batch_size], pair[batch_size:], focal

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample (from one ``generator``) and render at once (tests, benchmarks)."""
        uniforms = torch.rand(images.shape[0], self.num_views, VIEW_DRAWS, generator=generator)
        return self.render(images, self.sample(uniforms, *images.shape[-2:]))


# ---------------------------------------------------------------------------- device augmentation
# ``data.augment=device``: the loader draws every parameter and ships uint8 pixels with one of
# these; :func:`msn.data.loader.augment_on_device` runs it there (docs/method.md Sec. 1).

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
        [B, views, VIEW_DRAWS] (:func:`~msn.data.view_params.view_uniforms`; views 0 and 1 the target
        and anchor)."""
        draws = uniforms[..., PHOTOMETRIC_COLUMNS]
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