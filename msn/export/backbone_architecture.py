"""A backbone's architecture: inferred from tensor shapes, bounded, described and built.

Without a config the architecture comes from the shapes, the head count from the width of a
published size or ``num_heads=`` (docs/formats.md Sec. 6); every field is checked against
:data:`msn.architectures.ARCHITECTURE_LIMITS` before anything is built (docs/security.md).
Imports only :mod:`msn.export.weight_types`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from msn.architectures import ARCHITECTURES, HEADS_BY_WIDTH, arch_for_width, out_of_range
from msn.config import MSNConfig
from msn.export.weight_types import WeightsMismatchError
from msn.models import MSNViT, build_vit

Tensor = torch.Tensor


def square_side(value: Any) -> int:
    """The side of a square size given as an int or a pair."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"non-square sizes are not supported: {value}")
        value = value[0]
    return int(value)


def infer_architecture(backbone_state: dict[str, Tensor], num_heads: int | None = None, known: dict[str, Any] | None = None,
                       image_size: int | None = None, origin: str = "") -> dict[str, Any]:
    """Architecture of a timm-named backbone state dict; ``known`` values (from a config) win.

    Heads come from ``num_heads``, then ``known``, then :data:`HEADS_BY_WIDTH` (docs/formats.md Sec. 6).

    Returns:
        dict with ``embed_dim, depth, num_heads, mlp_ratio, patch_size, image_size``.
    """
    known = dict(known or {})
    where = f"{origin}: " if origin else ""
    check_architecture({**known, "num_heads": num_heads if num_heads is not None else known.get("num_heads"),
                        "image_size": image_size}, origin)  # as stated, before any conversion
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if key not in backbone_state:
            raise WeightsMismatchError(f"{where}missing key {key}: not a ViT backbone with a CLS token")
    embed_dim = int(backbone_state["cls_token"].shape[-1])
    patch = backbone_state["patch_embed.proj.weight"]
    if patch.ndim != 4 or patch.shape[-1] != patch.shape[-2]:
        raise WeightsMismatchError(f"{where}patch_embed.proj.weight: shape {tuple(patch.shape)} is not a square patch convolution")
    blocks = {int(key.split(".")[1]) for key in backbone_state if key.startswith("blocks.") and key.split(".")[1].isdigit()}
    fc1 = backbone_state.get("blocks.0.mlp.fc1.weight")
    slots = int(backbone_state["pos_embed"].shape[1]) - 1
    side = math.isqrt(slots)
    if side * side != slots:
        raise WeightsMismatchError(f"{where}pos_embed: shape {tuple(backbone_state['pos_embed'].shape)} "
                                   "is not 1 + a square number of patches")
    heads = next((value for value in (num_heads, known.get("num_heads"), HEADS_BY_WIDTH.get(embed_dim)) if value is not None),
                 None)
    if heads is None:
        raise ValueError(f"{where}cannot infer the number of attention heads for width {embed_dim} "
                         f"(known widths: {HEADS_BY_WIDTH}); pass num_heads= (CLI: --num-heads)")
    arch = {
        "embed_dim": int(known.get("embed_dim", embed_dim)),
        "depth": int(known.get("depth", max(blocks) + 1 if blocks else 0)),
        "num_heads": int(heads),
        "mlp_ratio": float(known.get("mlp_ratio", float(fc1.shape[0]) / embed_dim if fc1 is not None else 4.0)),
        "patch_size": int(known.get("patch_size", int(patch.shape[-1]))),
        "image_size": int(image_size or side * int(patch.shape[-1])),
    }
    check_architecture(arch, origin)
    if arch["embed_dim"] % arch["num_heads"]:
        raise ValueError(f"{where}width {arch['embed_dim']} is not divisible by num_heads={arch['num_heads']}")
    return arch


def check_architecture(fields: dict[str, Any], origin: str = "") -> None:
    """Refuse architecture fields outside :data:`msn.architectures.ARCHITECTURE_LIMITS` before
    anything is built (a file's stated ``depth: 400`` would otherwise cost minutes and gigabytes).

    Raises:
        ValueError: one line naming the file and the first field out of range.
    """
    bad = out_of_range(fields)
    if bad is not None:
        raise ValueError(f"{origin + ': ' if origin else ''}architecture out of range: {bad}; refused before building the model")


def configured_architecture(cfg: MSNConfig) -> dict[str, Any]:
    """The architecture fields a training config asks for (what :func:`check_architecture` bounds)."""
    model = cfg.model
    dims = ARCHITECTURES.get(model.arch, {})
    return {"embed_dim": model.embed_dim or dims.get("embed_dim"), "depth": model.depth or dims.get("depth"),
            "num_heads": model.num_heads or dims.get("num_heads"), "mlp_ratio": model.mlp_ratio,
            "patch_size": model.patch_size, "image_size": cfg.data.views.rand_size,
            "hidden_dim": cfg.head.hidden_dim, "output_dim": cfg.head.output_dim,
            "num_prototypes": cfg.loss.num_prototypes}


def build_backbone(arch: dict[str, Any], attention: str = "sdpa") -> MSNViT:
    """An :class:`MSNViT` with the given architecture (see :func:`infer_architecture`)."""
    return build_vit(arch_for_width(arch["embed_dim"]), arch["patch_size"], arch["image_size"], embed_dim=arch["embed_dim"],
                     depth=arch["depth"], num_heads=arch["num_heads"], mlp_ratio=arch["mlp_ratio"], attention=attention)


def describe_backbone(backbone: MSNViT) -> dict[str, Any]:
    """Architecture fields of a built backbone (what every export records)."""
    vit = backbone.vit
    grid = vit.pos_embed.shape[1] - 1
    fc1 = vit.blocks[0].mlp.fc1 if len(vit.blocks) else None
    return {
        "embed_dim": int(vit.embed_dim),
        "depth": len(vit.blocks),
        "num_heads": int(vit.blocks[0].attn.num_heads) if len(vit.blocks) else 0,
        "mlp_ratio": float(fc1.out_features) / vit.embed_dim if fc1 is not None else 4.0,
        "patch_size": int(backbone.patch_size),
        "image_size": int(math.isqrt(grid)) * int(backbone.patch_size),
    }


def head_dims(head_state: dict[str, Tensor]) -> dict[str, Any]:
    """``hidden_dim, output_dim, use_bn`` of a projection-head state dict."""
    for key in ("fc1.weight", "fc3.weight"):
        if key not in head_state:
            raise WeightsMismatchError(f"projection head: missing key {key}")
    return {
        "hidden_dim": int(head_state["fc1.weight"].shape[0]),
        "output_dim": int(head_state["fc3.weight"].shape[0]),
        "use_bn": "bn1.weight" in head_state or "bn1.running_mean" in head_state,
    }
