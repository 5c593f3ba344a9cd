"""timm (``timm``), both directions (docs/formats.md Sec. 4).

The export folder holds a timm state dict and a timm ``config.json``; load it either way
(both strict, nothing downloaded)::

    cfg = json.load(open(f"{folder}/config.json"))
    model = timm.create_model(cfg["architecture"], pretrained=False, num_classes=0, **cfg["model_args"])
    model.load_state_dict(safetensors.torch.load_file(f"{folder}/model.safetensors"), strict=True)

    model = timm.create_model(f"local-dir:{folder}", pretrained=True)   # timm 1.0.31 checked

``architecture`` is timm's own name of the shape when timm registers one
(:func:`msn.architectures.timm_candidates`), else :data:`VIT_MSN`, a generic entry that
importing this module registers with timm. The timm ``config.json`` clashes with
transformers', hence its own folder. Read: such folders and bare timm state dicts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import timm
from timm.models import build_model_with_cfg, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from msn.architectures import timm_candidates
from msn.export import key_maps
from msn.export.backbone_architecture import describe_backbone, square_side
from msn.export.export_record import EXPORT_INFO, apply_export_info, export_info, preprocessing
from msn.export.state_dicts import parse_wrapped, split_head
from msn.export.weight_files import read_model_weights, save_safetensors, write_json
from msn.export.weight_types import IMAGENET_MEAN, IMAGENET_STD, EncoderWeights, LoadedBackbone, Probe, WeightsSource

#: Public names; ``vit_msn`` among them, or timm's ``register_model`` would append it.
__all__ = ["STATE_MARKERS", "TIMM", "VIT_MSN", "export_timm", "parse_state", "read", "read_state", "register_vit_msn",
           "sniff", "timm_architecture", "timm_config", "timm_model_args", "vit_msn"]

#: Format name (a key of :data:`msn.export.formats.FORMATS`).
TIMM = "timm"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
#: Keys that mark a bare state dict in timm names.
STATE_MARKERS = ("cls_token",)
#: The timm model name of shapes timm registers none for (vit_mini, ViT-B/4, ViT-L/7, ...).
VIT_MSN = "vit_msn"

#: timm's default configuration of :data:`VIT_MSN` (``register_model`` reads this module's ``default_cfgs``).
default_cfgs = {VIT_MSN: {
    "url": "", "num_classes": 0, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 224 / 256,
    "interpolation": "bilinear", "fixed_input_size": True, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
    "first_conv": "patch_embed.proj", "classifier": "head",
}}


def vit_msn(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """timm entry point of :data:`VIT_MSN`: a ``VisionTransformer`` built from ``kwargs`` alone.

    ``pretrained=True`` loads weights the way timm's own ViTs do (``local-dir:`` folders included).
    """
    return build_model_with_cfg(VisionTransformer, VIT_MSN, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


def register_vit_msn() -> None:
    """Register :data:`VIT_MSN` with timm once (later calls do nothing)."""
    if not timm.is_model(VIT_MSN):
        register_model(vit_msn)


register_vit_msn()


# --- reading --------------------------------------------------------------------------------------
def sniff(probe: Probe) -> bool:
    """A folder whose ``config.json`` names an ``architecture``."""
    config = probe.json(CONFIG) if probe.is_folder else None
    return config is not None and "architecture" in config


def parse_state(state: dict[str, Any]) -> EncoderWeights:
    """timm names, with a projection head under ``fc.`` / ``head.`` or a classifier ``head.*``."""
    head, rest, head_prefix = split_head(state, ("fc.", "head."))
    classifier = None
    if head is None and "head.weight" in rest:  # a timm classifier (num_classes > 0)
        classifier = {key: rest.pop(key) for key in ("head.weight", "head.bias") if key in rest}
    origin = {key: key for key in rest} | {key: head_prefix + key for key in head or {}}
    return EncoderWeights(rest, head, classifier, origin)


def read_state(state: dict[str, Any], path: str) -> WeightsSource:
    """A bare timm state dict (``.safetensors`` / ``.pth``, with or without ``module.``)."""
    return WeightsSource(path, TIMM, {"single": parse_wrapped(state, parse_state)})


def read(probe: Probe) -> WeightsSource:
    """A timm folder: architecture from ``model_args``, input size and mean/std from ``pretrained_cfg``."""
    config = probe.json(CONFIG)
    model_args = dict(config.get("model_args") or {})
    pretrained_cfg = config.get("pretrained_cfg") or {}
    arch = {key: model_args[key] for key in ("embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size") if key in model_args}
    if "patch_size" in arch:
        arch["patch_size"] = square_side(arch["patch_size"])
    image_size = square_side(model_args["img_size"]) if "img_size" in model_args else None
    if image_size is None and pretrained_cfg.get("input_size"):
        image_size = int(pretrained_cfg["input_size"][-1])
    source = read_state(read_model_weights(probe.location, probe.trust_pickle), probe.path)
    source.arch, source.image_size = arch, image_size
    source.mean = tuple(pretrained_cfg.get("mean", IMAGENET_MEAN))
    source.std = tuple(pretrained_cfg.get("std", IMAGENET_STD))
    source.info["timm_architecture"] = config.get("architecture")
    return apply_export_info(source, probe.location)


# --- writing --------------------------------------------------------------------------------------
def timm_architecture(arch: dict[str, Any]) -> tuple[str, str]:
    """(timm model name, who registers it: ``timm`` or ``msn``) of a backbone architecture.

    timm's own name when it registers the shape (MLP ratio 4 included), else :data:`VIT_MSN`.
    """
    if arch["mlp_ratio"] == 4.0:
        for name in timm_candidates(arch["embed_dim"], arch["depth"], arch["num_heads"], arch["patch_size"], arch["image_size"]):
            if timm.is_model(name):
                return name, "timm"
    return VIT_MSN, "msn"


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
        "architecture": timm_architecture(arch)[0],
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
        save_safetensors(key_maps.TIMM.export(loaded.backbone.vit.state_dict()), output / WEIGHTS),
        write_json(timm_config(loaded), output / CONFIG),
    ]
    registered_by = timm_architecture(describe_backbone(loaded.backbone))[1]
    info = export_info(loaded, TIMM, [path.name for path in files] + [EXPORT_INFO], output,
                       {"timm_architecture_registered_by": registered_by})
    files.append(write_json(info, output / EXPORT_INFO))
    return files
