"""Decoding one image file into uint8 RGB, with the header bounds checked first (docs/security.md).

:func:`decode_rgb` refuses, from the header alone, an image of more than
:data:`MAX_IMAGE_PIXELS` pixels or a longer side over :data:`MAX_ASPECT_RATIO` times the
shorter (a small file must not cost gigabytes to decode or to resize), and reads every PIL
mode as 8-bit RGB (:func:`to_rgb8`).
"""

from __future__ import annotations

import logging

import math

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2 import functional as TF

from msn.files import open_regular


class BadImageError(RuntimeError):
    """An image file could not be decoded, or is refused (:func:`check_image_size`)."""


#: The most pixels an image may have (8192 x 8192; decoded to RGB, 192 MiB). ImageNet's images
#: (mostly under a megapixel) and camera photos (12-50 M) fit; PIL's own limits (89.5 M pixels
#: warned, 178.9 M refused) let a 100 KB file cost gigabytes.
MAX_IMAGE_PIXELS = 64 * 2**20
#: The most the longer side may exceed the shorter by: a 10,000,000 x 1 PNG (10 KB) decodes
#: to 30 MB, but resizing its short side to 256 px (the evaluation transform) would ask for
#: 30 GB. Panoramas stay well under 32 : 1.
MAX_ASPECT_RATIO = 32


#: The EXIF tag of the orientation a camera stored the picture in (1: upright).
EXIF_ORIENTATION = 0x0112

#: Matte under transparent pixels (``LA``, ``RGBA``, ``PA``, palettes with transparency).
ALPHA_BACKGROUND = (255, 255, 255)

_FLOAT_CHUNK = 2**20  # pixels of a 16-bit or float image scaled at once (8 MB of float64)


def skip_or_raise(error: BadImageError, on_bad_image: str, warned: set, key) -> None:
    """``data.on_bad_image`` applied to one unreadable image: ``error`` raises it again, ``skip``
    logs it once per image (``key``; ``warned`` holds the keys already logged) and returns."""
    if on_bad_image == "error":
        raise error
    if key not in warned:
        warned.add(key)
        logging.getLogger(__name__).warning("skipping unreadable image %s", error)


def check_image_size(image: Image.Image, name) -> None:
    """Refuse (:class:`BadImageError`) an opened, not yet decoded image whose header gives no
    pixels, more than :data:`MAX_IMAGE_PIXELS`, or sides further apart than
    :data:`MAX_ASPECT_RATIO`; ``name`` is what the message calls it."""
    width, height = image.size
    if width < 1 or height < 1:
        raise BadImageError(f"{name}: refused: the image is empty ({width}x{height} pixels)")
    if width * height > MAX_IMAGE_PIXELS:
        raise BadImageError(f"{name}: refused: {width}x{height} is {width * height} pixels, more than "
                            f"MAX_IMAGE_PIXELS={MAX_IMAGE_PIXELS}")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise BadImageError(f"{name}: refused: {width}x{height} has sides more than "
                            f"MAX_ASPECT_RATIO={MAX_ASPECT_RATIO} times apart")


def to_rgb8(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB, with its values scaled rather than clipped.

    * EXIF orientation is applied (photos from phones are stored sideways).
    * 16- and 32-bit integer greys (``I;16*``, ``I``: 16-bit PNGs) are scaled by 255/65535,
      or by their maximum when it exceeds 16 bits; float greys (``F``) are taken as [0, 1]
      when their maximum is at most 1, else as [0, 255], and clipped.
    * Transparency is composited over :data:`ALPHA_BACKGROUND` (dropping the alpha channel
      would show whatever colour the transparent pixels happen to hold).
    * CMYK, YCbCr, palettes and the rest go through PIL's own conversion.
    """
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:  # (exif_transpose copies even an upright image)
        image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image)  # uint16, int32 or float32
        peak = float(values.max()) if values.size else 0.0
        if image.mode == "F":
            scale = 255.0 if values.size and peak <= 1.0 else 1.0
        else:
            scale = 255.0 / max(65535.0, peak)
        grey = np.empty(values.shape, dtype=np.uint8)
        rows = max(1, _FLOAT_CHUNK // max(1, values.shape[1]))  # float64 a few MB at a time
        for top in range(0, values.shape[0], rows):
            part = values[top: top + rows].astype(np.float64)
            grey[top: top + rows] = np.clip(np.rint(part * scale), 0, 255)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("LA", "RGBA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        matte = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(matte, rgba).convert("RGB")
    return image.convert("RGB")


def decode_rgb(path, min_pixels: int | None = None, name: str | None = None) -> torch.Tensor:
    """Decode an image file with PIL into a uint8 RGB tensor [3, H, W] (:func:`to_rgb8`).

    Args:
        path: the file's path, or a binary file object (a sample read from a shard).
        min_pixels: when given, a JPEG is decoded at a reduced size (:func:`reduce_on_decode`)
            that keeps at least this many pixels.
        name: what an error message calls the image (default: ``path``).

    Raises:
        BadImageError: an unreadable file, or one :func:`check_image_size` refuses from its
            header, before any pixel is decoded.
    """
    try:
        stream = path if hasattr(path, "read") else open_regular(path)  # a FIFO would block the read
        with stream, Image.open(stream) as image:  # reads the header only
            check_image_size(image, name or path)
            if min_pixels:
                reduce_on_decode(image, min_pixels)
            return TF.pil_to_tensor(to_rgb8(image))
    except BadImageError:
        raise
    except Exception as error:  # noqa: BLE001 - any decoder failure means an unreadable file
        reason = " ".join(str(error).split())  # one line
        raise BadImageError(f"{name or path}: cannot decode image ({type(error).__name__}: {reason})") from None


def reduce_on_decode(image: Image.Image, min_pixels: int) -> int:
    """Ask the JPEG decoder for the image scaled by 1/2, 1/4 or 1/8 in the DCT domain (PIL's
    ``draft``: several times faster than a full decode) -- the largest factor that still
    leaves ``min_pixels`` pixels; other formats are decoded in full. Returns the factor."""
    if image.format != "JPEG":
        return 1
    width, height = image.size
    factor = 1
    while factor < 8 and math.ceil(width / (2 * factor)) * math.ceil(height / (2 * factor)) >= min_pixels:
        factor *= 2
    if factor > 1:
        image.draft(image.mode, (math.ceil(width / factor), math.ceil(height / factor)))
    return factor
