"""Data sets, multi-view augmentation and the resumable pre-training loader."""

from msn.data.datasets import (
    FashionMNISTDataset,
    ImageFolderDataset,
    SyntheticImages,
    build_dataset,
    fixed_image_size,
    prepare_fashion_mnist,
    training_subset,
)
from msn.data.batch_augment import BatchMultiView, BatchPhotometric
from msn.data.loader import (
    MultiViewBatch,
    MultiViewCollate,
    MultiViewDataset,
    ResumableSampler,
    build_multiview_data,
    build_train_loader,
    collate_views,
    start_epoch,
)
from msn.data.transforms import MultiViewTransform, eval_transform, geometric_transform, view_transform

__all__ = [
    "BatchMultiView",
    "BatchPhotometric",
    "MultiViewCollate",
    "FashionMNISTDataset",
    "ImageFolderDataset",
    "MultiViewBatch",
    "MultiViewDataset",
    "MultiViewTransform",
    "ResumableSampler",
    "SyntheticImages",
    "build_dataset",
    "build_multiview_data",
    "build_train_loader",
    "collate_views",
    "eval_transform",
    "fixed_image_size",
    "prepare_fashion_mnist",
    "geometric_transform",
    "start_epoch",
    "training_subset",
    "view_transform",
    "ShardLocalSampler",
    "ShardedImages",
    "build_sampler",
    "write_shards",
]

_SHARD_NAMES = ("ShardLocalSampler", "ShardedImages", "build_sampler", "write_shards")


def __getattr__(name: str):
    """``msn.data.shards`` loads on first use, so that ``python -m msn.data.shards`` runs it
    once, as ``__main__``."""
    if name in _SHARD_NAMES:
        import importlib

        return getattr(importlib.import_module("msn.data.shards"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
