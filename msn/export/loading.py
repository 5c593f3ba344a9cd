"""One loader for every backbone source (used by train.py, eval_lowshot.py and msn-export).

Reads, from a file or a folder:

* our training checkpoints (``checkpoints/latest.pt`` or a run directory holding one);
* our exports: ``--format msn`` / ``hf`` / ``timm`` folders (they carry ``msn_export.json``);
* the MSN reference's files: released ``.pth.tar`` (``target_encoder`` with ``module.`` +
  timm names and ``module.fc.*`` head, ``prototypes``) and full training checkpoints
  (``encoder``, ``target_encoder``, ``prototypes``, ``opt``, ``epoch``, ...);
* transformers ViTMSN folders or weight files: the classic on-disk names, the 5.x in-memory
  names, and ``vit.``-prefixed ``ViTMSNForImageClassification`` checkpoints;
* timm state dicts (``.safetensors`` / ``.pth`` / ``.bin``, with or without ``module.``),
  alone or in a timm folder with its ``config.json``.

Architecture: taken from the source's config (ours, transformers ``config.json``, timm
``config.json`` ``model_args``) when there is one; otherwise inferred from the tensor shapes:
width = ``cls_token`` size, depth = number of ``blocks.i``, patch = ``patch_embed.proj`` kernel,
image size = sqrt(position slots - 1) x patch, MLP ratio = ``fc1`` rows / width, and the number
of heads from :data:`HEADS_BY_WIDTH` (192->3, 384->6, 768->12, 1024->16); other widths need
``num_heads=`` (it does not change any tensor shape, so it cannot be inferred).

Every tensor is loaded strictly: a missing, unexpected or mis-shaped tensor raises
:class:`WeightsMismatchError`, one line naming the first offending key (as the file names it)
and both shapes.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from msn import checkpoint
from msn.architectures import HEADS_BY_WIDTH, arch_for_width
from msn.config import MSNConfig, from_dict
from msn.export import names
from msn.models import MSNNetwork, MSNViT, ProjectionHead, build_network, build_vit

Tensor = torch.Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


EXPORT_INFO = "msn_export.json"
NATIVE_WEIGHTS = "weights.safetensors"


class WeightsMismatchError(ValueError):
    """Weights do not fit the model: one line naming the first offending key and the shapes."""


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------
@dataclass
class LoadedBackbone:
    """A backbone ready for feature extraction, with what is known about it.

    Attributes:
        backbone: the encoder (eval mode, on CPU).
        image_size: native input side in pixels.
        mean, std: normalisation the backbone was trained with.
        network: backbone + projection head when the source has the head.
        prototypes: [K, D] prototypes when the source has them.
        config: the training config when the source is one of our checkpoints (or one of
            our exports of a training checkpoint).
        source: a short description (path, format, which encoder, step, ...).
    """

    backbone: MSNViT
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    network: MSNNetwork | None = None
    prototypes: torch.Tensor | None = None
    config: MSNConfig | None = None
    source: dict[str, Any] = field(default_factory=dict)


@dataclass
class InitWeights:
    """Weights for ``init_from=PATH`` (a fresh run started from existing weights).

    Attributes:
        backbone_state: encoder weights in timm names (``MSNViT.vit`` state dict).
        head_state: projection head (``fc1, bn1, fc2, bn2, fc3``; BN running stats) or None.
        prototypes: [K, D] un-normalised prototypes or None.
        target_state: the source's separate target encoder as an ``MSNNetwork`` state dict
            (``backbone.vit.*`` + ``head.*``; ``head.*`` absent when the source has no head),
            or None when the source holds a single encoder (then the target starts as a copy
            of the online network, like any fresh run).
        source: description of the file (path, format, step, which encoders).
    """

    backbone_state: dict[str, Tensor]
    head_state: dict[str, Tensor] | None = None
    prototypes: Tensor | None = None
    target_state: dict[str, Tensor] | None = None
    source: dict[str, Any] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict, repr=False)


@dataclass
class _Encoder:
    """One encoder read from a source, in our names; ``origin`` maps our keys to the file's."""

    backbone: dict[str, Tensor]
    head: dict[str, Tensor] | None = None
    classifier: dict[str, Tensor] | None = None
    origin: dict[str, str] = field(default_factory=dict)
    scheme: str = ""


