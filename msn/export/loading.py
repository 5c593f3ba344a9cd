"""One loader for every weight format: evaluation, ``msn-export`` and ``init_from`` use it.

:func:`read_source` finds a path's format in :data:`msn.export.formats.FORMATS` (folders and
structured files by their sniffers, bare state dicts by their key names) and reads it in our
names; :func:`load_backbone` builds the model from that, :func:`load_init_weights` and
:func:`apply_init` start a fresh run from it. Every tensor is loaded strictly: a missing,
unexpected or mis-shaped tensor raises :class:`WeightsMismatchError`, one line naming the
first offending key (as the file names it) and both shapes. docs/formats.md lists the formats,
docs/export.md shows the use.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from msn.export.backbone_architecture import (build_backbone, check_architecture, configured_architecture,
                                              describe_backbone, head_dims, infer_architecture)
from msn.export.formats import FORMATS
from msn.export.msn_format import CHECKPOINT
from msn.export.path_probe import PathProbe
from msn.export.state_dicts import first_keys, load_strict, split_by_prefix
from msn.export.weight_types import (IMAGENET_MEAN, IMAGENET_STD, EncoderWeights, InitWeights, LoadedBackbone,
                                     WeightsMismatchError, WeightsSource)
from msn.models import MSNNetwork, ProjectionHead, build_network

Tensor = torch.Tensor


def read_source(path: str | os.PathLike, trust_pickle: bool = False) -> WeightsSource:
    """Read any supported path into our names (no model is built yet). Torch files are read as
    tensors and plain containers only, unless ``trust_pickle`` (docs/security.md).

    Raises:
        FileNotFoundError: no such path.
        ValueError: a path of no known format; the message lists what each format looks for.
    """
    probe = PathProbe(path, trust_pickle)
    if not probe.is_folder and not probe.location.is_file():
        raise FileNotFoundError(f"{probe.path}: no such file or folder")
    for fmt in FORMATS.values():
        if fmt.sniff(probe):
            return fmt.read(probe)
    if probe.is_folder:
        wanted = "; ".join(f"{fmt.name}: {fmt.looks_for}" for fmt in FORMATS.values())
        raise ValueError(f"{probe.path}: a folder of none of the formats ({wanted}); pass a weights file or a run / export folder")
    state = probe.tensors()
    if state is None:
        contents = probe.contents()
        if not isinstance(contents, dict):
            raise ValueError(f"{probe.path}: expected a dict of weights, got {type(contents).__name__}")
        raise ValueError(f"{probe.path}: not a recognised weights file; top-level keys: {first_keys(contents)}")
    for fmt in FORMATS.values():
        if fmt.read_state is not None and probe.has_tensor(*fmt.state_markers):
            source = fmt.read_state(state, probe.path)
            source.info["variant"] = ", ".join(filter(None, ("state dict", source.info.get("variant"))))
            return source
    markers = ", ".join(f"{marker} ({fmt.name})" for fmt in FORMATS.values() for marker in fmt.state_markers)
    raise ValueError(f"{probe.path}: no ViT backbone found (looked for {markers}, also under module. or _orig_mod.); "
                     f"first keys: {first_keys(state)}")


def _pick(source: WeightsSource, which: str) -> tuple[EncoderWeights, str]:
    """The ``which`` encoder of ``source`` (or its only one) and its role."""
    if which not in ("target", "online"):
        raise ValueError(f"which: must be target or online, got {which!r}")
    if which in source.encoders:
        return source.encoders[which], which
    if "single" in source.encoders:
        return source.encoders["single"], "single"
    have = ", ".join(sorted(source.encoders))
    raise ValueError(f"{source.path}: holds no {which} encoder (it has: {have}); choose which={have.split(', ')[0]}")


def load_backbone(path: str | os.PathLike, which: str = "target", *, num_heads: int | None = None,
                  trust_pickle: bool = False) -> LoadedBackbone:
    """Load a backbone (and its head and prototypes when present) from any format in the table.

    Args:
        path: a training checkpoint or run folder, an export folder (msn / hf / timm), a
            transformers ViTMSN folder, a reference ``.pth.tar`` or a timm / transformers
            weights file (docs/formats.md).
        which: ``target`` (EMA encoder, the reference's choice for evaluation) or ``online``.
            Sources that hold a single encoder of unrecorded role return it for either value.
        num_heads: attention heads when the source has no config and its width is not in
            :data:`msn.architectures.HEADS_BY_WIDTH`.
        trust_pickle: unpickle torch files in full, which can run code they carry; only for a
            file whose source you trust (docs/security.md). Off: tensors and plain data only.

    Raises:
        WeightsMismatchError: one line naming the first key that does not fit, and the shapes.
    """
    source = read_source(path, trust_pickle)
    encoder, role = _pick(source, which)
    label = f"{source.path} ({role} encoder)" if role != "single" else source.path
    cfg = source.config
    if cfg is not None and source.format == CHECKPOINT:
        check_architecture(configured_architecture(cfg), source.path)
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
            check_architecture({**arch, **dims}, source.path)
            head = ProjectionHead(backbone.embed_dim, dims["hidden_dim"], dims["output_dim"], dims["use_bn"])
            load_strict(head, encoder.head, encoder.origin, f"{label} head")
            network = MSNNetwork(backbone, head)
    if network is not None:
        network.eval()
    backbone.eval()
    described = describe_backbone(backbone)
    info = {"path": source.path, "format": source.format, "which": role if role != "single" else which,
            "step": source.info.get("step"), "architecture": described}
    info.update({key: value for key, value in source.info.items() if key not in info and value is not None})
    if encoder.classifier:
        info["ignored"] = sorted(encoder.classifier)
    return LoadedBackbone(backbone=backbone, image_size=described["image_size"], mean=tuple(source.mean or IMAGENET_MEAN),
                          std=tuple(source.std or IMAGENET_STD), network=network, prototypes=source.prototypes,
                          config=cfg, source=info)


def load_init_weights(path: str | os.PathLike, trust_pickle: bool = False) -> InitWeights:
    """Weights for ``init_from=PATH``: any source :func:`load_backbone` reads.

    The online network gets the source's online encoder (``encoder``) when it has one, else
    its only / target encoder; ``target_state`` is set only when the source holds a separate
    target encoder (our training checkpoints, the reference's full checkpoints). Nothing is
    built or checked here: :func:`apply_init` loads strictly into your modules. ``trust_pickle``
    as for :func:`load_backbone`.
    """
    source = read_source(path, trust_pickle)
    encoders = source.encoders
    online = encoders.get("online") or encoders.get("single") or encoders.get("target")
    assert online is not None
    target_state = None
    if "online" in encoders and "target" in encoders:
        target = encoders["target"]
        target_state = {"backbone.vit." + key: value for key, value in target.backbone.items()}
        target_state.update({"head." + key: value for key, value in (target.head or {}).items()})
    return InitWeights(
        backbone_state=dict(online.backbone),
        head_state=None if online.head is None else dict(online.head),
        prototypes=source.prototypes,
        target_state=target_state,
        source={"path": source.path, "format": source.format, "encoders": sorted(encoders), "step": source.info.get("step")},
        origin=dict(online.origin),
    )


def _load_prototypes(prototypes_module: nn.Module | Tensor, init: InitWeights, where: str) -> str:
    """Copy ``init.prototypes`` into the module's ``weight`` (or the tensor itself)."""
    weight = prototypes_module.weight if isinstance(prototypes_module, nn.Module) else prototypes_module
    if tuple(init.prototypes.shape) != tuple(weight.shape):
        raise WeightsMismatchError(f"{where}: prototypes: shape {tuple(init.prototypes.shape)} in the file, "
                                   f"{tuple(weight.shape)} in the model")
    with torch.no_grad():
        weight.copy_(init.prototypes)
    return f"prototypes: loaded {tuple(weight.shape)}"


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
    load_strict(network.backbone.vit, init.backbone_state, init.origin, where)
    done = [f"backbone: {len(init.backbone_state)} tensors from {where}"]
    if not load_head:
        done.append("projection head: kept freshly initialised (load_head=False)")
    elif init.head_state is None:
        done.append("projection head: not in the source, kept freshly initialised")
    else:
        load_strict(network.head, init.head_state, init.origin, f"{where} (projection head)")
        done.append("projection head: loaded")
    if prototypes_module is not None:
        if not load_prototypes:
            done.append("prototypes: kept freshly initialised (load_prototypes=False)")
        elif init.prototypes is None:
            done.append("prototypes: not in the source, kept freshly initialised")
        else:
            done.append(_load_prototypes(prototypes_module, init, where))
    if target_network is not None:
        if init.target_state is not None and load_head and "head.fc1.weight" in init.target_state:
            load_strict(target_network, init.target_state, what=f"{where} (target encoder)")
            done.append("target: loaded from the source's target encoder")
        elif init.target_state is not None:
            backbone_state = split_by_prefix(init.target_state, "backbone.vit.")[0]
            load_strict(target_network.backbone.vit, backbone_state, what=f"{where} (target encoder)")
            target_network.head.load_state_dict(network.head.state_dict())
            done.append("target: backbone from the source's target encoder, head copied from the online network")
        else:
            target_network.load_state_dict(network.state_dict())
            done.append("target: copy of the online network")
    return done
