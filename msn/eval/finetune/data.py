"""The fine-tuning recipe's options and its data: a class-balanced labelled subset of the
Fashion-MNIST training images and the first test images (docs/finetune.md)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from msn.data import FashionMNISTDataset

NUM_CLASSES = 10


@dataclass
class Options:
    """Fine-tuning recipe (the CLI flags of the same names).

    Attributes:
        steps: optimiser steps.
        batch_size: labelled images per step (capped at the subset size).
        lr: peak AdamW learning rate (of the top layer when ``layer_decay < 1``).
        weight_decay: AdamW weight decay on weight matrices (biases, norms, CLS and position
            embeddings excluded).
        warmup_fraction: fraction of ``steps`` of linear warm-up from 0, then cosine to 0.
        layer_decay: layer-wise LR decay: block ``i`` of ``depth`` gets ``lr * decay**(depth + 1 - i)``
            (embeddings: layer 0, final norm + classifier: ``depth + 1``); 1.0 turns it off.
        hflip: probability of a horizontal flip of each training image (the only augmentation).
        seed: seeds the classifier head, the batch order and the flips.
        loss_window: steps averaged for the first/last-window loss of the report.
        batch_eval: images per forward pass when scoring.
    """

    steps: int = 300
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1
    layer_decay: float = 0.75
    hflip: float = 0.5
    seed: int = 0
    loss_window: int = 20
    batch_eval: int = 256


@dataclass
class Split:
    """Raw images (uint8 ``[N, 3, H, W]``) and labels of one split."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: list[int] = field(default_factory=list)

    def pil(self) -> list:
        """The images as RGB PIL images (what both libraries' preprocessing expects)."""
        from torchvision.transforms.functional import to_pil_image

        return [to_pil_image(image) for image in self.images]


def balanced_subset(labels: Sequence[int], total: int, seed: int) -> list[int]:
    """``total`` indices, as even over the classes as possible (the first ``total % C`` classes
    get one more), each class's images drawn at random with ``seed``."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if total < len(classes):
        raise ValueError(f"--labelled: at least one image per class ({len(classes)}), got {total}")
    rng = np.random.default_rng(seed)
    chosen = []
    for rank, cls in enumerate(classes):
        count = total // len(classes) + (1 if rank < total % len(classes) else 0)
        members = np.flatnonzero(labels == cls)
        chosen.extend(int(i) for i in rng.permutation(members)[:count])
    return sorted(chosen)


def fashion_mnist(labelled: int, test_limit: int | None, seed: int, root: str | None = None) -> tuple[Split, Split]:
    """A balanced labelled training subset and the first ``test_limit`` test images."""
    train, test = FashionMNISTDataset(root, train=True), FashionMNISTDataset(root, train=False)
    picked = balanced_subset(train.targets, labelled, seed)
    count = len(test) if test_limit is None else min(int(test_limit), len(test))

    def take(dataset, indices):
        images = dataset.images[indices].unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
        labels = torch.tensor([dataset.targets[i] for i in indices])
        return Split(images, labels, list(indices))

    return take(train, picked), take(test, list(range(count)))
