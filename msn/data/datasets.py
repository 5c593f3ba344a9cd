"""Image data sets that yield ``(uint8 tensor [3, H, W] or None, label)``.

* ``ImageFolderDataset``: any torchvision ImageFolder tree (ImageNet's ``train/`` or a user
  folder); unreadable files are skipped with one warning per file (``on_bad_image: skip``).
  :func:`decode_rgb` refuses, from the header alone, an image of more than
  :data:`MAX_IMAGE_PIXELS` pixels or a longer side over :data:`MAX_ASPECT_RATIO` times the
  shorter (a small file must not cost gigabytes to decode or to resize).
* ``FashionMNISTDataset``: the idx files of Fashion-MNIST, checked (magic number, sizes,
  labels) and read by torchvision's reader.
* ``SyntheticImages``: deterministic class-structured random images for tests.

Data sets whose images all have one size expose ``image_size = (H, W)``; the batched
augmentation then crops whole batches at once.
"""

from __future__ import annotations

import gzip
import io
import math
import logging
import os
import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.datasets import FashionMNIST, ImageFolder
from torchvision.datasets.folder import has_file_allowed_extension
from torchvision.datasets.mnist import read_image_file, read_label_file
from torchvision.transforms.v2 import functional as TF

from msn.configs import FASHION_MNIST_ROOT
from msn.data.transforms import min_decode_pixels
from msn.files import open_regular, write_bytes

log = logging.getLogger(__name__)

FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


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


def _walk_each_folder_once(top: str) -> list[tuple[str, list[str], list[str]]]:
    """``os.walk(top, followlinks=True)``, but a folder already walked (by its device and inode:
    reached again through a link) is not entered again."""
    if not os.path.isdir(top):
        return []
    seen, walked = set(), []
    for root, folders, files in os.walk(top, followlinks=True):
        status = os.stat(root)
        if (status.st_dev, status.st_ino) in seen:
            folders[:] = []
            continue
        seen.add((status.st_dev, status.st_ino))
        folders.sort()  # the alias kept for a folder reached twice does not depend on listing order
        walked.append((root, folders, files))
    return walked


class ImageFolderDataset(ImageFolder):
    """torchvision ``ImageFolder`` returning uint8 tensors, robust to unreadable files.

    Args:
        root: folder with one sub-folder per class.
        on_bad_image: ``skip`` returns ``None`` for an unreadable file (warned once per file
            and process; the pre-training loader replaces it by another image and counts it) or ``error`` raises.
        min_pixels: decode JPEGs at a reduced size keeping at least this many pixels
            (:func:`reduce_on_decode`; pre-training passes
            :func:`msn.data.transforms.min_decode_pixels`), or in full when ``None``.
    """

    def __init__(self, root: str, on_bad_image: str = "skip", min_pixels: int | None = None):
        try:
            super().__init__(root, loader=decode_rgb)
        except FileNotFoundError as error:  # torchvision's message names the class, not the folder
            raise FileNotFoundError(f"data.root={root}: {str(error).splitlines()[0]}") from None
        self.on_bad_image, self.min_pixels = on_bad_image, min_pixels
        self._warned: set[str] = set()

    @staticmethod
    def make_dataset(directory, class_to_idx: dict[str, int], extensions=None, is_valid_file=None,
                     allow_empty: bool = False) -> list[tuple[str, int]]:
        """torchvision's listing (sorted classes, then the sorted walk of each class folder, links
        to folders followed), except that each real folder is walked once: a link back up the
        tree (``a/x -> .``) would make the walk endless."""
        if is_valid_file is None:
            def is_valid_file(name: str) -> bool:
                return has_file_allowed_extension(name, extensions)
        samples, found = [], set()
        for name in sorted(class_to_idx):
            walked = _walk_each_folder_once(os.path.join(directory, name))
            for root, _, files in sorted(walked):
                for file in sorted(files):
                    path = os.path.join(root, file)
                    if is_valid_file(path):
                        samples.append((path, class_to_idx[name]))
                        found.add(name)
        empty = sorted(set(class_to_idx) - found)
        if empty and not allow_empty:
            raise FileNotFoundError(f"Found no valid file for the classes {', '.join(empty)}. "
                                    f"Supported extensions are: {', '.join(extensions or ())}")
        return samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int]:
        path, label = self.samples[index]
        try:
            return decode_rgb(path, self.min_pixels), label
        except BadImageError as error:
            if self.on_bad_image == "error":
                raise
            if path not in self._warned:
                self._warned.add(path)
                log.warning("skipping unreadable image %s", error)
            return None, label

    def image_names(self) -> list[str]:
        """File names (no folder), e.g. ``n01440764_10026.JPEG``, in dataset order."""
        return [os.path.basename(path) for path, _ in self.samples]


