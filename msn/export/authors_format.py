"""The MSN authors' ``.pth.tar`` files (read only; docs/formats.md Sec. 5).

* ``msn-reference-release``: the released weights (``vits16_800ep.pth.tar``, ...): a dict
  with ``target_encoder`` and ``prototypes``;
* ``msn-reference-checkpoint``: a full training checkpoint of the reference code, with
  ``encoder``, ``target_encoder``, ``prototypes``, ``opt``, ``epoch`` and a few scalars.

Encoders are DDP state dicts: ``module.`` + timm names, the projection head under
``module.fc.`` (BN running stats included), so they parse as timm names once ``module.`` is
removed. Nothing here writes these files: our ``msn`` export carries the same tensors.
"""

from __future__ import annotations

from typing import Any

import torch

from msn import checkpoint
from msn.export.state_dicts import as_tensor, parse_wrapped
from msn.export.timm_format import parse_state as parse_timm_state
from msn.export.weight_types import Probe, WeightsSource

#: Format names (keys of :data:`msn.export.formats.FORMATS`).
RELEASE = "msn-reference-release"
CHECKPOINT = "msn-reference-checkpoint"
#: Scalars of a full checkpoint that are kept in the source description.
SCALARS = ("epoch", "loss", "batch_size", "world_size", "lr")


def _authors_dict(probe: Probe) -> dict[str, Any] | None:
    """The file's dict when it has the reference's top-level keys (and is not one of our checkpoints)."""
    if probe.is_folder:
        return None
    contents = probe.contents()
    if not isinstance(contents, dict) or contents.get("format") == checkpoint.FORMAT:
        return None
    return contents if "target_encoder" in contents or "encoder" in contents else None


def sniff_checkpoint(probe: Probe) -> bool:
    """A reference dict holding an online ``encoder``."""
    contents = _authors_dict(probe)
    return contents is not None and isinstance(contents.get("encoder"), dict)


def sniff_release(probe: Probe) -> bool:
    """A reference dict without an online encoder (``target_encoder`` only)."""
    return _authors_dict(probe) is not None and not sniff_checkpoint(probe)


def read(probe: Probe) -> WeightsSource:
    """The encoders (``online`` / ``target``) and prototypes of either reference file."""
    contents = probe.contents()
    encoders = {role: parse_wrapped(contents[key], parse_timm_state)
                for role, key in (("online", "encoder"), ("target", "target_encoder")) if isinstance(contents.get(key), dict)}
    prototypes = contents.get("prototypes")
    info = {key: contents[key] for key in SCALARS if key in contents and not isinstance(contents[key], torch.Tensor)}
    return WeightsSource(probe.path, CHECKPOINT if "online" in encoders else RELEASE, encoders,
                         prototypes=None if prototypes is None else as_tensor(prototypes), info=info)
