"""timm export (``--format timm``): a folder with a timm state dict and a timm ``config.json``.

Load it either way (both strict, nothing downloaded)::

    cfg = json.load(open(f"{folder}/config.json"))
    model = timm.create_model(cfg["architecture"], pretrained=False, num_classes=0, **cfg["model_args"])
    model.load_state_dict(safetensors.torch.load_file(f"{folder}/model.safetensors"), strict=True)

    model = timm.create_model(f"local-dir:{folder}", pretrained=True)   # timm with local-dir support (1.0.31 checked)

The timm ``config.json`` clashes with transformers' (formats.md), hence its own folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from msn.architectures import TIMM_NAMES
from msn.export import names
from msn.export.loading import EXPORT_INFO, LoadedBackbone, describe_backbone
from msn.export.native import export_info, preprocessing, save_safetensors, write_json

CONFIG = "config.json"
WEIGHTS = "model.safetensors"



def timm_model_args(loaded: LoadedBackbone) -> dict[str, Any]:
    """Keyword arguments that make ``timm.create_model(architecture, **model_args)`` our backbone."""
    arch = describe_backbone(loaded.backbone)
    return {
        "img_size": arch["image_size"],
        "patch_size": arch["patch_size"],
        "embed_dim": arch["embed_dim"],
        "depth": arch["depth"],
        "num_heads": arch["num_heads"],
        "mlp_ratio": arch["mlp_ratio"],
        "qkv_bias": True,
        "class_token": True,
        "global_pool": "token",
    }


def timm_config(loaded: LoadedBackbone) -> dict[str, Any]:
    """timm's ``config.json`` (``architecture``, ``num_classes``, ``model_args``, ``pretrained_cfg``)."""
    arch = describe_backbone(loaded.backbone)
    prep = preprocessing(loaded)
    size = arch["image_size"]
    return {
        "architecture": TIMM_NAMES.get(arch["embed_dim"], "vit_tiny_patch16_224"),
        "num_classes": 0,
        "num_features": arch["embed_dim"],
        "global_pool": "token",
        "model_args": timm_model_args(loaded),
        "pretrained_cfg": {
            "tag": "msn",
            "custom_load": False,
            "input_size": [3, size, size],
            "fixed_input_size": True,
            "interpolation": prep["interpolation"],
            "crop_pct": size / prep["resize_shortest_edge"],
            "crop_mode": "center",
            "mean": prep["mean"],
            "std": prep["std"],
            "num_classes": 0,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }


def export_timm(loaded: LoadedBackbone, output: str | os.PathLike) -> list[Path]:
    """Write the timm folder; returns the written files."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    files = [
        save_safetensors(names.TIMM.export(loaded.backbone.vit.state_dict()), output / WEIGHTS),
        write_json(timm_config(loaded), output / CONFIG),
    ]
    info = export_info(loaded, "timm", [path.name for path in files] + [EXPORT_INFO])
    files.append(write_json(info, output / EXPORT_INFO))
    return files
