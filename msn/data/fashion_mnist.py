"""Fashion-MNIST (docs/formats.md): the idx files found, checked, cached or downloaded, and read.

Every file is checked before it is used (magic number, dimensions, exact size, labels in
0-9); downloads are md5-checked before they are decompressed (docs/security.md).
"""

from __future__ import annotations

import gzip
import io
import logging
import math
import os
import struct
from pathlib import Path

import torch
from torchvision.datasets import FashionMNIST
from torchvision.datasets.mnist import read_image_file, read_label_file

from msn.dataset_roots import FASHION_MNIST_ROOT
from msn.files import write_bytes

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
        self.targets = [int(label) for label in read_label_file(str(raw / f"{prefix}-labels-idx1-ubyte"))]
        self.train = train

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].unsqueeze(0).expand(3, -1, -1).contiguous(), self.targets[index]

    def image_names(self) -> list[str]:
        """Reference-format names ``<class>_<split><index>`` (class before the underscore)."""
        split = "train" if self.train else "test"
        return [f"{label}_{split}{index:05d}" for index, label in enumerate(self.targets)]
