"""Frozen features for the low-shot protocol: which token, extraction, and an on-disk cache.

Reference protocol (MSN paper Sec. 5; docs/method.md Sec. 8): the TARGET encoder without its
head, one centre view per image (Resize(256) -> CenterCrop(224) -> normalise, or the same
ratios at the model's size: :func:`msn.data.eval_transform`), and the CLS token of the last
block BEFORE the final LayerNorm. The other kinds (:data:`msn.eval.config.FEATURE_KINDS`)
are options.

Extraction (:func:`extract_features`) is batched under ``torch.inference_mode`` with
DataLoader workers and a tqdm bar, in bf16 autocast on CUDA and fp32 on CPU. Features are
cached per image in ``<cache_dir>/<sha256>.pt``; the key hashes the encoder's identity
(a sha256 of the network's weights + which encoder, or the baseline), the data (name, root,
split, size and a fingerprint of the image names), the transform and the feature kind. A
cache file holds the rows extracted so far for that key; later calls extract only the
missing images, so a sweep over shots, splits and lambdas extracts each image once.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from msn import files
from msn.checkpoint import atomic_save
from msn.models import MSNViT
from msn.runtime import autocast_dtype
from msn.safe_load import load_torch_file

log = logging.getLogger(__name__)

#: Bump when the meaning of cached rows changes.
CACHE_VERSION = 2  # 2: the centre crop of msn.data.transforms.CenterCrop


def backbone_features(backbone: MSNViT, images: torch.Tensor, kind: str = "cls_pre_ln", blocks: int = 4) -> torch.Tensor:
    """Features ``[B, D']`` of a batch of normalised images.

    Args:
        backbone: the encoder.
        images: ``[B, 3, H, W]``.
        kind: ``cls_pre_ln`` (CLS of the last block before the final LayerNorm; reference
            default), ``cls_post_ln`` (CLS after it), ``cls_concat`` (CLS of the last
            ``blocks`` blocks, each through the final LayerNorm, concatenated: ``blocks*D``)
            or ``patch_mean`` (mean of the post-LayerNorm patch tokens).
        blocks: number of blocks for ``cls_concat``.
    """
    if kind in ("cls_pre_ln", "cls_post_ln"):  # the last block for the CLS token alone
        return backbone.forward_cls(images, final_norm=kind == "cls_post_ln")
    if kind == "patch_mean":
        tokens, _ = backbone.forward_blocks(images)
        return tokens[:, 1:].mean(dim=1)
    if kind == "cls_concat":
        _, collected = backbone.forward_blocks(images, collect_last=blocks)
        return torch.cat([backbone.vit.norm(out[:, 0]) for out in collected], dim=-1)
    raise ValueError(f"feature: unknown kind {kind!r}")


def random_like(backbone: MSNViT, seed: int = 0) -> MSNViT:
    """A copy of ``backbone`` with freshly initialised weights (the ``random`` baseline).

    Same architecture; every module is reset, then timm's ViT initialisation and the CLS
    token init of :func:`msn.models.build_vit` are applied, under ``torch.manual_seed(seed)``
    (the global RNG state is restored afterwards).
    """
    model = copy.deepcopy(backbone)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.vit.init_weights()
        nn.init.trunc_normal_(model.vit.cls_token, std=0.02)
    return model.eval()


@dataclass
class Encoder:
    """What turns one batch of transformed images into feature rows.

    Attributes:
        name: ``backbone``, ``random`` or ``pixels``.
        transform: uint8 ``[3, H, W]`` -> float ``[3, S, S]``.
        image_size: ``S``.
        identity: JSON-able description for the cache key (file identity, feature kind...).
        model: the network (``None`` for pixels).
        kind, blocks: feature kind (see :func:`backbone_features`).
        architecture: for ``baseline=supervised``, the network whose architecture is trained
            per subset (the features are then the normalised images).
    """

    name: str
    transform: Callable[[torch.Tensor], torch.Tensor]
    image_size: int
    identity: dict[str, Any]
    model: Optional[MSNViT] = None
    kind: str = "cls_pre_ln"
    blocks: int = 4
    architecture: Optional[MSNViT] = None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.model is None:
            return images.flatten(1)
        return backbone_features(self.model, images, self.kind, self.blocks)


def weights_identity(model: nn.Module) -> dict[str, Any]:
    """sha256 of a network's parameters and buffers (names, dtypes, shapes and bytes, in
    ``state_dict`` order): the cache key follows the weights themselves, so weights swapped
    under a file of the same name, size and modification time get a new key (docs/security.md)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return {"sha256": digest.hexdigest()}


def data_identity(data_cfg, dataset: Dataset, train: bool) -> dict[str, Any]:
    """Data part of the cache key: name, root, split, size and a hash of the image names."""
    names = dataset.image_names() if hasattr(dataset, "image_names") else [str(i) for i in range(len(dataset))]
    identity = {
        "name": data_cfg.name,
        "root": os.path.realpath(data_cfg.root) if data_cfg.root else None,
        "split": "train" if train else "val",
        "size": len(dataset),
        "names_sha1": hashlib.sha1("\n".join(names).encode()).hexdigest(),
    }
    if data_cfg.name == "synthetic":
        identity.update(classes=data_cfg.synthetic_classes, image_size=data_cfg.synthetic_image_size)
    return identity


