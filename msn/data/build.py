"""The data a run asks for in its config (``data.*``; README "Key settings", docs/formats.md):
the data set (:func:`build_dataset`), the pre-training sampler (:func:`build_sampler`) and the
multi-view data set and collate function (:func:`build_multiview_data`).

This is the top of :mod:`msn.data`: it imports the modules below it, none imports it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from msn.data.batch_augment import BatchMultiView, BatchPhotometric
from msn.data.datasets import ImageFolderDataset, LongTailSubset, SyntheticImages, fixed_image_size
from msn.data.fashion_mnist import FashionMNISTDataset
from msn.data.loader import MultiViewCollate, MultiViewDataset
from msn.data.samplers import ResumableSampler, ShardLocalSampler
from msn.data.shard_index import INDEX_FILE
from msn.data.shard_reader import ShardedImages
from msn.data.transforms import MultiViewTransform
from msn.data.view_params import min_decode_pixels


def build_dataset(data_cfg, train: bool = True) -> torch.utils.data.Dataset:
    """The data set named by ``data_cfg`` (:func:`_named_dataset`); with
    ``data_cfg.long_tail_ratio`` set, the training split becomes its long-tailed subset
    (:class:`~msn.data.datasets.LongTailSubset`, seed 0); the evaluation split stays whole."""
    dataset = _named_dataset(data_cfg, train)
    ratio = getattr(data_cfg, "long_tail_ratio", None)
    return LongTailSubset(dataset, ratio) if train and ratio is not None else dataset


def _decode_bound(data_cfg, train: bool) -> int | None:
    """The reduced-decode bound of a split (``data.reduced_decode``): pre-training only."""
    return min_decode_pixels(data_cfg.views) if train and data_cfg.reduced_decode else None


def _named_dataset(data_cfg, train: bool = True) -> torch.utils.data.Dataset:
    """The data set named by ``data_cfg.name`` (a :class:`msn.config.DataConfig`).

    ``imagenet`` reads ``<root>/train`` (or ``<root>/val`` when ``train`` is false);
    ``folder`` reads ``<root>`` itself (or ``<root>/train`` / ``<root>/val`` when present);
    ``shards`` likewise, for folders written by ``msn-shards`` (:mod:`msn.data.shard_writer`).
    """
    name = data_cfg.name
    split = "train" if train else "val"
    if name in ("imagenet", "folder"):
        root = Path(data_cfg.root)
        if name == "imagenet" or (root / split).is_dir():
            root = root / split
        if not root.is_dir():
            raise FileNotFoundError(f"data.root: image folder not found: {root}")
        return ImageFolderDataset(str(root), data_cfg.on_bad_image, _decode_bound(data_cfg, train))
    if name == "shards":
        root = Path(data_cfg.root)
        if (root / split / INDEX_FILE).is_file():
            root = root / split
        if not (root / INDEX_FILE).is_file():
            raise FileNotFoundError(f"data.root: no {INDEX_FILE} in {root} (write shards with "
                                    "`msn-shards write SRC DST`)")
        return ShardedImages(root, data_cfg.on_bad_image, _decode_bound(data_cfg, train))
    if name == "fashion_mnist":
        return FashionMNISTDataset(data_cfg.root, train=train)
    if name == "synthetic":
        size = data_cfg.synthetic_size if train else max(data_cfg.synthetic_size // 4, data_cfg.synthetic_classes)
        return SyntheticImages(size, data_cfg.synthetic_classes, data_cfg.synthetic_image_size, seed=0 if train else 1)
    raise ValueError(f"data.name: unknown data set {name!r}")


def _shard_sizes(dataset) -> list[int]:
    """Samples per shard of a :class:`~msn.data.shard_reader.ShardedImages`, or of a leading
    ``Subset`` of one (``data.subset``: the first N images)."""
    limit = None
    if isinstance(dataset, torch.utils.data.Subset):
        indices = dataset.indices
        if not (isinstance(indices, range) and indices.start == 0 and indices.step == 1):
            raise ValueError("data.shard_order=local: a subset must be the data set's first images")
        dataset, limit = dataset.dataset, len(indices)
    sizes = getattr(dataset, "shard_sizes", None)
    if sizes is None:
        raise ValueError(f"data.shard_order=local needs data=shards, not {type(dataset).__name__}")
    if limit is not None:
        starts = np.concatenate([[0], np.cumsum(sizes)])
        sizes = [int(min(size, max(0, limit - start))) for size, start in zip(sizes, starts)]
    return list(sizes)


def build_sampler(dataset, data_cfg, global_batch: int, seed: int, rank: int = 0, world_size: int = 1):
    """The pre-training sampler of ``data_cfg.shard_order``: ``global`` (default) the
    :class:`~msn.data.samplers.ResumableSampler` over every image, ``local`` a
    :class:`~msn.data.samplers.ShardLocalSampler` over the shards of a ``data=shards`` data set."""
    if getattr(data_cfg, "shard_order", "global") == "local":
        return ShardLocalSampler(_shard_sizes(dataset), global_batch, seed, rank, world_size)
    return ResumableSampler(len(dataset), global_batch, seed, rank, world_size)


def build_multiview_data(dataset: Dataset, data_cfg, seed: int) -> tuple[MultiViewDataset, MultiViewCollate]:
    """The pre-training data set wrapper and collate function for ``data_cfg.augment``
    (docs/method.md Sec. 1).

    * ``per_sample``: every view image by image with torchvision v2's functionals
      (:class:`~msn.data.transforms.MultiViewTransform`).
    * ``batched`` on a data set of fixed image size: every view of the batch made at once
      (:class:`~msn.data.batch_augment.BatchMultiView`).
    * ``batched`` otherwise: uint8 crops image by image, photometric ops per batch.
    * ``device``: as ``batched``, the same parameters drawn in the loader, but the batched
      work (photometric ops; for fixed-size data the crops too) runs on the training device
      (:func:`~msn.data.loader.augment_on_device`).
    """
    views, defer = data_cfg.views, data_cfg.augment == "device"
    if data_cfg.augment == "per_sample":
        transform, collate = MultiViewTransform(views, photometric=True), MultiViewCollate(seed=seed)
    elif fixed_image_size(dataset) is not None:
        transform, collate = None, MultiViewCollate(seed=seed, batch_views=BatchMultiView(views), defer=defer)
    else:
        photometric = (BatchPhotometric(views, views.rand_size), BatchPhotometric(views, views.focal_size))
        transform = MultiViewTransform(views, photometric=False)
        collate = MultiViewCollate(photometric, seed, defer=defer)
    return MultiViewDataset(dataset, transform, seed), collate
