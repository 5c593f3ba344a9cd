"""What every weight format shares: results, strict loading, file helpers and architecture.

A format module (:mod:`~msn.export.native`, :mod:`~msn.export.hf`,
:mod:`~msn.export.timm_format`, :mod:`~msn.export.reference`) reads a path into a
:class:`WeightsSource` (tensors in our names, no model built yet) and writes from a
:class:`LoadedBackbone`. Our names are timm's ``VisionTransformer`` names for the backbone
and :class:`msn.models.ProjectionHead` names for the head (docs/formats.md Sec. 6).
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

from msn import files
from msn.architectures import ARCHITECTURES, HEADS_BY_WIDTH, arch_for_width, out_of_range
from msn.config import MSNConfig
from msn.export import names
from msn.models import MSNNetwork, MSNViT, build_vit
from msn.safe_load import load_torch_file

Tensor = torch.Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Written into every export folder (docs/formats.md Sec. 2).
EXPORT_INFO = "msn_export.json"
#: Module wrappers whose prefix is removed when every key of a state dict carries it.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class WeightsMismatchError(ValueError):
    """Weights do not fit the model: one line naming the first offending key and the shapes."""


@dataclass
class LoadedBackbone:
    """A backbone ready for feature extraction, with what is known about it.

    Attributes:
        backbone: the encoder (eval mode, on CPU).
        image_size: native input side in pixels.
        mean, std: normalisation the backbone was trained with.
        network: backbone + projection head when the source has the head.
        prototypes: [K, D] prototypes when the source has them.
        config: the training config when the source is one of our checkpoints (or an export of one).
        source: a short description (path, format, which encoder, step, ...).
    """

    backbone: MSNViT
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    network: MSNNetwork | None = None
    prototypes: Tensor | None = None
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
            (``backbone.vit.*`` + ``head.*``; no ``head.*`` when the source has no head), or
            None when the source holds one encoder (the target then starts as a copy).
        source: description of the file (path, format, step, which encoders).
        origin: our key -> the name in the file, for error messages.
    """

    backbone_state: dict[str, Tensor]
    head_state: dict[str, Tensor] | None = None
    prototypes: Tensor | None = None
    target_state: dict[str, Tensor] | None = None
    source: dict[str, Any] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict, repr=False)


@dataclass
class EncoderWeights:
    """One encoder read from a file, in our names; ``origin`` maps our keys to the file's."""

    backbone: dict[str, Tensor]
    head: dict[str, Tensor] | None = None
    classifier: dict[str, Tensor] | None = None
    origin: dict[str, str] = field(default_factory=dict)
    variant: str = ""  #: a detail of the naming (transformers 5.x in-memory names, ...)


@dataclass
class WeightsSource:
    """Everything read from a path before any model is built."""

    path: str
    format: str  #: a key of :data:`msn.export.formats.FORMATS`
    encoders: dict[str, EncoderWeights]  #: keys: "online", "target", or "single" (role unknown)
    prototypes: Tensor | None = None
    config: MSNConfig | None = None
    arch: dict[str, Any] = field(default_factory=dict)  #: architecture fields the source states
    image_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    info: dict[str, Any] = field(default_factory=dict)  #: step, epoch, export info, ...


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
            if key.endswith("num_batches_tracked"):  # a BN step counter that older files omit
                state[key] = torch.zeros_like(tensor)
                continue
            raise WeightsMismatchError(f"{prefix}missing key {key} (the model expects shape {_shape(tensor)})")
        if _shape(state[key]) != _shape(tensor):
            name = origin.get(key, key)
            ours = f" ({key})" if name != key else ""
            raise WeightsMismatchError(f"{prefix}{name}: shape {_shape(state[key])} in the file, {_shape(tensor)} in the model{ours}")
    unexpected = [key for key in state if key not in expected]
    if unexpected:
        more = f" (+{len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise WeightsMismatchError(f"{prefix}unexpected key {origin.get(unexpected[0], unexpected[0])} with shape "
                                   f"{_shape(state[unexpected[0]])}{more}: the model has no such tensor")
    module.load_state_dict(state, strict=True)


# --- files ----------------------------------------------------------------------------------------
def torch_load(path: str, trust_pickle: bool = False) -> Any:
    """``torch.load`` on CPU of tensors and plain containers; anything else is refused with one
    line unless ``trust_pickle`` (:func:`msn.safe_load.load_torch_file`, docs/security.md)."""
    return load_torch_file(path, trust_pickle=trust_pickle)


