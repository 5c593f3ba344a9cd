"""Our own files, both directions (docs/formats.md Secs. 1-2).

* ``msn-checkpoint``: a training checkpoint (``checkpoints/latest.pt`` / ``epoch_XXXX.pt``,
  or a run folder holding one). :mod:`msn.checkpoint` writes it; read here.
* ``msn``: the export folder that continues pre-training elsewhere (``init_from=<folder>``)::

      weights.safetensors   backbone.<timm name>            the encoder (``MSNViT.vit`` state dict)
                            head.<fc1|bn1|fc2|bn2|fc3>.*    projection head, BN running stats included
                            prototypes                      [K, D], un-normalised
      msn_export.json       see :mod:`msn.export.export_record`
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from msn import checkpoint
from msn.config import from_dict
from msn.export import key_maps
from msn.export.export_record import EXPORT_INFO, apply_export_info, export_info
from msn.export.state_dicts import as_tensor, parse_wrapped, split_by_prefix, split_head, unwrap_state
from msn.export.weight_files import read_tensors, save_safetensors, torch_load, write_json
from msn.export.weight_types import EncoderWeights, LoadedBackbone, Probe, WeightsSource

#: Format names (keys of :data:`msn.export.formats.FORMATS`).
CHECKPOINT = checkpoint.FORMAT
EXPORT = "msn"
WEIGHTS = "weights.safetensors"


def prefixed_encoder(state: dict[str, torch.Tensor], backbone_prefix: str) -> EncoderWeights:
    """An encoder stored as ``<backbone_prefix><timm name>`` + ``head.<head name>``.

    Keys under neither prefix stay with the backbone, where the strict load reports them.
    """
    backbone, rest = split_by_prefix(state, backbone_prefix)
    head, rest, _ = split_head(rest, ("head.",))
    origin = {key: backbone_prefix + key for key in backbone} | {key: "head." + key for key in head or {}}
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
    return probe.is_folder and (probe.location / WEIGHTS).is_file()


def parse_export_state(state: dict[str, torch.Tensor]) -> EncoderWeights:
    """``weights.safetensors`` names: ``backbone.*`` + ``head.*`` (``prototypes`` set aside)."""
    tensors = {key: value for key, value in state.items() if key != key_maps.MSN_EXPORT_PROTOTYPES}
    return prefixed_encoder(tensors, "backbone.")


def read_export_state(state: dict[str, Any], path: str) -> WeightsSource:
    """Tensors in ``weights.safetensors`` names, from the folder or a bare file."""
    prototypes = unwrap_state(state)[0].get(key_maps.MSN_EXPORT_PROTOTYPES)
    return WeightsSource(path, EXPORT, {"single": parse_wrapped(state, parse_export_state)}, prototypes=prototypes)


def read_export(probe: Probe) -> WeightsSource:
    """An ``msn`` export folder."""
    state = read_tensors(os.fspath(probe.location / WEIGHTS))
    return apply_export_info(read_export_state(state, probe.path), probe.location)


def msn_export_state(loaded: LoadedBackbone) -> dict[str, torch.Tensor]:
    """``weights.safetensors`` contents: ``backbone.*``, ``head.*``, ``prototypes``."""
    for part, value in (("projection head", loaded.network), ("prototypes", loaded.prototypes)):
        if value is None:
            raise ValueError(f"{loaded.source.get('path')}: has no {part}; --format msn needs backbone + head + prototypes")
    state = key_maps.MSN_EXPORT_BACKBONE.export(loaded.backbone.vit.state_dict())
    state.update(key_maps.MSN_EXPORT_HEAD.export(loaded.network.head.state_dict()))
    state[key_maps.MSN_EXPORT_PROTOTYPES] = loaded.prototypes
    return state


def export_msn(loaded: LoadedBackbone, output: str | os.PathLike) -> list[Path]:
    """Write the ``msn`` folder; returns the written files."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    weights = save_safetensors(msn_export_state(loaded), output / WEIGHTS)
    info = write_json(export_info(loaded, EXPORT, [WEIGHTS, EXPORT_INFO], output), output / EXPORT_INFO)
    return [weights, info]
