"""``msn_export.json``, the record every export folder carries (docs/formats.md Sec. 2).

:func:`export_info` writes its document: the source (file name, format, step), which encoder,
the architecture, the training config when known, the evaluation preprocessing and the
recommended feature (docs/method.md Sec. 8). :func:`apply_export_info` reads it back into a
:class:`~msn.export.weight_types.WeightsSource`.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

from msn.config import from_dict, shareable_dict
from msn.export.backbone_architecture import describe_backbone
from msn.export.weight_files import read_json
from msn.export.weight_types import IMAGENET_MEAN, IMAGENET_STD, LoadedBackbone, WeightsSource

#: Written into every export folder.
EXPORT_INFO = "msn_export.json"
EXPORT_VERSION = 1

#: The low-shot feature of the reference (docs/method.md Sec. 8), per export format.
FEATURE_RECOMMENDATION = {
    "recommended": "pre-LN CLS",
    "why": "the MSN reference's low-shot evaluation uses the CLS token of the last block BEFORE the "
    "final LayerNorm (then mean-centring and L2 normalisation of each feature row)",
    "hf": "model(pixel_values, output_hidden_states=True).hidden_states[-1][:, 0]",
    "hf_post_ln": "model(pixel_values).last_hidden_state[:, 0]",
    "timm": "model.forward_intermediates(x, indices=1, norm=False, output_fmt='NLC', "
    "return_prefix_tokens=True, intermediates_only=True)[0][1][:, 0]",
    "msn": "msn.export.load_backbone(dir).backbone.forward_blocks(x, collect_last=1)[1][-1][:, 0]",
}


def preprocessing(loaded: LoadedBackbone, resize_ratio: float = 256 / 224) -> dict[str, Any]:
    """The evaluation transform the backbone was trained for: Resize -> CenterCrop -> normalise."""
    size = loaded.image_size
    return {
        "image_size": size,
        "resize_shortest_edge": int(round(size * resize_ratio)),
        "center_crop": size,
        "interpolation": "bilinear",
        "mean": [float(value) for value in loaded.mean],
        "std": [float(value) for value in loaded.std],
    }


def installed_version(package: str) -> str | None:
    """The installed release of an optional ``package``, or None when it is not installed."""
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # noqa: BLE001 - not installed: nothing to record
        return None


def _versions() -> dict[str, str]:
    from msn.version import __version__
    import timm

    versions = {"msn": __version__, "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version()}
    transformers_version = installed_version("transformers")  # recorded only when installed (never needed to export)
    if transformers_version is not None:
        versions["transformers"] = transformers_version
    return versions


def export_info(loaded: LoadedBackbone, fmt: str, files: list[str], output: str | os.PathLike,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``msn_export.json`` document of an export in the folder ``output``.

    Records the source (its file name only: a path, even relative, would tell this machine's
    layout; format, step, epoch), which encoder, the architecture, the training config when
    known, the evaluation preprocessing and the recommended feature.
    """
    source = loaded.source
    cfg = shareable_dict(loaded.config) if loaded.config is not None else None
    info = {
        "msn_export_version": EXPORT_VERSION,
        "format": fmt,
        "source": {
            "file": os.path.basename(os.path.normpath(source["path"])) if source.get("path") else None,
            "format": source.get("format"),
            "step": source.get("step"),
            "epoch": source.get("epoch"),
        },
        "which": source.get("which", "target"),
        "architecture": describe_backbone(loaded.backbone),
        "model": cfg["model"] if cfg else None,
        "head": cfg["head"] if cfg else None,
        "config": cfg,
        "preprocessing": preprocessing(loaded),
        "feature": FEATURE_RECOMMENDATION,
        "files": sorted(files),
        "versions": _versions(),
    }
    info.update(extra or {})
    return info


def apply_export_info(source: WeightsSource, folder: Path) -> WeightsSource:
    """Fill what ``msn_export.json`` records (config, encoder role, step, preprocessing), if present."""
    info_path = folder / EXPORT_INFO
    if not info_path.is_file():
        return source
    info = read_json(info_path)
    if info.get("which") in ("target", "online") and "single" in source.encoders:
        source.encoders = {info["which"]: source.encoders.pop("single")}
    if info.get("config"):
        source.config = from_dict(info["config"], where=f"{info_path}: config")
    prep = info.get("preprocessing") or {}
    source.mean = tuple(prep.get("mean", source.mean or IMAGENET_MEAN))
    source.std = tuple(prep.get("std", source.std or IMAGENET_STD))
    source.image_size = source.image_size or prep.get("image_size")
    arch = info.get("architecture") or {}
    for key in ("embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size"):
        if key in arch:
            source.arch.setdefault(key, arch[key])
    recorded_source = info.get("source") or {}
    source.info.update({"export": info.get("format"), "exported_from": recorded_source.get("file") or recorded_source.get("path"),
                        "step": recorded_source.get("step"), "epoch": recorded_source.get("epoch")})
    return source
