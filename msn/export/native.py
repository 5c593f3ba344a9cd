"""Our own export layout (``--format msn``) and the ``msn_export.json`` that every export writes.

``--format msn`` folder::

    weights.safetensors   backbone.<timm name>   the encoder (``MSNViT.vit`` state dict)
                          head.<fc1|bn1|fc2|bn2|fc3>.*   projection head, BN running stats included
                          prototypes             [K, D], un-normalised
    msn_export.json       see :func:`export_info`

Continue pre-training from it with ``init_from=<folder>`` (``msn.export.load_init_weights``).
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from msn.config import to_dict
from msn.export import names
from msn.export.loading import EXPORT_INFO, NATIVE_WEIGHTS, LoadedBackbone, describe_backbone

EXPORT_VERSION = 1

#: The low-shot feature of the reference (msn-reference.md Sec. 8), per export format.
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
        "mean": [float(v) for v in loaded.mean],
        "std": [float(v) for v in loaded.std],
    }


def _versions() -> dict[str, str]:
    import msn
    import timm

    versions = {"msn": msn.__version__, "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version()}
    try:  # optional: recorded only when installed (never needed to export)
        from importlib.metadata import version

        versions["transformers"] = version("transformers")
    except Exception:  # noqa: BLE001
        pass
    return versions


def export_info(loaded: LoadedBackbone, fmt: str, files: list[str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``msn_export.json`` document of an export.

    Records the source (path, format, step, epoch), which encoder, the architecture, the
    training config when known, the evaluation preprocessing and the recommended feature.
    """
    source = loaded.source
    cfg = to_dict(loaded.config) if loaded.config is not None else None
    info = {
        "msn_export_version": EXPORT_VERSION,
        "format": fmt,
        "source": {
            "path": os.path.abspath(source["path"]) if source.get("path") else None,
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


def write_json(document: dict[str, Any], path: str | os.PathLike) -> Path:
    path = Path(path)
    with open(path, "w") as stream:
        json.dump(document, stream, indent=2, sort_keys=False, default=_json_default)
        stream.write("\n")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def save_safetensors(state: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write tensors as contiguous CPU copies with metadata ``{"format": "pt"}``."""
    from safetensors.torch import save_file

    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in state.items()}
    save_file(tensors, os.fspath(path), metadata={"format": "pt"})
    return Path(path)


def native_state(loaded: LoadedBackbone) -> dict[str, torch.Tensor]:
    """``weights.safetensors`` contents: ``backbone.*``, ``head.*``, ``prototypes``."""
    if loaded.network is None:
        raise ValueError(f"{loaded.source.get('path')}: has no projection head; --format msn needs backbone + head + prototypes")
    if loaded.prototypes is None:
        raise ValueError(f"{loaded.source.get('path')}: has no prototypes; --format msn needs backbone + head + prototypes")
    state = names.NATIVE_BACKBONE.export(loaded.backbone.vit.state_dict())
    state.update(names.NATIVE_HEAD.export(loaded.network.head.state_dict()))
    state[names.NATIVE_PROTOTYPES] = loaded.prototypes
    return state


def export_native(loaded: LoadedBackbone, output: str | os.PathLike) -> list[Path]:
    """Write the ``--format msn`` folder; returns the written files."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    weights = save_safetensors(native_state(loaded), output / NATIVE_WEIGHTS)
    info = write_json(export_info(loaded, "msn", [NATIVE_WEIGHTS, EXPORT_INFO]), output / EXPORT_INFO)
    return [weights, info]