@dataclass
class _Source:
    """Everything read from a path before any model is built."""

    path: str
    format: str
    encoders: dict[str, _Encoder]  # keys: "online", "target", or "single" (role unknown)
    prototypes: Tensor | None = None
    config: MSNConfig | None = None
    arch: dict[str, Any] = field(default_factory=dict)  # known architecture fields
    image_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    info: dict[str, Any] = field(default_factory=dict)  # step, epoch, export info, ...


# ------------------------------------------------------------------------------------------------
# Strict loading with one-line errors
# ------------------------------------------------------------------------------------------------
def _shape(tensor: Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def load_strict(module: nn.Module, state: dict[str, Tensor], origin: dict[str, str] | None = None, what: str = "") -> None:
    """``module.load_state_dict(state, strict=True)`` with ONE clear line on failure.

    Args:
        module: the receiving module.
        state: tensors in the module's names.
        origin: our key -> the name in the file, used in messages (defaults to our key).
        what: prefix of the message (the file path, and which part is being loaded).

    Raises:
        WeightsMismatchError: ``<what>: <key>: shape (..) in the file, (..) in the model`` for
            the first mismatch, or the first missing / unexpected key.
    """
    origin = origin or {}
    prefix = f"{what}: " if what else ""
    expected = module.state_dict()
    state = dict(state)
    for key, tensor in expected.items():
        if key not in state:
            if key.endswith("num_batches_tracked"):
                # a BN step counter (used only with momentum=None); older files omit it
                state[key] = torch.zeros_like(tensor)
                continue
            raise WeightsMismatchError(f"{prefix}missing key {key} (the model expects shape {_shape(tensor)})")
        if _shape(state[key]) != _shape(tensor):
            name = origin.get(key, key)
            ours = f" ({key})" if name != key else ""
            raise WeightsMismatchError(
                f"{prefix}{name}: shape {_shape(state[key])} in the file, {_shape(tensor)} in the model{ours}"
            )
    unexpected = [key for key in state if key not in expected]
    if unexpected:
        more = f" (+{len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise WeightsMismatchError(
            f"{prefix}unexpected key {origin.get(unexpected[0], unexpected[0])} with shape "
            f"{_shape(state[unexpected[0]])}{more}: the model has no such tensor"
        )
    module.load_state_dict(state, strict=True)


