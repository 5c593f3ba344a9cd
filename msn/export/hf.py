"""transformers ViTMSN (``hf``), both directions (docs/formats.md Sec. 3).

Written without importing transformers (plain JSON + safetensors), with the on-disk names
that transformers 4.x and 5.x both read (``key_maps.HF_VIT_MSN``):

* ``config.json``: ``model_type: vit_msn`` and the architecture fields;
* ``model.safetensors`` (metadata ``{"format": "pt"}``);
* ``preprocessor_config.json``: ``BitImageProcessor`` = Resize(shortest edge
  round(size * 256/224), bilinear) -> CenterCrop(size) -> normalise with the checkpoint's
  mean/std, the reference's evaluation transform;
* ``msn_export.json``.

With labels, the classification model is written by hand (keys under ``vit.`` plus
``classifier.*``): transformers 5.x's own ``save_pretrained`` of that class writes mixed
prefixes that 4.x loads silently wrong.

Read: such folders (also the hub's ``pytorch_model.bin`` ones), and weight files in the
classic names, the 5.x in-memory names or under ``vit.`` (a classifier's, whose
``classifier.*`` is ignored).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from msn.export import key_maps
from msn.export.backbone_architecture import describe_backbone, square_side
from msn.export.export_record import EXPORT_INFO, apply_export_info, export_info, installed_version, preprocessing
from msn.export.model_card import write_model_card
from msn.export.state_dicts import parse_wrapped, split_by_prefix
from msn.export.weight_files import read_model_weights, save_safetensors, write_json
from msn.export.weight_types import IMAGENET_MEAN, IMAGENET_STD, EncoderWeights, LoadedBackbone, Probe, WeightsSource

#: Format name (a key of :data:`msn.export.formats.FORMATS`).
HF = "hf"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
PREPROCESSOR = "preprocessor_config.json"
MODEL_TYPES = ("vit_msn", "vit")
#: Keys that mark a bare state dict in transformers names.
STATE_MARKERS = ("embeddings.cls_token", key_maps.HF_BASE_PREFIX + "embeddings.cls_token")


# --- reading --------------------------------------------------------------------------------------
def sniff(probe: Probe) -> bool:
    """A folder whose ``config.json`` has ``model_type`` vit_msn (or vit)."""
    config = probe.json(CONFIG) if probe.is_folder else None
    return config is not None and config.get("model_type") in MODEL_TYPES


def parse_state(state: dict[str, torch.Tensor]) -> EncoderWeights:
    """transformers names (classic or 5.x in-memory, optionally under ``vit.``) -> ours."""
    prefixed = STATE_MARKERS[1] in state
    state = dict(state)
    classifier = {key: state.pop(key) for key in key_maps.HF_CLASSIFIER if key in state} or None
    hf_state, rest = split_by_prefix(state, key_maps.HF_BASE_PREFIX) if prefixed else (state, {})
    backbone, origin, leftover = key_maps.HF_VIT_MSN.import_(hf_state)
    variant = ""
    if leftover:
        more, more_origin, leftover = key_maps.HF_VIT_MSN_V5_MEMORY.import_(leftover)
        if more:
            classic = any(name.startswith("encoder.layer.") for name in origin.values())
            variant = "mixed names" if classic else "5.x in-memory names"
        backbone.update(more)
        origin.update(more_origin)
    pre = key_maps.HF_BASE_PREFIX if prefixed else ""
    origin = {ours: " + ".join(pre + part for part in theirs.split(" + ")) for ours, theirs in origin.items()}
    for key, tensor in {**leftover, **rest}.items():  # reported by the strict load
        backbone[key] = tensor
        origin[key] = (pre + key) if key in leftover else key
    return EncoderWeights(backbone, None, classifier, origin, variant=variant)


def read_state(state: dict[str, Any], path: str) -> WeightsSource:
    """A bare weights file in transformers names."""
    encoder = parse_wrapped(state, parse_state)
    return WeightsSource(path, HF, {"single": encoder}, info={"variant": encoder.variant or None})


def read(probe: Probe) -> WeightsSource:
    """A transformers ViTMSN folder: architecture from ``config.json``, mean/std from the preprocessor."""
    folder, path, config = probe.location, probe.path, probe.json(CONFIG)
    for key, wanted in (("hidden_act", "gelu"), ("qkv_bias", True), ("num_channels", 3)):
        if key in config and config[key] != wanted:
            raise ValueError(f"{path}/{CONFIG}: {key}={config[key]!r} is not supported (MSN ViTs use {wanted!r})")
    eps = config.get("layer_norm_eps", 1e-6)
    if not math.isclose(eps, 1e-6, rel_tol=1e-3):
        raise ValueError(f"{path}/{CONFIG}: layer_norm_eps={eps} is not supported (MSN ViTs use 1e-06)")
    hidden = config.get("hidden_size", 768)
    arch = {
        "embed_dim": hidden,
        "depth": config.get("num_hidden_layers", 12),
        "num_heads": config.get("num_attention_heads", 12),
        "mlp_ratio": config.get("intermediate_size", 4 * hidden) / hidden,
        "patch_size": square_side(config.get("patch_size", 16)),
    }
    processor = probe.json(PREPROCESSOR) or {}
    source = read_state(read_model_weights(folder, probe.trust_pickle), path)
    source.arch, source.image_size = arch, square_side(config.get("image_size", 224))
    source.mean = tuple(processor.get("image_mean", IMAGENET_MEAN))
    source.std = tuple(processor.get("image_std", IMAGENET_STD))
    return apply_export_info(source, folder)


# --- writing --------------------------------------------------------------------------------------
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
    version = installed_version("transformers")  # written like its own save_pretrained does
    if version is not None:
        config["transformers_version"] = version
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
    state = key_maps.HF_VIT_MSN.export(loaded.backbone.vit.state_dict())
    if num_labels <= 0:
        return state
    state = {key_maps.HF_BASE_PREFIX + key: value for key, value in state.items()}
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
        write_model_card(loaded, output, labels),
    ]
    extra = {"num_labels": len(labels)} if labels else {}
    info = export_info(loaded, HF, [path.name for path in files] + [EXPORT_INFO], output, extra)
    files.append(write_json(info, output / EXPORT_INFO))
    return files