def _cache_root() -> Path:
    return Path(os.environ.get("MSN_CACHE_DIR", Path.home() / ".cache" / "msn"))


def _idx_layout(name: str) -> tuple[int, tuple[int, ...]]:
    """The magic number and dimensions of Fashion-MNIST's idx file ``name``."""
    count = 60000 if name.startswith("train") else 10000
    return (2051, (count, 28, 28)) if "images" in name else (2049, (count,))


def _idx_problem(name: str, stream) -> str | None:
    """What is wrong with the open binary ``stream`` as Fashion-MNIST's idx file ``name``
    (magic number, dimensions, exact size, labels in 0-9), or ``None``."""
    magic, dims = _idx_layout(name)
    header_size, body_size = 4 * (1 + len(dims)), math.prod(dims)
    header = stream.read(header_size)
    if len(header) < header_size:
        return f"{len(header)} bytes, shorter than its header"
    found = struct.unpack(f">{1 + len(dims)}I", header)
    if found[0] != magic:
        return f"magic number {found[0]}, not {magic}"
    if found[1:] != dims:
        return f"dimensions {'x'.join(map(str, found[1:]))}, not {'x'.join(map(str, dims))}"
    if len(dims) == 1:
        body = stream.read(body_size + 1)
        size = header_size + len(body)
        if size == header_size + body_size and max(body) > 9:
            return f"label {max(body)} outside 0-9"
    else:
        size = stream.seek(0, os.SEEK_END)
    if size != header_size + body_size:
        return f"{size} bytes, not {header_size + body_size}"
    return None


#: The largest gzipped Fashion-MNIST file (the training images are 26.4 MB).
MAX_DOWNLOAD_BYTES = 64 * 2**20


def _cached_fashion_mnist(target: Path) -> bool:
    """Whether ``target`` (``.../FashionMNIST/raw``) holds the four idx files, each checked."""
    for name in FASHION_MNIST_FILES:
        if not (target / name).is_file():
            return False
        with open(target / name, "rb") as stream:
            if _idx_problem(name, stream) is not None:
                return False
    return True


def download_fashion_mnist(target: Path) -> None:
    """Fetch the four gzipped idx files from torchvision's mirrors (``FashionMNIST.mirrors``),
    check each against torchvision's md5 (``FashionMNIST.resources``) before decompressing it
    and its idx layout after, and write them into ``target``.

    Raises:
        FileNotFoundError: a file no mirror served intact (one line: the first reason).
    """
    import hashlib
    import urllib.request

    for packed_name, md5 in FashionMNIST.resources:
        name, failures = packed_name.removesuffix(".gz"), []
        for mirror in FashionMNIST.mirrors:
            url = mirror + packed_name
            try:
                with urllib.request.urlopen(url, timeout=60) as response:
                    packed = response.read(MAX_DOWNLOAD_BYTES + 1)
            except (OSError, ValueError) as error:
                failures.append(f"{url}: {' '.join(str(error).split())}")
                continue
            digest = hashlib.md5(packed, usedforsecurity=False).hexdigest()
            if len(packed) > MAX_DOWNLOAD_BYTES or digest != md5:
                failures.append(f"{url}: md5 {digest}, not {md5}")
                continue
            data = gzip.decompress(packed)  # the md5 matched: a known file, not a bomb
            problem = _idx_problem(name, io.BytesIO(data))
            if problem:
                failures.append(f"{url}: not Fashion-MNIST's {name} ({problem})")
                continue
            write_bytes(target / name, data, sync=True)
            break
        else:
            raise FileNotFoundError(failures[0] if failures else f"{packed_name}: no mirror")


