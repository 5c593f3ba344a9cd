"""Data sets, multi-view augmentation and the resumable pre-training loader (docs/method.md Sec. 1,
docs/formats.md).

The modules, lowest first (none imports one above it): :mod:`~msn.data.seeds`,
:mod:`~msn.data.view_params` (every random draw of the views), :mod:`~msn.data.decode`;
:mod:`~msn.data.datasets`, :mod:`~msn.data.fashion_mnist`, :mod:`~msn.data.shard_index`;
:mod:`~msn.data.shard_reader`, :mod:`~msn.data.shard_writer`, :mod:`~msn.data.samplers`,
:mod:`~msn.data.batch_augment`, :mod:`~msn.data.transforms`; :mod:`~msn.data.loader`;
:mod:`~msn.data.build` (what the config asks for) and :mod:`~msn.data.shards_cli` (the
``msn-shards`` command, not imported here).
"""

from msn.data.batch_augment import BatchMultiView, BatchPhotometric
from msn.data.build import build_dataset, build_multiview_data, build_sampler
from msn.data.datasets import ImageFolderDataset, SyntheticImages, fixed_image_size, training_subset
from msn.data.decode import BadImageError, decode_rgb
from msn.data.fashion_mnist import FashionMNISTDataset, prepare_fashion_mnist
from msn.data.loader import (
    MultiViewBatch,
    MultiViewCollate,
    MultiViewDataset,
    augment_on_device,
    build_train_loader,
    collate_views,
    start_epoch,
)
from msn.data.samplers import ResumableSampler, ShardLocalSampler
from msn.data.shard_index import ShardError, read_index
from msn.data.shard_reader import ShardedImages
from msn.data.shard_writer import write_shards
from msn.data.transforms import MultiViewTransform, eval_transform

__all__ = [
    "BadImageError",
    "BatchMultiView",
    "BatchPhotometric",
    "FashionMNISTDataset",
    "ImageFolderDataset",
    "MultiViewBatch",
    "MultiViewCollate",
    "MultiViewDataset",
    "MultiViewTransform",
    "ResumableSampler",
    "ShardError",
    "ShardLocalSampler",
    "ShardedImages",
    "SyntheticImages",
    "augment_on_device",
    "build_dataset",
    "build_multiview_data",
    "build_sampler",
    "build_train_loader",
    "collate_views",
    "decode_rgb",
    "eval_transform",
    "fixed_image_size",
    "prepare_fashion_mnist",
    "read_index",
    "start_epoch",
    "training_subset",
    "write_shards",
]