# ------------------------------------------------------------------------------------------------
# Reading files
# ------------------------------------------------------------------------------------------------
def _torch_load(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - our checkpoints hold numpy RNG states: allow full unpickling
        pass
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001
        raise ValueError(f"{path}: not a readable weights file ({type(error).__name__}: {error})") from None


def _read_tensors(path: str) -> dict[str, Tensor]:
    """A flat tensor dict from a ``.safetensors`` file or a torch pickle."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return obj


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as stream:
            return json.load(stream)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable JSON file ({error})") from None


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def _as_tensor(value: Any) -> Tensor:
    return value.detach() if isinstance(value, Tensor) else torch.as_tensor(value)


def _first_keys(state: dict[str, Any], count: int = 4) -> str:
    return ", ".join(list(state)[:count])


def _split_head(state: dict[str, Tensor], prefixes: tuple[str, ...]) -> tuple[dict[str, Tensor] | None, dict[str, Tensor], str]:
    """Pull a projection head (``fc1.*`` ...) out of ``state`` from the first matching prefix."""
    for prefix in prefixes:
        head, rest = names.split_by_prefix(state, prefix)
        if head and any(key.startswith("fc1.") for key in head):
            return head, rest, prefix
    return None, state, ""


def _parse_state_dict(state: dict[str, Any], path: str) -> _Encoder:
    """Recognise the naming scheme of one encoder's state dict and convert it to ours."""
    state = {k: _as_tensor(v) for k, v in state.items()}
    wrapper = ""
    for prefix in ("module.", "_orig_mod."):
        stripped = names.strip_common_prefix(state, prefix)
        if stripped is not state:
            wrapper += prefix
            state = stripped
    encoder = _parse_unwrapped(state, path)
    if wrapper:  # name tensors in messages as the file does
        encoder.origin = {k: " + ".join(wrapper + part for part in v.split(" + ")) for k, v in encoder.origin.items()}
        for key in encoder.backbone:
            encoder.origin.setdefault(key, wrapper + key)
    return encoder


def _parse_unwrapped(state: dict[str, Tensor], path: str) -> _Encoder:
    """:func:`_parse_state_dict` after wrapper prefixes (``module.``) are removed."""
    if "backbone.vit.cls_token" in state:  # msn.models.MSNNetwork
        backbone, rest = names.split_by_prefix(state, "backbone.vit.")
        head, rest, _ = _split_head(rest, ("head.",))
        origin = {k: "backbone.vit." + k for k in backbone} | {k: "head." + k for k in head or {}}
        backbone.update(rest)  # anything else is reported as unexpected by the strict load
        return _Encoder(backbone, head, origin=origin, scheme="msn-network")

    if "backbone.cls_token" in state:  # our --format msn file
        backbone, rest = names.split_by_prefix(state, "backbone.")
        rest.pop(names.NATIVE_PROTOTYPES, None)
        head, rest, _ = _split_head(rest, ("head.",))
        origin = {k: "backbone." + k for k in backbone} | {k: "head." + k for k in head or {}}
        backbone.update(rest)
        return _Encoder(backbone, head, origin=origin, scheme="msn-export")

    if "embeddings.cls_token" in state or "vit.embeddings.cls_token" in state:  # transformers
        prefixed = "vit.embeddings.cls_token" in state
        classifier = {k: state.pop(k) for k in names.HF_CLASSIFIER if k in state} or None
        hf_state, rest = names.split_by_prefix(state, names.HF_BASE_PREFIX) if prefixed else (state, {})
        backbone, origin, leftover = names.HF_VIT_MSN.import_(hf_state)
        scheme = "transformers"
        if leftover:
            more, more_origin, leftover = names.HF_VIT_MSN_V5_MEMORY.import_(leftover)
            if more:
                classic = any(name.startswith("encoder.layer.") for name in origin.values())
                scheme = "transformers (mixed names)" if classic else "transformers (5.x in-memory names)"
            backbone.update(more)
            origin.update(more_origin)
        pre = names.HF_BASE_PREFIX if prefixed else ""
        origin = {k: " + ".join(pre + part for part in v.split(" + ")) for k, v in origin.items()}
        for key, tensor in {**leftover, **rest}.items():  # reported by the strict load
            backbone[key] = tensor
            origin[key] = (pre + key) if key in leftover else key
        return _Encoder(backbone, None, classifier, origin, scheme=scheme)

    if "cls_token" in state:  # timm names (reference encoders after `module.` is stripped)
        head, rest, head_prefix = _split_head(state, ("fc.", "head."))
        classifier = None
        if head is None and "head.weight" in rest:  # a timm classifier (num_classes > 0)
            classifier = {k: rest.pop(k) for k in ("head.weight", "head.bias") if k in rest}
        origin = {k: k for k in rest} | {k: head_prefix + k for k in head or {}}
        return _Encoder(rest, head, classifier, origin, scheme="timm")

    raise ValueError(
        f"{path}: no ViT backbone found (looked for cls_token, module.cls_token, embeddings.cls_token, "
        f"vit.embeddings.cls_token, backbone.vit.cls_token); first keys: {_first_keys(state)}"
    )


def _source_from_object(obj: Any, path: str) -> _Source:
    """Interpret an unpickled object (training checkpoint, reference file, state dict)."""
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict of weights, got {type(obj).__name__}")
    if obj.get("format") == checkpoint.FORMAT:
        cfg = from_dict(obj["config"])
        encoders = {
            "online": _parse_state_dict(obj["encoder"], path),
            "target": _parse_state_dict(obj["target_encoder"], path),
        }
        views = cfg.data.views
        return _Source(
            path, checkpoint.FORMAT, encoders, prototypes=_as_tensor(obj["prototypes"]), config=cfg,
            image_size=views.rand_size, mean=tuple(views.mean), std=tuple(views.std),
            info={"step": obj.get("step"), "epoch": obj.get("epoch")},
        )
    if "target_encoder" in obj or "encoder" in obj:  # the MSN reference
        encoders = {}
        if isinstance(obj.get("encoder"), dict):
            encoders["online"] = _parse_state_dict(obj["encoder"], path)
        if isinstance(obj.get("target_encoder"), dict):
            encoders["target"] = _parse_state_dict(obj["target_encoder"], path)
        prototypes = obj.get("prototypes")
        fmt = "msn-reference-checkpoint" if "online" in encoders else "msn-reference-release"
        info = {k: obj[k] for k in ("epoch", "loss", "batch_size", "world_size", "lr") if k in obj and not isinstance(obj[k], Tensor)}
        return _Source(path, fmt, encoders, prototypes=None if prototypes is None else _as_tensor(prototypes), info=info)
    for wrapper in ("state_dict", "model"):  # common {"state_dict": ...} / {"model": ...} wrappers
        if _is_tensor_dict(obj.get(wrapper)):
            obj = obj[wrapper]
            break
    if not _is_tensor_dict(obj):
        raise ValueError(f"{path}: not a recognised weights file; top-level keys: {_first_keys(obj)}")
    prototypes = obj.get(names.NATIVE_PROTOTYPES) if "backbone.cls_token" in obj else None
    encoder = _parse_state_dict(obj, path)
    return _Source(path, f"state-dict ({encoder.scheme})", {"single": encoder}, prototypes=prototypes)


def _hf_weights(folder: Path) -> dict[str, Tensor]:
    """The tensors of a transformers / timm folder (single file or sharded index)."""
    for name in ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth"):
        if (folder / name).is_file():
            return _read_tensors(os.fspath(folder / name))
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            weight_map = _read_json(folder / index).get("weight_map", {})
            state: dict[str, Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                state.update(_read_tensors(os.fspath(folder / shard)))
            return state
    raise FileNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin in this folder")


def _hf_source(folder: Path, config: dict[str, Any]) -> _Source:
    path = os.fspath(folder)
    checks = (("hidden_act", "gelu"), ("qkv_bias", True), ("num_channels", 3))
    for key, wanted in checks:
        if key in config and config[key] != wanted:
            raise ValueError(f"{path}/config.json: {key}={config[key]!r} is not supported (MSN ViTs use {wanted!r})")
    eps = config.get("layer_norm_eps", 1e-6)
    if not math.isclose(eps, 1e-6, rel_tol=1e-3):
        raise ValueError(f"{path}/config.json: layer_norm_eps={eps} is not supported (MSN ViTs use 1e-06)")
    hidden = config.get("hidden_size", 768)
    arch = {
        "embed_dim": hidden,
        "depth": config.get("num_hidden_layers", 12),
        "num_heads": config.get("num_attention_heads", 12),
        "mlp_ratio": config.get("intermediate_size", 4 * hidden) / hidden,
        "patch_size": _side(config.get("patch_size", 16)),
    }
    image_size = _side(config.get("image_size", 224))
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    processor = folder / "preprocessor_config.json"
    if processor.is_file():
        values = _read_json(processor)
        mean = tuple(values.get("image_mean", mean))
        std = tuple(values.get("image_std", std))
    encoder = _parse_state_dict(_hf_weights(folder), path)
    return _Source(path, encoder.scheme, {"single": encoder}, arch=arch,
                   image_size=image_size, mean=mean, std=std)


def _timm_source(folder: Path, config: dict[str, Any]) -> _Source:
    path = os.fspath(folder)
    model_args = dict(config.get("model_args") or {})
    pretrained_cfg = config.get("pretrained_cfg") or {}
    arch = {k: model_args[k] for k in ("embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size") if k in model_args}
    if "patch_size" in arch:
        arch["patch_size"] = _side(arch["patch_size"])
    image_size = _side(model_args["img_size"]) if "img_size" in model_args else None
    if image_size is None and pretrained_cfg.get("input_size"):
        image_size = int(pretrained_cfg["input_size"][-1])
    encoder = _parse_state_dict(_hf_weights(folder), path)
    return _Source(path, "timm", {"single": encoder}, arch=arch, image_size=image_size,
                   mean=tuple(pretrained_cfg.get("mean", IMAGENET_MEAN)), std=tuple(pretrained_cfg.get("std", IMAGENET_STD)),
                   info={"timm_architecture": config.get("architecture")})


def _native_source(folder: Path) -> _Source:
    path = os.fspath(folder)
    state = _read_tensors(os.fspath(folder / NATIVE_WEIGHTS))
    prototypes = state.get(names.NATIVE_PROTOTYPES)
    encoder = _parse_state_dict(state, path)
    return _Source(path, "msn-export", {"single": encoder}, prototypes=prototypes)


def _side(value: Any) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"non-square sizes are not supported: {value}")
        value = value[0]
    return int(value)


def _apply_export_info(source: _Source, folder: Path) -> _Source:
    """Fill what our ``msn_export.json`` records (config, encoder role, step, preprocessing)."""
    info_path = folder / EXPORT_INFO
    if not info_path.is_file():
        return source
    info = _read_json(info_path)
    if info.get("which") in ("target", "online") and "single" in source.encoders:
        source.encoders = {info["which"]: source.encoders.pop("single")}
    if info.get("config"):
        source.config = from_dict(info["config"])
    prep = info.get("preprocessing") or {}
    source.mean = tuple(prep.get("mean", source.mean or IMAGENET_MEAN))
    source.std = tuple(prep.get("std", source.std or IMAGENET_STD))
    source.image_size = source.image_size or prep.get("image_size")
    arch = info.get("architecture") or {}
    for key in ("embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size"):
        if key in arch:
            source.arch.setdefault(key, arch[key])
    src = info.get("source") or {}
    source.info.update({"export": info.get("format"), "exported_from": src.get("path"),
                        "step": src.get("step"), "epoch": src.get("epoch")})
    return source


def read_source(path: str | os.PathLike) -> _Source:
    """Read any supported path into our names (no model is built yet)."""
    path = os.fspath(path)
    folder = Path(path)
    if folder.is_dir():
        latest = checkpoint.find_latest(folder)
        if latest is None and (folder / checkpoint.LATEST).is_file():  # the checkpoints/ folder itself
            latest = folder / checkpoint.LATEST
        if latest is not None:
            return read_source(latest)
        if (folder / NATIVE_WEIGHTS).is_file():
            return _apply_export_info(_native_source(folder), folder)
        if (folder / "config.json").is_file():
            config = _read_json(folder / "config.json")
            if config.get("model_type") in ("vit_msn", "vit"):
                return _apply_export_info(_hf_source(folder, config), folder)
            if "architecture" in config:
                return _apply_export_info(_timm_source(folder, config), folder)
            raise ValueError(
                f"{path}/config.json: neither a transformers ViTMSN config (model_type vit_msn) "
                f"nor a timm config (architecture); model_type={config.get('model_type')!r}"
            )
        raise ValueError(
            f"{path}: no checkpoints/latest.pt, {NATIVE_WEIGHTS} or config.json in this folder; "
            "pass a weights file or a run / export folder"
        )
    if not folder.is_file():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.endswith(".safetensors"):
        obj: Any = _read_tensors(path)
    else:
        obj = _torch_load(path)
    return _source_from_object(obj, path)


# ------------------------------------------------------------------------------------------------
# Architecture
# ------------------------------------------------------------------------------------------------
def infer_architecture(backbone_state: dict[str, Tensor], num_heads: int | None = None, known: dict[str, Any] | None = None,
                       image_size: int | None = None, origin: str = "") -> dict[str, Any]:
    """Architecture of a timm-named backbone state dict; ``known`` values (from a config) win.

    Returns:
        dict with ``embed_dim, depth, num_heads, mlp_ratio, patch_size, image_size``.
    """
    known = dict(known or {})
    where = f"{origin}: " if origin else ""
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if key not in backbone_state:
            raise WeightsMismatchError(f"{where}missing key {key}: not a ViT backbone with a CLS token")
    embed_dim = int(backbone_state["cls_token"].shape[-1])
    patch = backbone_state["patch_embed.proj.weight"]
    if patch.ndim != 4 or patch.shape[-1] != patch.shape[-2]:
        raise WeightsMismatchError(f"{where}patch_embed.proj.weight: shape {_shape(patch)} is not a square patch convolution")
    patch_size = int(patch.shape[-1])
    blocks = {int(key.split(".")[1]) for key in backbone_state if key.startswith("blocks.") and key.split(".")[1].isdigit()}
    depth = max(blocks) + 1 if blocks else 0
    fc1 = backbone_state.get("blocks.0.mlp.fc1.weight")
    mlp_ratio = float(fc1.shape[0]) / embed_dim if fc1 is not None else 4.0
    slots = int(backbone_state["pos_embed"].shape[1]) - 1
    side = math.isqrt(slots)
    if side * side != slots:
        raise WeightsMismatchError(f"{where}pos_embed: shape {_shape(backbone_state['pos_embed'])} is not 1 + a square number of patches")
    inferred_size = side * patch_size
    heads = num_heads or known.get("num_heads") or HEADS_BY_WIDTH.get(embed_dim)
    if heads is None:
        raise ValueError(
            f"{where}cannot infer the number of attention heads for width {embed_dim} "
            f"(known widths: {HEADS_BY_WIDTH}); pass num_heads= (CLI: --num-heads)"
        )
    arch = {
        "embed_dim": int(known.get("embed_dim", embed_dim)),
        "depth": int(known.get("depth", depth)),
        "num_heads": int(heads),
        "mlp_ratio": float(known.get("mlp_ratio", mlp_ratio)),
        "patch_size": int(known.get("patch_size", patch_size)),
        "image_size": int(image_size or inferred_size),
    }
    if arch["embed_dim"] % arch["num_heads"]:
        raise ValueError(f"{where}width {arch['embed_dim']} is not divisible by num_heads={arch['num_heads']}")
    return arch


def build_backbone(arch: dict[str, Any], attention: str = "sdpa") -> MSNViT:
    """An :class:`MSNViT` with the given architecture (see :func:`infer_architecture`)."""
    return build_vit(
        arch_for_width(arch["embed_dim"]),
        arch["patch_size"],
        arch["image_size"],
        embed_dim=arch["embed_dim"],
        depth=arch["depth"],
        num_heads=arch["num_heads"],
        mlp_ratio=arch["mlp_ratio"],
        attention=attention,
    )


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


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------
def _pick(source: _Source, which: str) -> tuple[_Encoder, str]:
    if which not in ("target", "online"):
        raise ValueError(f"which: must be target or online, got {which!r}")
    if which in source.encoders:
        return source.encoders[which], which
    if "single" in source.encoders:
        return source.encoders["single"], "single"
    have = ", ".join(sorted(source.encoders))
    raise ValueError(f"{source.path}: holds no {which} encoder (it has: {have}); choose which={have.split(', ')[0]}")


def network_from_checkpoint(state: dict[str, Any], which: str = "target") -> tuple[MSNNetwork, MSNConfig]:
    """Rebuild the encoder (+head) of one of our training checkpoints; ``which`` is target or online."""
    if which not in ("target", "online"):
        raise ValueError(f"which: must be target or online, got {which!r}")
    cfg = from_dict(state["config"])
    network = build_network(cfg.model, cfg.head, cfg.data.views.rand_size)
    load_strict(network, state["target_encoder" if which == "target" else "encoder"], what=f"{which} encoder")
    return network.eval(), cfg


def load_backbone(path: str | os.PathLike, which: str = "target", *, num_heads: int | None = None) -> LoadedBackbone:
    """Load a backbone (and its head and prototypes when present) from any supported source.

    Args:
        path: a training checkpoint or run folder, an export folder (msn / hf / timm), a
            transformers ViTMSN folder, a reference ``.pth.tar`` or a timm / transformers
            weights file (see the module docstring).
        which: ``target`` (EMA encoder, the reference's choice for evaluation) or ``online``.
            Sources that hold a single encoder of unrecorded role return it for either value.
        num_heads: attention heads when the source has no config and its width is not in
            :data:`HEADS_BY_WIDTH`.

    Raises:
        WeightsMismatchError: one line naming the first key that does not fit, and the shapes.
    """
    source = read_source(path)
    encoder, role = _pick(source, which)
    label = f"{source.path} ({role} encoder)" if role != "single" else source.path
    cfg = source.config
    if cfg is not None and source.format == checkpoint.FORMAT:
        network = build_network(cfg.model, cfg.head, cfg.data.views.rand_size)
        load_strict(network.backbone.vit, encoder.backbone, encoder.origin, label)
        if encoder.head is None:
            raise WeightsMismatchError(f"{label}: the checkpoint has no projection head")
        load_strict(network.head, encoder.head, encoder.origin, f"{label} head")
        backbone = network.backbone
    else:
        arch = infer_architecture(encoder.backbone, num_heads, source.arch, source.image_size, source.path)
        backbone = build_backbone(arch)
        load_strict(backbone.vit, encoder.backbone, encoder.origin, label)
        network = None
        if encoder.head is not None:
            dims = head_dims(encoder.head)
            head = ProjectionHead(backbone.embed_dim, dims["hidden_dim"], dims["output_dim"], dims["use_bn"])
            load_strict(head, encoder.head, encoder.origin, f"{label} head")
            network = MSNNetwork(backbone, head)
    if network is not None:
        network.eval()
    backbone.eval()
    described = describe_backbone(backbone)
    info = {
        "path": source.path,
        "format": source.format,
        "which": role if role != "single" else which,
        "step": source.info.get("step"),
        "architecture": described,
    }
    info.update({k: v for k, v in source.info.items() if k not in info and v is not None})
    if encoder.classifier:
        info["ignored"] = sorted(encoder.classifier)
    return LoadedBackbone(
        backbone=backbone,
        image_size=described["image_size"],
        mean=tuple(source.mean or IMAGENET_MEAN),
        std=tuple(source.std or IMAGENET_STD),
        network=network,
        prototypes=source.prototypes,
        config=cfg,
        source=info,
    )


def load_init_weights(path: str | os.PathLike) -> InitWeights:
    """Weights for ``init_from=PATH``: any source :func:`load_backbone` reads.

    The online network gets the source's online encoder (``encoder``) when it has one,
    else its only / target encoder; ``target_state`` is set only when the source holds a
    separate target encoder (our training checkpoints, the reference's full checkpoints).
    Nothing is built or checked here: :func:`apply_init` loads strictly into your modules.
    """
    source = read_source(path)
    encoders = source.encoders
    online = encoders.get("online") or encoders.get("single") or encoders.get("target")
    assert online is not None
    target_state = None
    if "online" in encoders and "target" in encoders:
        target = encoders["target"]
        target_state = {"backbone.vit." + k: v for k, v in target.backbone.items()}
        target_state.update({"head." + k: v for k, v in (target.head or {}).items()})
    roles = sorted(encoders)
    return InitWeights(
        backbone_state=dict(online.backbone),
        head_state=None if online.head is None else dict(online.head),
        prototypes=source.prototypes,
        target_state=target_state,
        source={"path": source.path, "format": source.format, "encoders": roles, "step": source.info.get("step")},
        origin=dict(online.origin),
    )


def apply_init(
    network: MSNNetwork,
    target_network: MSNNetwork | None,
    prototypes_module: nn.Module | Tensor | None,
    init: InitWeights,
    *,
    load_head: bool = True,
    load_prototypes: bool = True,
) -> list[str]:
    """Load :class:`InitWeights` strictly into a fresh run's modules.

    Args:
        network: the online :class:`MSNNetwork`.
        target_network: the target network, or None. It receives ``init.target_state`` when
            the source has a separate target, else an exact copy of ``network`` after loading.
        prototypes_module: a :class:`msn.models.Prototypes` (its ``weight`` is overwritten), a
            Parameter/tensor (overwritten in place), or None.
        init: from :func:`load_init_weights`.
        load_head, load_prototypes: set False to keep the fresh head / prototypes (for instance
            when the source's head has other dimensions than the config's). With True, a
            source that lacks them leaves the fresh ones and says so in the returned lines.

    Returns:
        Human-readable lines saying what was loaded (for the run log).

    Raises:
        WeightsMismatchError: one line naming the first key that does not fit, with both shapes.
    """
    where = init.source.get("path", "init_from")
    done: list[str] = []
    load_strict(network.backbone.vit, init.backbone_state, init.origin, where)
    done.append(f"backbone: {len(init.backbone_state)} tensors from {where}")
    if load_head:
        if init.head_state is not None:
            load_strict(network.head, init.head_state, init.origin, f"{where} (projection head)")
            done.append("projection head: loaded")
        else:
            done.append("projection head: not in the source, kept freshly initialised")
    else:
        done.append("projection head: kept freshly initialised (load_head=False)")
    if prototypes_module is not None:
        if not load_prototypes:
            done.append("prototypes: kept freshly initialised (load_prototypes=False)")
        elif init.prototypes is None:
            done.append("prototypes: not in the source, kept freshly initialised")
        else:
            weight = prototypes_module.weight if isinstance(prototypes_module, nn.Module) else prototypes_module
            if _shape(init.prototypes) != _shape(weight):
                raise WeightsMismatchError(
                    f"{where}: prototypes: shape {_shape(init.prototypes)} in the file, {_shape(weight)} in the model"
                )
            with torch.no_grad():
                weight.copy_(init.prototypes)
            done.append(f"prototypes: loaded {_shape(weight)}")
    if target_network is not None:
        if init.target_state is not None and load_head and "head.fc1.weight" in init.target_state:
            load_strict(target_network, init.target_state, what=f"{where} (target encoder)")
            done.append("target: loaded from the source's target encoder")
        elif init.target_state is not None:
            backbone_state = {k[len("backbone.vit."):]: v for k, v in init.target_state.items() if k.startswith("backbone.vit.")}
            load_strict(target_network.backbone.vit, backbone_state, what=f"{where} (target encoder)")
            target_network.head.load_state_dict(network.head.state_dict())
            done.append("target: backbone from the source's target encoder, head copied from the online network")
        else:
            target_network.load_state_dict(network.state_dict())
            done.append("target: copy of the online network")
    return done