def prepare_fashion_mnist(root: str | None = None) -> Path:
    """Return a folder laid out as torchvision expects (``FashionMNIST/raw/*-ubyte``).

    ``root`` may already be in that layout, or hold the four idx files, plain or gzipped
    (the Debian package ``dataset-fashion-mnist`` installs gzipped files in
    ``/usr/share/datasets/fashion-mnist``); gzipped files are decompressed once into
    ``$MSN_CACHE_DIR`` (default ``~/.cache/msn``). Where the default root (the Debian
    package's folder) is missing, the files come from that cache, else are downloaded into it
    (:func:`download_fashion_mnist`, md5-checked). Every file is checked first (magic number,
    dimensions, exact size, labels in 0-9): a bad cached file is rebuilt from ``root``, a bad
    file in ``root`` is refused (``ValueError``, one line naming it).
    """
    root_path = Path(root or FASHION_MNIST_ROOT)
    laid_out = root_path / "FashionMNIST" / "raw"
    if all((laid_out / name).is_file() for name in FASHION_MNIST_FILES):
        for name in FASHION_MNIST_FILES:
            with open(laid_out / name, "rb") as stream:
                problem = _idx_problem(name, stream)
            if problem:
                raise ValueError(f"{laid_out / name}: not Fashion-MNIST's {name} ({problem})")
        return root_path
    target = _cache_root() / "fashion-mnist" / "FashionMNIST" / "raw"
    if not root_path.is_dir() and str(root_path) == FASHION_MNIST_ROOT:  # the default: the cache, or download it
        if _cached_fashion_mnist(target):
            return target.parent.parent
        log.warning("Fashion-MNIST: %s is missing (Debian package dataset-fashion-mnist); downloading it into %s",
                    root_path, target)
        try:
            download_fashion_mnist(target)
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"data.root: Fashion-MNIST is not at {root_path} and the download failed ({error}); install the "
                "Debian package dataset-fashion-mnist, or run once with network access, or set data.root") from None
        return target.parent.parent
    if not root_path.is_dir():
        raise FileNotFoundError(
            f"data.root: Fashion-MNIST folder not found: {root_path} "
            "(install it with `apt-get install dataset-fashion-mnist` or set data.root)"
        )
    for name in FASHION_MNIST_FILES:
        out = target / name
        problem = "missing"
        if out.is_file():
            with open(out, "rb") as stream:
                problem = _idx_problem(name, stream)
            if problem is None:
                continue
        plain, packed = root_path / name, root_path / f"{name}.gz"
        if not plain.is_file() and not packed.is_file():
            if problem != "missing":
                raise FileNotFoundError(f"{out}: cached Fashion-MNIST file is bad ({problem}) and {root_path} has "
                                        f"neither {name} nor {name}.gz to rebuild it from")
            raise FileNotFoundError(f"data.root: {root_path} has neither {name} nor {name}.gz")
        if problem != "missing":
            log.warning("%s: rebuilding a bad cached Fashion-MNIST file (%s)", out, problem)
        source = packed if packed.is_file() else plain
        magic, dims = _idx_layout(name)
        with (gzip.open(source, "rb") if source == packed else open(source, "rb")) as stream:
            data = stream.read(4 * (1 + len(dims)) + math.prod(dims) + 1)  # at most one byte too many
        problem = _idx_problem(name, io.BytesIO(data))
        if problem:
            raise ValueError(f"{source}: not Fashion-MNIST's {name} ({problem})")
        write_bytes(out, data, sync=True)
    return target.parent.parent


