"""One loader for every backbone source (used by train.py, eval_lowshot.py and msn-export).

Supported now: our training checkpoints (``msn.checkpoint``). Other layouts (our exports,
transformers ViTMSN directories, timm state dicts, the reference's ``.pth.tar``) plug into
:func:`load_backbone` through the same :class:`LoadedBackbone` result.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from msn import checkpoint
from msn.config import MSNConfig, from_dict
from msn.models import MSNNetwork, MSNViT, build_network


@dataclass
class LoadedBackbone:
    """A backbone ready for feature extraction, with what is known about it.

    Attributes:
        backbone: the encoder (eval mode, on CPU).
        image_size: native input side in pixels.
        mean, std: normalisation the backbone was trained with.
        network: backbone + projection head when the source has the head.
        prototypes: [K, D] prototypes when the source has them.
        config: the training config when the source is one of our checkpoints.
        source: a short description (path, format, which encoder, step).
    """

    backbone: MSNViT
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    network: MSNNetwork | None = None
    prototypes: torch.Tensor | None = None
    config: MSNConfig | None = None
    source: dict[str, Any] = field(default_factory=dict)


def network_from_checkpoint(state: dict[str, Any], which: str = "target") -> tuple[MSNNetwork, MSNConfig]:
    """Rebuild the encoder (+head) of a training checkpoint; ``which`` is target or online."""
    if which not in ("target", "online"):
        raise ValueError(f"which: must be target or online, got {which!r}")
    cfg = from_dict(state["config"])
    network = build_network(cfg.model, cfg.head, cfg.data.views.rand_size)
    network.load_state_dict(state["target_encoder" if which == "target" else "encoder"], strict=True)
    return network.eval(), cfg


def load_backbone(path: str | os.PathLike, which: str = "target") -> LoadedBackbone:
    """Load a backbone from ``path``.

    Args:
        path: a training checkpoint file (``checkpoints/latest.pt``) or a run directory
            holding one.
        which: ``target`` (EMA encoder, the reference's choice for evaluation) or ``online``.
    """
    path = os.fspath(path)
    if os.path.isdir(path) and checkpoint.find_latest(path) is not None:
        path = os.fspath(checkpoint.find_latest(path))
    state = checkpoint.load_checkpoint(path)
    network, cfg = network_from_checkpoint(state, which)
    views = cfg.data.views


    return LoadedBackbone(
        backbone=network.backbone,
        image_size=views.rand_size,
        mean=tuple(views.mean),
        std=tuple(views.std),
        network=network,
        prototypes=state["prototypes"],
        config=cfg,
        source={"path": path, "format": "msn-checkpoint", "which": which, "step": state.get("step")},
    )
