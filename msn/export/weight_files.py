"""Reading and writing the files of a weight format: torch and safetensors files, transformers /
timm weight folders (sharded ones included), JSON documents (docs/formats.md, docs/security.md).

Imports no other module of :mod:`msn.export`. Every failure is one line naming the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from msn import files
from msn.safe_load import load_torch_file

Tensor = torch.Tensor


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
    contents = torch_load(path, trust_pickle)
    if not isinstance(contents, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(contents).__name__}")
    return contents


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
