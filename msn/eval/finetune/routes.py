"""The two routes of the fine-tuning comparison (docs/finetune.md): each loads one of our exports
with its library's own loader and a new classifier, and uses the library's own preprocessing.

* ``hf``: ``transformers.ViTMSNForImageClassification.from_pretrained(EXPORT, num_labels=10)``
  (a new classifier on the post-LayerNorm CLS token), images through the export's saved image
  processor (``AutoImageProcessor``);
* ``timm``: ``timm.create_model(config["architecture"], pretrained=True, num_classes=10,
  pretrained_cfg_overlay=dict(file=EXPORT/model.safetensors, ...), **config["model_args"])``
  (``import msn.export`` first: it registers ``vit_msn``, the name our exporter records for
  shapes timm lacks), images through ``timm.data.resolve_data_config`` + ``create_transform``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import msn.export  # noqa: F401 - registers timm's "vit_msn" (shapes timm has no name for)
from msn.eval.finetune.data import NUM_CLASSES
from msn.export.backbone_architecture import check_architecture

ROUTES = ("hf", "timm")


@dataclass
class Route:
    """One loaded route: the model with its new head and the library's own pieces."""

    name: str
    model: nn.Module
    preprocess: Callable[[list], torch.Tensor]  # PIL images -> normalised [N, 3, S, S]
    logits: Callable[[torch.Tensor], torch.Tensor]
    frozen_feature: Callable[[torch.Tensor], torch.Tensor]  # pre-LN CLS of the backbone
    layer_of: Callable[[str], int]  # parameter name -> layer index for layer-wise LR decay
    depth: int
    backbone_prefix: str  # parameter names of the backbone (not the new classifier)
    preprocessing: str  # how images were prepared, for the report
    architecture: str


def load_hf(export_dir: str | Path, num_labels: int = NUM_CLASSES, labels: Sequence[str] | None = None) -> Route:
    """Route A: the transformers export as ``ViTMSNForImageClassification`` with a new classifier."""
    from transformers import AutoImageProcessor, ViTMSNForImageClassification

    extra = {"id2label": dict(enumerate(labels)), "label2id": {v: k for k, v in enumerate(labels)}} if labels else {}
    model, info = ViTMSNForImageClassification.from_pretrained(export_dir, num_labels=num_labels,
                                                               output_loading_info=True, **extra)
    new = sorted(info["missing_keys"])
    if new != ["classifier.bias", "classifier.weight"] or info["unexpected_keys"] or info["mismatched_keys"]:
        raise RuntimeError(f"{export_dir}: the backbone did not load completely: {info}")
    processor = AutoImageProcessor.from_pretrained(export_dir)

    def preprocess(images: list) -> torch.Tensor:
        return processor(images=images, return_tensors="pt")["pixel_values"]

    def frozen_feature(pixels: torch.Tensor) -> torch.Tensor:
        return model.vit(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, 0]

    depth = model.config.num_hidden_layers

    def layer_of(name: str) -> int:
        if name.startswith("vit.embeddings."):
            return 0
        found = re.match(r"vit\.(?:encoder\.layer|layers)\.(\d+)\.", name)  # 4.x names, 5.x names
        return int(found.group(1)) + 1 if found else depth + 1

    def field_of(sizes, key):  # a dict in transformers 4.x, a SizeDict in 5.x
        return sizes.get(key) if isinstance(sizes, dict) else getattr(sizes, key, None)

    crop = f"{field_of(processor.crop_size, 'height')}x{field_of(processor.crop_size, 'width')}"
    steps = [f"{type(processor).__name__}: resize shortest edge to {field_of(processor.size, 'shortest_edge')}",
             f"centre crop {crop}", f"normalise mean {list(processor.image_mean)} std {list(processor.image_std)}"]
    return Route("hf", model, preprocess, lambda x: model(pixel_values=x).logits, frozen_feature, layer_of, depth,
                 "vit.", " -> ".join(steps), "ViTMSNForImageClassification")


def timm_overlay(export_dir: str | Path) -> tuple[dict, dict]:
    """(timm ``config.json`` of the export, the ``pretrained_cfg_overlay`` that points timm at its
    weights file and carries its preprocessing)."""
    export_dir = Path(export_dir)
    config = json.loads((export_dir / "config.json").read_text())
    keep = ("input_size", "fixed_input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std",
            "num_classes", "first_conv", "classifier")
    overlay = {key: config["pretrained_cfg"][key] for key in keep if key in config["pretrained_cfg"]}
    overlay["input_size"] = tuple(overlay["input_size"])
    overlay["file"] = str(export_dir / "model.safetensors")
    return config, overlay


def check_timm_weights(model: nn.Module, weights_file: str | Path) -> None:
    """Every tensor of ``weights_file`` is in ``model`` unchanged, and only the new ``head.*`` is
    not from the file: timm loads non-strictly when ``num_classes`` differs from the file's (0),
    so a file of other names would otherwise load nothing, with only a log line."""
    from safetensors.torch import load_file

    saved, state = load_file(str(weights_file)), model.state_dict()
    missing = sorted(set(state) - set(saved))
    if missing != ["head.bias", "head.weight"] or set(saved) - set(state):
        raise RuntimeError(f"{weights_file}: timm did not load the backbone completely "
                           f"(not from the file: {missing}; not used: {sorted(set(saved) - set(state))})")
    for key, tensor in saved.items():
        if not torch.equal(state[key], tensor):
            raise RuntimeError(f"{weights_file}: {key} differs from the file after loading")


def load_timm(export_dir: str | Path, num_labels: int = NUM_CLASSES) -> Route:
    """Route B: the timm export through ``timm.create_model(..., pretrained=True, num_classes=N)``."""
    import timm
    from timm.data import create_transform, resolve_data_config

    config, overlay = timm_overlay(export_dir)
    args = config.get("model_args", {})
    side = args.get("img_size")
    side = side[0] if isinstance(side, (list, tuple)) and side else side
    check_architecture({"embed_dim": args.get("embed_dim"), "depth": args.get("depth"), "num_heads": args.get("num_heads"),
                        "mlp_ratio": args.get("mlp_ratio"), "patch_size": args.get("patch_size"), "image_size": side},
                       f"{export_dir}/config.json")  # before timm builds it
    model = timm.create_model(config["architecture"], pretrained=True, num_classes=num_labels,
                              pretrained_cfg_overlay=overlay, **config["model_args"])
    check_timm_weights(model, overlay["file"])
    data_config = resolve_data_config(model=model)
    transform = create_transform(**data_config, is_training=False)

    def preprocess(images: list) -> torch.Tensor:
        return torch.stack([transform(image) for image in images])

    def frozen_feature(pixels: torch.Tensor) -> torch.Tensor:
        tokens = model.forward_intermediates(pixels, indices=1, norm=False, output_fmt="NLC",
                                             return_prefix_tokens=True, intermediates_only=True)
        return tokens[0][1][:, 0]

    depth = len(model.blocks)

    def layer_of(name: str) -> int:
        if name.split(".")[0] in ("cls_token", "pos_embed", "patch_embed", "reg_token"):
            return 0
        found = re.match(r"blocks\.(\d+)\.", name)
        return int(found.group(1)) + 1 if found else depth + 1

    described = ", ".join(f"{k} {data_config[k]}" for k in ("input_size", "interpolation", "crop_pct", "mean", "std"))
    return Route("timm", model, preprocess, model, frozen_feature, layer_of, depth, "",
                 f"timm create_transform(resolve_data_config(model)): {described}", config["architecture"])
