"""transformers export (``--format hf``): a ``ViTMSNModel`` or ``ViTMSNForImageClassification`` folder.

Written without importing transformers (the files are plain JSON + safetensors), with the
on-disk names that transformers 4.x and 5.x both read (``names.HF_VIT_MSN``; formats.md):

* ``config.json``: ``model_type: vit_msn`` and the architecture fields;
* ``model.safetensors`` (metadata ``{"format": "pt"}``);
* ``preprocessor_config.json``: ``BitImageProcessor`` = Resize(shortest edge
  round(size * 256/224), bilinear) -> CenterCrop(size) -> normalise with the checkpoint's
  mean/std, the reference's evaluation transform;
* ``msn_export.json``.

With labels, the classification model is written by hand (keys under ``vit.`` plus
``classifier.*``): transformers 5.x's own ``save_pretrained`` of that class writes mixed
prefixes that 4.x loads silently wrong.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch

from msn.export import names
from msn.export.loading import EXPORT_INFO, LoadedBackbone, describe_backbone
from msn.export.native import export_info, preprocessing, save_safetensors, write_json

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
PREPROCESSOR = "preprocessor_config.json"


def hf_config(loaded: LoadedBackbone, labels: Sequence[str] | None = None) -> dict[str, Any]:
    """``config.json`` of a ViTMSN export (classification when ``labels`` is given)."""
    arch = describe_backbone(loaded.backbone)
    config: dict[str, Any] = {
        "architectures": ["ViTMSNForImageClassification" if labels else "ViTMSNModel"],
        "model_type": "vit_msn",
        "hidden_size": arch["embed_dim"],
        "num_hidden_layers": arch["depth"],
        "num_attention_heads": arch["num_heads"],
        "intermediate_size": int(round(arch["embed_dim"] * arch["mlp_ratio"])),
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-06,
        "image_size": arch["image_size"],
        "patch_size": arch["patch_size"],
        "num_channels": 3,
        "qkv_bias": True,
        "torch_dtype": "float32",
    }
    if labels:
        config["id2label"] = {str(index): label for index, label in enumerate(labels)}
        config["label2id"] = {label: index for index, label in enumerate(labels)}
    return config


def preprocessor_config(loaded: LoadedBackbone) -> dict[str, Any]:
    """``preprocessor_config.json``: the reference evaluation transform for ``pipeline(...)``."""
    prep = preprocessing(loaded)
    return {
        "image_processor_type": "BitImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": prep["resize_shortest_edge"]},
        "resample": 2,  # PIL bilinear, like torchvision's Resize default
        "do_center_crop": True,
        "crop_size": {"height": prep["center_crop"], "width": prep["center_crop"]},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": prep["mean"],
        "image_std": prep["std"],
        "do_convert_rgb": True,
    }


def hf_state(loaded: LoadedBackbone, num_labels: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights in the classic transformers names; ``vit.`` + ``classifier.*`` when ``num_labels``.

    The classifier is new: weights normal(0, 0.02) from a fixed seed, zero bias.
    """
    state = names.HF_VIT_MSN.export(loaded.backbone.vit.state_dict())
    if num_labels <= 0:
        return state
    state = {names.HF_BASE_PREFIX + key: value for key, value in state.items()}
    generator = torch.Generator().manual_seed(seed)
    width = loaded.backbone.embed_dim
    state["classifier.weight"] = torch.randn(num_labels, width, generator=generator) * 0.02
    state["classifier.bias"] = torch.zeros(num_labels)
    return state


def export_hf(loaded: LoadedBackbone, output: str | os.PathLike, labels: Sequence[str] | None = None) -> list[Path]:
    """Write a transformers folder; ``labels`` (one name per class) makes it a classifier."""
    labels = list(labels) if labels else None
    if labels and len(set(labels)) != len(labels):
        raise ValueError("labels: every label must be unique (label2id needs them)")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    files = [
        write_json(hf_config(loaded, labels), output / CONFIG),
        save_safetensors(hf_state(loaded, len(labels) if labels else 0), output / WEIGHTS),
        write_json(preprocessor_config(loaded), output / PREPROCESSOR),
    ]
    fmt = "hf-classification" if labels else "hf"
    extra = {"num_labels": len(labels)} if labels else {}
    info = export_info(loaded, fmt, [path.name for path in files] + [EXPORT_INFO], extra)
    files.append(write_json(info, output / EXPORT_INFO))
    return files
