"""The shard reader (``data=shards``; docs/formats.md Sec. 9): :class:`ShardedImages`.

It yields the same ``(uint8 [3, H, W] or None, label)`` items as
:class:`~msn.data.datasets.ImageFolderDataset` over the source folder, decoded by the same
function (:func:`~msn.data.decode.decode_rgb`), with the same bad-image handling; the index
is checked whole when the data set opens (:func:`~msn.data.shard_index.read_index`).
"""

from __future__ import annotations

import io
import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from msn.data.decode import BadImageError, decode_rgb, skip_or_raise
from msn.data.shard_index import INDEX_FILE, ShardError, read_index

log = logging.getLogger(__name__)


class _Sources(Sequence):
    """``samples``-like view: item ``i`` is ``("<shard path>:<key>", label)``, made on demand."""

    def __init__(self, dataset: ShardedImages):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[str, int]:
        dataset = self.dataset
        shard = dataset.shard_of(index)
        return f"{dataset.shard_paths[shard]}:{dataset.keys[index].decode()}", int(dataset.labels[index])


class ShardedImages(Dataset):
    """A shard folder written by :func:`~msn.data.shard_writer.write_shards`, item ``i`` = image ``i`` of the source
    ImageFolder: ``(uint8 tensor [3, H, W], label)``, or ``(None, label)`` for an unreadable
    image with ``on_bad_image=skip`` (warned once per image and process).

    Images are read by ``os.pread`` at the offsets of ``index.json`` (no tar parsing; at most
    :attr:`max_open` shard files open per process) and decoded by
    :func:`~msn.data.decode.decode_rgb`.

    Args:
        root: folder holding ``index.json`` and the shards.
        on_bad_image: ``skip`` or ``error`` (:class:`~msn.data.datasets.ImageFolderDataset`).
        min_pixels: reduced JPEG decoding, as for the folder.
    """

    max_open = 64

    def __init__(self, root, on_bad_image: str = "skip", min_pixels: int | None = None):
        self.root = Path(root)
        index = read_index(self.root)
        self.classes = list(index["classes"])
        self.class_to_idx = {name: number for number, name in enumerate(self.classes)}
        shards = index["shards"]
        self.shard_paths = [str(self.root / entry["file"]) for entry in shards]
        self.shard_sizes = [entry["num_samples"] for entry in shards]
        self.shard_starts = np.concatenate([[0], np.cumsum(self.shard_sizes, dtype=np.int64)])
        self.offsets = np.array([offset for entry in shards for offset in entry["offsets"]], dtype=np.int64)
        self.sizes = np.array([size for entry in shards for size in entry["sizes"]], dtype=np.int64)
        self.labels = np.array([label for entry in shards for label in entry["labels"]], dtype=np.int64)
        self.keys = np.array([key.encode() for entry in shards for key in entry["keys"]], dtype=bytes)
        self.targets = self.labels.tolist()
        self.samples = _Sources(self)
        self.on_bad_image, self.min_pixels = on_bad_image, min_pixels
        self._warned: set[str] = set()
        self._files: OrderedDict[int, int] = OrderedDict()  # shard -> descriptor, least recently used first

    def __len__(self) -> int:
        return len(self.labels)

    def shard_of(self, index: int) -> int:
        """The shard holding sample ``index``."""
        return int(np.searchsorted(self.shard_starts, index, side="right")) - 1

    def __getstate__(self):  # descriptors stay in their process
        state = self.__dict__.copy()
        state["_files"] = OrderedDict()
        return state

    def __del__(self):
        self.close()

    def close(self) -> None:
        """Close the open shard files."""
        files = getattr(self, "_files", {})
        while files:
            os.close(files.popitem()[1])

    def _descriptor(self, shard: int) -> int:
        descriptor = self._files.pop(shard, None)
        if descriptor is None:
            if len(self._files) >= self.max_open:
                os.close(self._files.popitem(last=False)[1])
            descriptor = os.open(self.shard_paths[shard], os.O_RDONLY)
        self._files[shard] = descriptor
        return descriptor

    def read_bytes(self, index: int) -> bytes:
        """The image file of sample ``index``, as stored (empty: the writer skipped its file)."""
        size, offset = int(self.sizes[index]), int(self.offsets[index])
        if size == 0:
            return b""
        data = os.pread(self._descriptor(self.shard_of(index)), size, offset)
        if len(data) != size:
            raise OSError(f"short read: {len(data)} of {size} bytes at offset {offset}")
        return data

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int]:
        if index < 0:
            index += len(self)
        source, label = self.samples[index]
        try:
            try:
                data = self.read_bytes(index)
            except OSError as error:
                raise BadImageError(f"{source}: cannot read ({error})") from None
            if not data:
                raise BadImageError(f"{source}: empty sample (msn-shards write did not copy its file: a link out "
                                    "of the source folder, not an image, or too large)")
            return decode_rgb(io.BytesIO(data), self.min_pixels, name=source), label
        except BadImageError as error:
            skip_or_raise(error, self.on_bad_image, self._warned, source)
            return None, label

    def image_names(self) -> list[str]:
        """The source files' names (no folder), in data set order, as the folder's."""
        index = read_index(self.root)
        names = [os.path.basename(path) for entry in index["shards"] for path in entry["paths"]]
        if len(names) != len(self):
            raise ShardError(f"{self.root / INDEX_FILE}: changed since it was opened ({len(names)} samples, "
                             f"not {len(self)})")
        return names