class FashionMNISTDataset(torch.utils.data.Dataset):
    """Fashion-MNIST (60k train / 10k test, 28x28 grey) as 3-channel uint8 tensors.

    Args:
        root: see :func:`prepare_fashion_mnist`.
        train: training split (else the test split).
    """

    classes = FASHION_MNIST_CLASSES

    def __init__(self, root: str | None = None, train: bool = True):
        raw = prepare_fashion_mnist(root) / "FashionMNIST" / "raw"  # the checked idx files, never processed/*.pt
        prefix = "train" if train else "t10k"
        self.images = read_image_file(str(raw / f"{prefix}-images-idx3-ubyte"))  # uint8 [N, 28, 28]
        self.image_size = (self.images.shape[1], self.images.shape[2])
        self.targets = [int(t) for t in read_label_file(str(raw / f"{prefix}-labels-idx1-ubyte"))]
        self.train = train

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].unsqueeze(0).expand(3, -1, -1).contiguous(), self.targets[index]

    def image_names(self) -> list[str]:
        """Reference-format names ``<class>_<split><index>`` (class before the underscore)."""
        split = "train" if self.train else "test"
        return [f"{label}_{split}{index:05d}" for index, label in enumerate(self.targets)]


class SyntheticImages(torch.utils.data.Dataset):
    """Deterministic synthetic images: a class-specific colour gradient plus noise.

    Args:
        size: number of images.
        num_classes: number of classes (label = index % num_classes).
        image_size: side in pixels.
        seed: base seed; image ``i`` depends only on ``(seed, i)``.
    """

    def __init__(self, size: int = 256, num_classes: int = 10, image_size: int = 64, seed: int = 0):
        self.size, self.num_classes, self.side, self.seed = size, num_classes, image_size, seed
        self.targets = [i % num_classes for i in range(size)]
        self.image_size = (image_size, image_size)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label = self.targets[index]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        side = self.side
        ramp = torch.linspace(0, 1, side)
        angle = torch.tensor(2 * torch.pi * label / self.num_classes)
        field = torch.cos(angle) * ramp[None, :] + torch.sin(angle) * ramp[:, None]
        phase = torch.arange(3).view(3, 1, 1) * (1 + label) / self.num_classes
        image = 0.5 + 0.35 * torch.sin(2 * torch.pi * (field[None] * (1 + label % 3) + phase))
        image = image + 0.1 * torch.randn(3, side, side, generator=generator)
        return (image.clamp(0, 1) * 255).round().to(torch.uint8), label

    def image_names(self) -> list[str]:
        return [f"{label}_synthetic{index:05d}" for index, label in enumerate(self.targets)]


def long_tail_indices(labels, ratio: float, seed: int = 0) -> list[int]:
    """Indices (ascending) of a long-tailed subset of a data set with these ``labels``.

    The ``C`` distinct labels, sorted, are ranked ``c = 0..C-1``; class ``c`` keeps
    ``round(n_c * ratio ** (-c / (C - 1)))`` (at least one) of its ``n_c`` images, so on a
    balanced data set the largest class is ``ratio`` times the smallest and the counts fall
    geometrically in between (the CIFAR-10-LT rule). Which images a class keeps is a uniform
    draw without replacement from a generator seeded with ``seed``: the same subset on every
    run, whatever the training seed.
    """
    labels = torch.as_tensor([int(t) for t in labels])
    classes = torch.unique(labels).tolist()
    generator = torch.Generator().manual_seed(seed)
    kept = []
    for rank, label in enumerate(classes):
        members = torch.nonzero(labels == label).flatten()
        share = ratio ** (-rank / (len(classes) - 1)) if len(classes) > 1 else 1.0
        count = max(1, min(len(members), round(len(members) * share)))
        kept.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return sorted(torch.cat(kept).tolist())


