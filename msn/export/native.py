"""Our own files, both directions (docs/formats.md Secs. 1-2).

* ``msn-checkpoint``: a training checkpoint (``checkpoints/latest.pt`` / ``epoch_XXXX.pt``,
  or a run folder holding one). :mod:`msn.checkpoint` writes it; read here.
* ``msn``: the export folder that continues pre-training elsewhere (``init_from=<folder>``)::

      weights.safetensors   backbone.<timm name>            the encoder (``MSNViT.vit`` state dict)
                            head.<fc1|bn1|fc2|bn2|fc3>.*    projection head, BN running stats included
                            prototypes                      [K, D], un-normalised
      msn_export.json       see :func:`export_info`

* ``msn_export.json``, which every export folder carries: :func:`export_info` writes it,
  :func:`apply_export_info` reads it back.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from msn import checkpoint
from msn.config import from_dict, shareable_dict
from msn.export import names
from msn.export.common import (EXPORT_INFO, IMAGENET_MEAN, IMAGENET_STD, EncoderWeights, LoadedBackbone,
                               WeightsSource, as_tensor, describe_backbone, parse_wrapped, read_json, read_tensors,
                               save_safetensors, split_head, torch_load, unwrap_state, write_json)

if TYPE_CHECKING:  # the table module imports this one
    from msn.export.formats import Probe

#: Format names (keys of :data:`msn.export.formats.FORMATS`).
CHECKPOINT = checkpoint.FORMAT
EXPORT = "msn"
NATIVE_WEIGHTS = "weights.safetensors"
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


def prefixed_encoder(state: dict[str, torch.Tensor], backbone_prefix: str) -> EncoderWeights:
    """An encoder stored as ``<backbone_prefix><timm name>`` + ``head.<head name>``.

    Keys under neither prefix stay with the backbone, where the strict load reports them.
    """
    backbone, rest = names.split_by_prefix(state, backbone_prefix)
    head, rest, _ = split_head(rest, ("head.",))
    origin = {k: backbone_prefix + k for k in backbone} | {k: "head." + k for k in head or {}}
    backbone.update(rest)
    return EncoderWeights(backbone, head, origin=origin)


# --- msn-checkpoint: our training checkpoints (read only) -----------------------------------------
def run_checkpoint(folder: Path) -> Path | None:
    """``latest.pt`` of a run folder, or of its ``checkpoints/`` folder; None when absent."""
    latest = checkpoint.find_latest(folder)
    if latest is None and (folder / checkpoint.LATEST).is_file():
        latest = folder / checkpoint.LATEST
    return latest


def sniff_checkpoint(probe: Probe) -> bool:
    """A run folder with ``latest.pt``, or a file with ``format: msn-checkpoint``."""
    if probe.is_folder:
        return run_checkpoint(probe.location) is not None
    contents = probe.contents()
    return isinstance(contents, dict) and contents.get("format") == CHECKPOINT


def parse_network_state(state: dict[str, torch.Tensor]) -> EncoderWeights:
    """An :class:`msn.models.MSNNetwork` state dict: ``backbone.vit.*`` + ``head.*``."""
    return prefixed_encoder(state, "backbone.vit.")


def read_checkpoint(probe: Probe) -> WeightsSource:
    """Both encoders, the prototypes and the config of a training checkpoint."""
    if probe.is_folder:
        file = run_checkpoint(probe.location)
        path, contents = os.fspath(file), torch_load(os.fspath(file), probe.trust_pickle)
    else:
        path, contents = probe.path, probe.contents()
    cfg = from_dict(contents.get("config"), where=f"{path}: config")
    encoders = {role: parse_wrapped(contents[key], parse_network_state)
                for role, key in (("online", "encoder"), ("target", "target_encoder"))}
    views = cfg.data.views
    return WeightsSource(path, CHECKPOINT, encoders, prototypes=as_tensor(contents["prototypes"]), config=cfg,
                         image_size=views.rand_size, mean=tuple(views.mean), std=tuple(views.std),
                         info={"step": contents.get("step"), "epoch": contents.get("epoch")})


def read_network_state(state: dict[str, Any], path: str) -> WeightsSource:
    """A bare ``MSNNetwork`` state dict (one encoder of unrecorded role)."""
    return WeightsSource(path, CHECKPOINT, {"single": parse_wrapped(state, parse_network_state)})


# --- msn: our export folder -----------------------------------------------------------------------
def sniff_export(probe: Probe) -> bool:
    """A folder holding ``weights.safetensors``."""
    return probe.is_folder and (probe.location / NATIVE_WEIGHTS).is_file()


def parse_export_state(state: dict[str, torch.Tensor]) -> EncoderWeights:
    """``weights.safetensors`` names: ``backbone.*`` + ``head.*`` (``prototypes`` set aside)."""
    return prefixed_encoder({k: v for k, v in state.items() if k != names.NATIVE_PROTOTYPES}, "backbone.")


def read_export_state(state: dict[str, Any], path: str) -> WeightsSource:
    """Tensors in ``weights.safetensors`` names, from the folder or a bare file."""
    prototypes = unwrap_state(state)[0].get(names.NATIVE_PROTOTYPES)
    return WeightsSource(path, EXPORT, {"single": parse_wrapped(state, parse_export_state)}, prototypes=prototypes)


def read_export(probe: Probe) -> WeightsSource:
    """An ``msn`` export folder."""
    state = read_tensors(os.fspath(probe.location / NATIVE_WEIGHTS))
    return apply_export_info(read_export_state(state, probe.path), probe.location)


def native_state(loaded: LoadedBackbone) -> dict[str, torch.Tensor]:
    """``weights.safetensors`` contents: ``backbone.*``, ``head.*``, ``prototypes``."""
    for part, value in (("projection head", loaded.network), ("prototypes", loaded.prototypes)):
        if value is None:
            raise ValueError(f"{loaded.source.get('path')}: has no {part}; --format msn needs backbone + head + prototypes")
    state = names.NATIVE_BACKBONE.export(loaded.backbone.vit.state_dict())
    state.update(names.NATIVE_HEAD.export(loaded.network.head.state_dict()))
    state[names.NATIVE_PROTOTYPES] = loaded.prototypes
    return state


def export_native(loaded: LoadedBackbone, output: str | os.PathLike) -> list[Path]:
    """Write the ``msn`` folder; returns the written files."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    weights = save_safetensors(native_state(loaded), output / NATIVE_WEIGHTS)
    info = write_json(export_info(loaded, EXPORT, [NATIVE_WEIGHTS, EXPORT_INFO], output), output / EXPORT_INFO)
    return [weights, info]


# --- msn_export.json, in every export folder ------------------------------------------------------
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


def export_info(loaded: LoadedBackbone, fmt: str, files: list[str], output: str | os.PathLike,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``msn_export.json`` document of an export in the folder ``output`` (docs/formats.md Sec. 2).

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
    src = info.get("source") or {}
    source.info.update({"export": info.get("format"), "exported_from": src.get("file") or src.get("path"),
                        "step": src.get("step"), "epoch": src.get("epoch")})
    return source
