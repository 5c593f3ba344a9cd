"""Data sets, multi-view augmentation and the resumable pre-training loader."""

from msn.data.datasets import (
    FashionMNISTDataset,
    ImageFolderDataset,
    SyntheticImages,
    build_dataset,
    fixed_image_size,
    prepare_fashion_mnist,
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
    "view_transform",
]