class LongTailSubset(torch.utils.data.Subset):
    """The long-tailed subset (:func:`long_tail_indices`) of a labelled data set, keeping its
    ``targets``, ``classes`` and ``image_names()`` (``data.long_tail_ratio``)."""

    def __init__(self, dataset, ratio: float, seed: int = 0):
        labels = [int(t) for t in dataset.targets]
        super().__init__(dataset, long_tail_indices(labels, ratio, seed))
        self.targets = [labels[i] for i in self.indices]
        self.classes = getattr(dataset, "classes", None)
        self.ratio = ratio

    def image_names(self) -> list[str]:
        names = self.dataset.image_names()
        return [names[i] for i in self.indices]


def training_subset(dataset, count: int | None, seed: int, shard_local: bool = False) -> torch.utils.data.Dataset:
    """``data.subset``: ``count`` images drawn without replacement over the whole data set
    (every class, not the first folders) by a generator seeded with ``seed``, kept in
    ascending order; with ``data.shard_order=local`` the first ``count`` (the shard reader
    reads whole shards in order). ``None`` keeps the data set whole.

    Raises:
        ValueError: ``count`` exceeds the data set (one line naming the key).
    """
    if count is None:
        return dataset
    if count > len(dataset):
        raise ValueError(f"data.subset: {count} images asked for, the data set holds {len(dataset)}")
    if count == len(dataset):
        return dataset
    if shard_local:
        return torch.utils.data.Subset(dataset, range(count))
    drawn = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count]
    return torch.utils.data.Subset(dataset, drawn.sort().values.tolist())


def build_dataset(data_cfg, train: bool = True) -> torch.utils.data.Dataset:
    """The data set named by ``data_cfg`` (:func:`_named_dataset`); with
    ``data_cfg.long_tail_ratio`` set, the training split becomes its long-tailed subset
    (:class:`LongTailSubset`, seed 0); the evaluation split stays whole."""
    dataset = _named_dataset(data_cfg, train)
    ratio = getattr(data_cfg, "long_tail_ratio", None)
    return LongTailSubset(dataset, ratio) if train and ratio is not None else dataset


def _named_dataset(data_cfg, train: bool = True) -> torch.utils.data.Dataset:
    """The data set named by ``data_cfg.name`` (a :class:`msn.config.DataConfig`).

    ``imagenet`` reads ``<root>/train`` (or ``<root>/val`` when ``train`` is false);
    ``folder`` reads ``<root>`` itself (or ``<root>/train`` / ``<root>/val`` when present);
    ``shards`` likewise, for folders written by ``msn-shards`` (:mod:`msn.data.shards`).
    """
    name = data_cfg.name
    if name in ("imagenet", "folder"):
        root = Path(data_cfg.root)
        split = "train" if train else "val"
        if name == "imagenet" or (root / split).is_dir():
            root = root / split
        if not root.is_dir():
            raise FileNotFoundError(f"data.root: image folder not found: {root}")
        min_pixels = min_decode_pixels(data_cfg.views) if train and data_cfg.reduced_decode else None
        return ImageFolderDataset(str(root), data_cfg.on_bad_image, min_pixels)
    if name == "shards":
        from msn.data.shards import sharded_dataset

        return sharded_dataset(data_cfg, train)
    if name == "fashion_mnist":
        return FashionMNISTDataset(data_cfg.root, train=train)
    if name == "synthetic":
        size = data_cfg.synthetic_size if train else max(data_cfg.synthetic_size // 4, data_cfg.synthetic_classes)
        return SyntheticImages(size, data_cfg.synthetic_classes, data_cfg.synthetic_image_size, seed=0 if train else 1)
    raise ValueError(f"data.name: unknown data set {name!r}")


def fixed_image_size(dataset) -> tuple[int, int] | None:
    """``(H, W)`` when every image of ``dataset`` (or of the data set a Subset wraps) has that size."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return getattr(dataset, "image_size", None)