def cache_key(parts: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``parts``."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class _EvalImages(Dataset):
    """``(transformed image, label, readable)`` for chosen indices of an image data set."""

    def __init__(self, base: Dataset, indices: Sequence[int], transform, image_size: int):
        self.base, self.indices, self.transform, self.image_size = base, list(indices), transform, image_size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        image, label = self.base[self.indices[position]]
        if image is None:  # unreadable file with on_bad_image=skip
            return torch.zeros(3, self.image_size, self.image_size), label, False
        return self.transform(image), label, True


@dataclass
class FeatureSet:
    """Rows of chosen images, in the order asked for.

    Attributes:
        features: ``[n, D]`` float32 (raw, not normalised).
        labels: ``[n]`` int64.
        valid: ``[n]`` bool, false for unreadable images.
        extracted: how many of the rows were computed by this call (the rest came from cache).
    """

    features: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor
    extracted: int = 0


def _run_encoder(encoder: Encoder, dataset: Dataset, indices: Sequence[int], batch_size: int, num_workers: int,
                 device: torch.device, precision: str, progress: bool, desc: str):
    loader = DataLoader(
        _EvalImages(dataset, indices, encoder.transform, encoder.image_size),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    amp = autocast_dtype(precision, device)
    if encoder.model is not None:
        encoder.model.to(device).eval()
    features, labels, valid = [], [], []
    with torch.inference_mode():
        for images, batch_labels, ok in tqdm(loader, desc=desc, disable=not progress, unit="batch", leave=False):
            images = images.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None and encoder.model is not None):
                out = encoder(images)
            features.append(out.float().cpu())
            labels.append(batch_labels)
            valid.append(ok)
    if encoder.model is not None:
        encoder.model.cpu()
    return torch.cat(features), torch.cat(labels).long(), torch.cat(valid).bool()


def extract_features(
    encoder: Encoder,
    dataset: Dataset,
    indices: Sequence[int],
    *,
    data_key: dict[str, Any],
    batch_size: int = 128,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    precision: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    desc: str = "features",
) -> FeatureSet:
    """Features of ``dataset[indices]``, read from the cache when there, extracted otherwise.

    Args:
        encoder: the feature function and its identity.
        dataset: an image data set yielding ``(uint8 image or None, label)``.
        indices: the images wanted (any order; rows come back in this order).
        data_key: :func:`data_identity` of the data set (part of the cache key).
        batch_size, num_workers: DataLoader settings.
        device: where the network runs.
        precision: ``auto`` (bf16 autocast on CUDA, fp32 on CPU), ``fp32`` or ``bf16``.
        cache_dir: cache folder, or ``None`` for no caching.
        progress: show a tqdm bar.
        desc: bar label.
    """
    device = torch.device(device)
    indices = [int(i) for i in indices]
    if not indices:
        return FeatureSet(torch.empty(0, 0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.bool))
    amp = autocast_dtype(precision, device) if encoder.model is not None else None
    key_parts = {
        "version": CACHE_VERSION,
        "encoder": encoder.identity,
        "transform": repr(encoder.transform),
        "data": data_key,
        "precision": str(amp or torch.float32),
    }
    path = Path(cache_dir) / f"{cache_key(key_parts)}.pt" if cache_dir is not None else None
    cached: dict[str, torch.Tensor] | None = None
    if path is not None and path.is_file():
        try:
            cached = load_torch_file(path)
            if not isinstance(cached, dict) or cached.get("key") != cache_key(key_parts):
                cached = None
        except Exception as error:  # noqa: BLE001 - a damaged cache file is rebuilt
            log.warning("ignoring unreadable feature cache %s (%s)", path, error)
            cached = None
    position: dict[int, int] = {}
    if cached is not None:
        position = {int(i): row for row, i in enumerate(cached["indices"].tolist())}
    missing = sorted({i for i in indices if i not in position})
    extracted = 0
    if missing:
        feats, labels, valid = _run_encoder(encoder, dataset, missing, batch_size, num_workers, device, precision,
                                            progress, desc)
        extracted = len(missing)
        new_indices = torch.tensor(missing, dtype=torch.long)
        if cached is None:
            cached = {"key": cache_key(key_parts), "indices": new_indices, "features": feats, "labels": labels,
                      "valid": valid}
        else:
            cached = {
                "key": cached["key"],
                "indices": torch.cat([cached["indices"], new_indices]),
                "features": torch.cat([cached["features"], feats]),
                "labels": torch.cat([cached["labels"], labels]),
                "valid": torch.cat([cached["valid"], valid]),
            }
        position.update({i: len(position) + row for row, i in enumerate(missing)})
        if path is not None:
            atomic_save(cached, path)
            meta = path.with_suffix(".json")
            if not meta.exists():
                files.write_text(meta, json.dumps(key_parts, indent=2, sort_keys=True, default=str) + "\n")
    else:
        log.info("features: all %d rows from cache %s", len(indices), path)
    rows = torch.tensor([position[i] for i in indices], dtype=torch.long)
    return FeatureSet(cached["features"][rows], cached["labels"][rows], cached["valid"][rows], extracted)
