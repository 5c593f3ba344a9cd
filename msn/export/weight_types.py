"""The types every weight format shares; the bottom of :mod:`msn.export` (imports none of its modules).

A format module reads a :class:`Probe` into a :class:`WeightsSource` (tensors in our names, no
model built yet) and writes from a :class:`LoadedBackbone`; :class:`Format` is one row of the
table in :mod:`msn.export.formats`. Our names are timm's ``VisionTransformer`` names for the
backbone and :class:`msn.models.ProjectionHead` names for the head (docs/formats.md Secs. 6-7).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from msn.config import MSNConfig
from msn.models import MSNNetwork, MSNViT

Tensor = torch.Tensor

#: The normalisation a source that records none is taken to use.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


class Probe(Protocol):
    """A path whose format is being identified, each part of it read at most once.

    What a format's sniffer and reader may ask of a path; :class:`msn.export.path_probe.PathProbe`
    answers it from the disk.
    """

    path: str
    trust_pickle: bool  #: unpickle in full (docs/security.md); off: tensors and plain data only
    location: Path
    is_folder: bool

    def json(self, name: str) -> dict[str, Any] | None:
        """The JSON file ``name`` of the folder, or None when there is none."""

    def contents(self) -> Any:
        """The file's object: a tensor dict (``.safetensors``) or what ``torch.load`` returns."""

    def tensors(self) -> dict[str, Any] | None:
        """The file as one flat tensor dict (a ``state_dict`` / ``model`` wrapper removed), or None."""

    def has_tensor(self, *keys: str) -> bool:
        """Whether :meth:`tensors`, ``module.`` / ``_orig_mod.`` prefixes removed, holds one of ``keys``."""


@dataclass(frozen=True)
class Format:
    """One weight format: a row of :data:`msn.export.formats.FORMATS`.

    Attributes:
        name: its name everywhere (``--format``, ``source["format"]``, ``msn_export.json``).
        summary: what it is, in a few words (CLI help, messages).
        looks_for: what :attr:`sniff` recognises (messages).
        sniff: whether a :class:`Probe` is a folder / structured file of this format.
        read: the :class:`WeightsSource` of a path that :attr:`sniff` accepted.
        state_markers: keys that mark a bare state dict in this format's names (after
            ``module.`` / ``_orig_mod.`` are removed); empty when it has no such form.
        read_state: ``(state dict, path) -> WeightsSource`` for such a bare state dict.
        write: ``(loaded, output folder[, labels]) -> written files``; None when not written here.
        takes_labels: whether :attr:`write` accepts class labels.
    """

    name: str
    summary: str
    looks_for: str
    sniff: Callable[[Probe], bool]
    read: Callable[[Probe], WeightsSource]
    state_markers: tuple[str, ...] = ()
    read_state: Callable[[dict[str, Any], str], WeightsSource] | None = None
    write: Callable[..., list[Path]] | None = None
    takes_labels: bool = False