def read_tensors(path: str, trust_pickle: bool = False) -> dict[str, Tensor]:
    """A flat tensor dict from a ``.safetensors`` file or a torch file."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as error:  # noqa: BLE001 - a damaged header or a truncated file
            raise ValueError(f"{path}: not a readable safetensors file ({type(error).__name__}: {error})") from None
    obj = torch_load(path, trust_pickle)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return obj


def shard_in_folder(folder: Path, name: Any, index: str) -> Path:
    """The file an index's ``weight_map`` names, which must be a plain file name in ``folder``.

    Raises:
        ValueError: one line naming the index and the entry (absolute, ``..``, a sub-folder,
            or a link that leaves the folder).
    """
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or os.sep in name:
        raise ValueError(f"{folder / index}: weight_map names {name!r}; an index may only name files inside its folder")
    path = folder / name
    if os.path.realpath(path) != os.path.join(os.path.realpath(folder), name):
        raise ValueError(f"{folder / index}: weight_map entry {name!r} is a link that leaves the folder; refused")
    return path


def read_model_weights(folder: Path, trust_pickle: bool = False) -> dict[str, Tensor]:
    """The tensors of a transformers / timm folder (one file, or the files a sharded index
    names, each a plain name inside ``folder``)."""
    for name in ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth"):
        if (folder / name).is_file():
            return read_tensors(os.fspath(folder / name), trust_pickle)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            weight_map = read_json(folder / index).get("weight_map", {})
            if not isinstance(weight_map, dict):
                raise ValueError(f"{folder / index}: weight_map is not a mapping of tensor names to files")
            shards = [shard_in_folder(folder, name, index) for name in sorted(set(map(str, weight_map.values())))]
            state: dict[str, Tensor] = {}
            for shard in shards:
                state.update(read_tensors(os.fspath(shard), trust_pickle))
            return state
    raise FileNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin in this folder")


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON document; one-line ``ValueError`` when unreadable."""
    try:
        with open(path) as stream:
            return json.load(stream)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable JSON file ({error})") from None


def write_json(document: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``document`` indented (tensors as lists); returns the path."""
    def tensor_as_list(value: Any) -> Any:
        if isinstance(value, Tensor):
            return value.tolist()
        raise TypeError(f"cannot write {type(value).__name__} to JSON")

    text = json.dumps(document, indent=2, sort_keys=False, default=tensor_as_list) + "\n"
    return files.write_text(path, text)


def save_safetensors(state: dict[str, Tensor], path: str | os.PathLike) -> Path:
    """Write tensors as contiguous CPU copies with metadata ``{"format": "pt"}``."""
    from safetensors.torch import save_file

    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in state.items()}
    return files.write_with(path, lambda name: save_file(tensors, name, metadata={"format": "pt"}))


def is_tensor_dict(obj: Any) -> bool:
    """A non-empty dict whose values are all tensors."""
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def as_tensor(value: Any) -> Tensor:
    """A detached tensor (numpy arrays and lists converted)."""
    return value.detach() if isinstance(value, Tensor) else torch.as_tensor(value)


def first_keys(state: dict[str, Any], count: int = 4) -> str:
    """The first ``count`` keys, for error messages."""
    return ", ".join(list(state)[:count])


# --- state dicts ----------------------------------------------------------------------------------
def unwrap_state(state: dict[str, Any]) -> tuple[dict[str, Tensor], str]:
    """(tensors with the DDP / ``torch.compile`` prefixes removed, the removed prefixes)."""
    state = {key: as_tensor(value) for key, value in state.items()}
    wrapper = ""
    for prefix in WRAPPER_PREFIXES:
        stripped = names.strip_common_prefix(state, prefix)
        if stripped is not state:
            wrapper, state = wrapper + prefix, stripped
    return state, wrapper


def parse_wrapped(state: dict[str, Any], parse) -> EncoderWeights:
    """``parse(unwrapped state)``, its ``origin`` naming tensors as the file does (with the prefixes)."""
    unwrapped, wrapper = unwrap_state(state)
    encoder = parse(unwrapped)
    if wrapper:
        encoder.origin = {k: " + ".join(wrapper + part for part in v.split(" + ")) for k, v in encoder.origin.items()}
        for key in encoder.backbone:
            encoder.origin.setdefault(key, wrapper + key)
    return encoder


def split_head(state: dict[str, Tensor], prefixes: tuple[str, ...]) -> tuple[dict[str, Tensor] | None, dict[str, Tensor], str]:
    """(projection head ``fc1.*`` ... under the first matching prefix or None, the rest, that prefix)."""
    for prefix in prefixes:
        head, rest = names.split_by_prefix(state, prefix)
        if head and any(key.startswith("fc1.") for key in head):
            return head, rest, prefix
    return None, state, ""


# --- architecture ---------------------------------------------------------------------------------
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
        raise WeightsMismatchError(f"{where}patch_embed.proj.weight: shape {_shape(patch)} is not a square patch convolution")
    blocks = {int(key.split(".")[1]) for key in backbone_state if key.startswith("blocks.") and key.split(".")[1].isdigit()}
    fc1 = backbone_state.get("blocks.0.mlp.fc1.weight")
    slots = int(backbone_state["pos_embed"].shape[1]) - 1
    side = math.isqrt(slots)
    if side * side != slots:
        raise WeightsMismatchError(f"{where}pos_embed: shape {_shape(backbone_state['pos_embed'])} is not 1 + a square number of patches")
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
