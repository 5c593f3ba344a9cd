"""Per-image transforms (docs/method.md Sec. 1): MSN's views image by image with torchvision
v2's functionals, and the evaluation transform.

:class:`MultiViewTransform` turns a uint8 image into 1 target + 1 anchor view at
``rand_size`` (random-resized crop of scale 0.3-1) and ``num_focal`` focal views at
``focal_size`` (scale 0.05-0.3), each with horizontal flip, colour jitter, grayscale and
Gaussian blur, then normalisation: the reference's operations, on tensors. Every random
choice is taken from the image's uniforms (:mod:`msn.data.view_params`), the very draws the
batched modes use.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from msn.data.view_params import PhotometricParams, blur_kernel_size, group_params

#: The functionals of ``ColorJitter``'s four operations, in the order of
#: :attr:`~msn.data.view_params.PhotometricParams.factors`.
JITTER_FUNCTIONALS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


class MultiViewTransform:
    """uint8 image and its uniforms -> ``[target, anchor, focal_1, ..., focal_V]`` views.

    Target and anchor share a distribution but are independent draws; each focal view is an
    independent small crop of the image (not of the anchor). Each view is cropped
    (``TF.resized_crop``, antialiased, the box of
    :func:`~msn.data.view_params.crop_boxes`) and flipped; with ``photometric`` its colour
    jitter operations run in their drawn order, then grayscale, blur, and normalisation, as
    torchvision's ``ColorJitter``/``RandomGrayscale``/``GaussianBlur`` would with the same
    parameters.

    Args:
        views_cfg: a :class:`msn.config.ViewsConfig`.
        photometric: apply colour jitter, grayscale, blur and normalisation here, image by
            image (float32 views); ``False`` returns uint8 crops for batched photometric
            augmentation (:class:`msn.data.batch_augment.BatchPhotometric`) from the same
            uniforms.
    """

    def __init__(self, views_cfg, photometric: bool = True):
        self.views_cfg, self.photometric = views_cfg, photometric
        self.num_views = 2 + views_cfg.num_focal
        self.groups = ((slice(0, 2), views_cfg.rand_size, views_cfg.rand_scale),
                       (slice(2, self.num_views), views_cfg.focal_size, views_cfg.focal_scale))

    def __call__(self, image: torch.Tensor, uniforms: torch.Tensor) -> list[torch.Tensor]:
        """The views of ``image`` (uint8 [3, H, W]) from its uniforms [num_views, VIEW_DRAWS]
        (:func:`~msn.data.view_params.view_uniforms`)."""
        height, width = image.shape[-2:]
        views = []
        for rows, size, scale in self.groups:
            draws = uniforms[rows]
            if not len(draws):
                continue
            boxes, flips, params = group_params(draws, height, width, scale, self.views_cfg)
            for view, (left, top, right, bottom) in enumerate(boxes.tolist()):
                crop = TF.resized_crop(image, int(top), int(left), int(bottom - top), int(right - left), [size, size],
                                       antialias=True)
                if flips[view]:
                    crop = TF.horizontal_flip(crop)
                views.append(self.colour(crop, params, view, size) if self.photometric else crop)
        return views

    def colour(self, crop: torch.Tensor, params: PhotometricParams, view: int, size: int) -> torch.Tensor:
        """Colour jitter, grayscale, blur (each where ``params`` drew it for ``view``) and
        normalisation of one uint8 crop of side ``size``; float32 out."""
        cfg = self.views_cfg
        if params.jitter[view] and cfg.color_jitter > 0:
            for operation in params.order[view].tolist():
                crop = JITTER_FUNCTIONALS[operation](crop, float(params.factors[view, operation]))
        if params.gray[view]:
            crop = TF.rgb_to_grayscale(crop, num_output_channels=3)
        if params.blur[view]:
            kernel, sigma = blur_kernel_size(cfg.blur_sigma[1], size), float(params.sigma[view])
            crop = TF.gaussian_blur(crop, [kernel, kernel], [sigma, sigma])
        return TF.normalize(TF.to_dtype(crop, torch.float32, scale=True), list(cfg.mean), list(cfg.std))


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
