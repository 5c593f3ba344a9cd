"""Image data sets that yield ``(uint8 tensor [3, H, W] or None, label)`` (docs/formats.md).

* :class:`ImageFolderDataset`: any torchvision ImageFolder tree (ImageNet's ``train/`` or a
  user folder), listed into a compact index, decoded by :func:`msn.data.decode.decode_rgb`; unreadable files are skipped
  with one warning per file (``on_bad_image: skip``).
* :class:`SyntheticImages`: deterministic class-structured random images for tests.
* :class:`LongTailSubset` and :func:`training_subset`: the subsets ``data.long_tail_ratio``
  and ``data.subset`` keep.

Fashion-MNIST is in :mod:`msn.data.fashion_mnist`, the tar shards in
:mod:`msn.data.shard_reader`. Data sets whose images all have one size expose
``image_size = (H, W)`` (:func:`fixed_image_size`); the batched augmentation then crops whole
batches at once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
import torch
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension

from msn.data.decode import BadImageError, decode_rgb, skip_or_raise

log = logging.getLogger(__name__)


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


def _scan(directory: str, class_to_idx: dict[str, int], extensions: tuple[str, ...]
          ) -> tuple[bytes, np.ndarray, np.ndarray]:
    """torchvision's listing (sorted classes, then the sorted walk of each class folder, links
    to folders followed, files kept by their extension, none opened), except that each real
    folder is walked once: a link back up the tree (``a/x -> .``) would make the walk endless.

    Returns the compact index: the paths relative to ``directory`` (file-system encoded, one
    after the other), their int64 ``offsets`` (``n + 1``) and the labels (int16 up to 32,767
    classes). No Python object per image outlives one class folder.

    Raises:
        FileNotFoundError: a class folder has no file with one of ``extensions``.
    """
    prefix = len(os.path.join(directory, ""))
    chunks, lengths, labels, empty = [], [], [], []
    label_type = np.int16 if len(class_to_idx) <= np.iinfo(np.int16).max else np.int32
    for name in sorted(class_to_idx):
        walked = _walk_each_folder_once(os.path.join(directory, name))
        kept = [os.fsencode(os.path.join(root, file)[prefix:])
                for root, _, files in sorted(walked) for file in sorted(files)
                if has_file_allowed_extension(file, extensions)]
        if not kept:
            empty.append(name)
        chunks.append(b"".join(kept))
        lengths.append(np.fromiter(map(len, kept), np.int64, len(kept)))
        labels.append(np.full(len(kept), class_to_idx[name], label_type))
    if empty:
        raise FileNotFoundError(f"Found no valid file for the classes {', '.join(empty)}. "
                                f"Supported extensions are: {', '.join(extensions)}")
    offsets = np.zeros(sum(map(len, lengths)) + 1, np.int64)
    np.cumsum(np.concatenate(lengths), out=offsets[1:])
    return b"".join(chunks), offsets, np.concatenate(labels)


class _Samples(Sequence):
    """torchvision's ``samples``, made on demand: item ``i`` is ``(path, label)`` of image ``i``
    of an :class:`ImageFolderDataset` (no per-image list is kept)."""

    def __init__(self, dataset: ImageFolderDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.dataset.path(index), int(self.dataset.labels[index])

    def __eq__(self, other) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(mine == theirs for mine, theirs in zip(self, other))

    __hash__ = None


class ImageFolderDataset(torch.utils.data.Dataset):
    """A torchvision ``ImageFolder`` tree (same classes, same images, same order) returning uint8
    tensors, robust to unreadable files, indexed compactly (docs/results/imagenet_rehearsal.md).

    The index holds, per image, its path relative to ``root`` (bytes in one buffer), an int64
    offset and a small-int label: the listing of ImageNet's 1.28 million images costs tens of
    bytes each, and forked loader workers do not copy it page by page as they would a list of
    Python objects. ``labels`` (numpy, also ``targets``), ``path(i)``, ``image_names()`` and the
    on-demand ``samples`` view read it.

    Args:
        root: folder with one sub-folder per class.
        on_bad_image: ``skip`` returns ``None`` for an unreadable file (warned once per file
            and process; the pre-training loader replaces it by another image and counts it) or ``error`` raises.
        min_pixels: decode JPEGs at a reduced size keeping at least this many pixels
            (:func:`~msn.data.decode.reduce_on_decode`; pre-training passes
            :func:`msn.data.view_params.min_decode_pixels`), or in full when ``None``.
    """

    extensions = IMG_EXTENSIONS

    def __init__(self, root: str, on_bad_image: str = "skip", min_pixels: int | None = None):
        self.root = os.path.expanduser(root) if isinstance(root, str) else root
        try:  # torchvision's messages name the class, not the folder
            self.classes, self.class_to_idx = find_classes(self.root)
            self._paths, self._offsets, self.labels = _scan(self.root, self.class_to_idx, self.extensions)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"data.root={root}: {str(error).splitlines()[0]}") from None
        self._prefix = os.path.join(self.root, "")
        self.targets = self.labels
        self.samples = _Samples(self)
        self.on_bad_image, self.min_pixels = on_bad_image, min_pixels
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root!r}: {len(self)} images, {len(self.classes)} classes)"

    def path(self, index: int) -> str:
        """The file of image ``index`` (``root`` joined with its relative path)."""
        count = len(self.labels)
        if not -count <= index < count:
            raise IndexError(f"image {index} of a data set of {count}")
        index = int(index) % count
        start, stop = self._offsets[index : index + 2].tolist()
        return self._prefix + os.fsdecode(self._paths[start:stop])

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int]:
        path, label = self.path(index), int(self.labels[index])
        try:
            return decode_rgb(path, self.min_pixels), label
        except BadImageError as error:
            skip_or_raise(error, self.on_bad_image, self._warned, path)
            return None, label

    def image_names(self) -> list[str]:
        """File names (no folder), e.g. ``n01440764_10026.JPEG``, in dataset order."""
        paths, bounds = self._paths, self._offsets.tolist()
        return [os.path.basename(os.fsdecode(paths[start:stop])) for start, stop in zip(bounds, bounds[1:])]


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
        self.targets = [index % num_classes for index in range(size)]
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
    labels = torch.as_tensor([int(label) for label in labels])
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
        labels = [int(label) for label in dataset.targets]
        super().__init__(dataset, long_tail_indices(labels, ratio, seed))
        self.targets = [labels[index] for index in self.indices]
        self.classes = getattr(dataset, "classes", None)
        self.ratio = ratio

    def image_names(self) -> list[str]:
        names = self.dataset.image_names()
        return [names[index] for index in self.indices]


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



def fixed_image_size(dataset) -> tuple[int, int] | None:
    """``(H, W)`` when every image of ``dataset`` (or of the data set a Subset wraps) has that size."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return getattr(dataset, "image_size", None)
