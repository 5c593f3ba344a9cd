"""The supervised from-scratch baseline of the low-shot evaluation (``baseline=supervised``).

What a practitioner without pre-training would do with the same labelled images: a ViT of
the backbone's architecture, randomly initialised, plus a linear classifier on the CLS token
after the final LayerNorm, trained end to end with cross-entropy on the labelled subset only,
then scored on the test set by its own predictions. Same subsets, same test images as the
frozen-feature methods, so the rows of a report compare like with like.

The recipe is fixed (no validation set exists at 1 image per class): AdamW, linear warm-up
then cosine decay, label smoothing, RandomResizedCrop + horizontal flip applied per batch
(:func:`msn.data.batch_augment.sample_crop_boxes` / :func:`~msn.data.batch_augment.resized_crops`,
the same crops as MSN's views). Hyper-parameters are :class:`SupervisedOptions`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from msn.data.batch_augment import resized_crops
from msn.data.view_params import sample_crop_boxes
from msn.eval.config import EvalConfig  # the recipe defaults are the evaluator schema's (one home)
from msn.eval.features import random_like
from msn.models import MSNViT


@dataclass
class SupervisedOptions:
    """Training recipe of the supervised baseline.

    Attributes:
        steps: optimiser steps per labelled subset, at least.
        min_epochs: at least this many passes over the subset (raises ``steps`` for large
            subsets: 30 passes over 600 images are 563 steps of 32).
        batch_size: images per step (capped at the subset size).
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay (all weights, biases and norms excluded).
        warmup_fraction: fraction of ``steps`` of linear warm-up from 0.
        label_smoothing: cross-entropy label smoothing.
        crop_scale: RandomResizedCrop area range.
        hflip: horizontal flip probability.
    """

    steps: int = EvalConfig.supervised_steps
    min_epochs: float = EvalConfig.supervised_min_epochs
    batch_size: int = EvalConfig.supervised_batch_size
    lr: float = EvalConfig.supervised_lr
    weight_decay: float = EvalConfig.supervised_weight_decay
    warmup_fraction: float = 0.1
    label_smoothing: float = 0.1
    crop_scale: tuple[float, float] = (0.35, 1.0)
    hflip: float = 0.5


class SupervisedViT(nn.Module):
    """Backbone + linear classifier on the post-LayerNorm CLS token (``ViTMSNForImageClassification``'s layout)."""

    def __init__(self, backbone: MSNViT, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(backbone.embed_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        tokens, _ = self.backbone.forward_blocks(images)
        return tokens[:, 0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))


def total_steps(num_images: int, options: SupervisedOptions) -> int:
    """``max(steps, ceil(min_epochs * N / batch))`` with the batch capped at ``N``."""
    batch = min(options.batch_size, num_images)
    return max(options.steps, math.ceil(options.min_epochs * num_images / batch))


def _learning_rate(step: int, steps: int, options: SupervisedOptions) -> float:
    warmup = max(1, int(round(options.warmup_fraction * steps)))
    if step < warmup:
        return options.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return options.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def augment(images: torch.Tensor, options: SupervisedOptions, generator: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop (``crop_scale``) back to the input size + horizontal flip, per image."""
    n, _, height, width = images.shape
    boxes = sample_crop_boxes(n, height, width, options.crop_scale, generator)
    flip = torch.rand(n, generator=generator) < options.hflip
    return resized_crops(images, boxes, torch.arange(n), height, flip)


def train_supervised(
    backbone: MSNViT,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    options: SupervisedOptions,
    seed: int,
    device: torch.device | str = "cpu",
) -> SupervisedViT:
    """Train a freshly initialised copy of ``backbone``'s architecture on ``(images, labels)``.

    Args:
        backbone: gives the architecture only (its weights are re-initialised with ``seed``).
        images: normalised ``[N, 3, S, S]`` float images (the evaluation transform's output).
        labels: ``[N]`` int64 class indices.
        num_classes: classifier width.
        options: the recipe.
        seed: seeds the initialisation, the batch order and the augmentation.
        device: where to train.

    Returns:
        the trained network, in eval mode.
    """
    device = torch.device(device)
    if len(images) == 0:
        raise ValueError("train_supervised: no labelled images")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SupervisedViT(random_like(backbone, seed).train(), num_classes)
    model.to(device).train()
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        (no_decay if parameter.ndim <= 1 or name.endswith(("pos_embed", "cls_token")) else decay).append(parameter)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": options.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=options.lr)
    generator = torch.Generator().manual_seed(seed)
    batch = min(options.batch_size, len(images))
    order = torch.randperm(len(images), generator=generator)
    cursor = 0
    steps = total_steps(len(images), options)
    for step in range(steps):
        if cursor + batch > len(order):
            order, cursor = torch.randperm(len(images), generator=generator), 0
        rows = order[cursor:cursor + batch]
        cursor += batch
        inputs = augment(images[rows], options, generator).to(device)
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, steps, options)
        loss = F.cross_entropy(model(inputs), labels[rows].to(device), label_smoothing=options.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.inference_mode()
def predict(model: SupervisedViT, images: torch.Tensor, batch_size: int = 256,
            device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted classes ``[N]`` and CLS features ``[N, D]`` of normalised images."""
    predictions, features = [], []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size].to(device)
        feats = model.features(chunk)
        predictions.append(model.classifier(feats).argmax(dim=1).cpu())
        features.append(feats.float().cpu())
    return torch.cat(predictions), torch.cat(features)
