"""The one table of weight formats (docs/formats.md Sec. 7).

:data:`FORMATS` names every format this package reads or writes; the loader
(:func:`msn.export.load_backbone`, ``init_from``), the evaluator and ``msn-export --format``
all dispatch through it, and their messages list its names. Its order is the order in which
a path is tried: our checkpoints, our export, the reference's files, transformers, timm.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from msn.export import hf, native, onnx_format, reference, timm_format
from msn.export.common import WeightsSource, is_tensor_dict, read_json, read_tensors, torch_load, unwrap_state

_UNREAD = object()


class Probe:
    """A path whose format is being identified; each part of it is read at most once."""

    def __init__(self, path: str | os.PathLike, trust_pickle: bool = False):
        self.path = os.fspath(path)
        self.trust_pickle = trust_pickle  #: unpickle in full (docs/security.md); off: tensors and plain data only
        self.location = Path(self.path)
        self.is_folder = self.location.is_dir()
        self._json: dict[str, dict[str, Any] | None] = {}
        self._contents: Any = _UNREAD
        self._keys: set[str] | None = None

    def json(self, name: str) -> dict[str, Any] | None:
        """The JSON file ``name`` of the folder, or None when there is none."""
        if name not in self._json:
            file = self.location / name
            self._json[name] = read_json(file) if self.is_folder and file.is_file() else None
        return self._json[name]

    def contents(self) -> Any:
        """The file's object: a tensor dict (``.safetensors``) or what ``torch.load`` returns."""
        if self._contents is _UNREAD:
            self._contents = (read_tensors(self.path) if self.path.endswith(".safetensors")
                              else torch_load(self.path, self.trust_pickle))
        return self._contents

    def tensors(self) -> dict[str, Any] | None:
        """The file as one flat tensor dict (a ``state_dict`` / ``model`` wrapper removed), or None."""
        contents = self.contents()
        if not isinstance(contents, dict):
            return None
        for wrapper in ("state_dict", "model"):
            if is_tensor_dict(contents.get(wrapper)):
                return contents[wrapper]
        return contents if is_tensor_dict(contents) else None

    def has_tensor(self, *keys: str) -> bool:
        """Whether :meth:`tensors`, ``module.`` / ``_orig_mod.`` prefixes removed, holds one of ``keys``."""
        if self._keys is None:
            state = self.tensors()
            self._keys = set(unwrap_state(state)[0]) if state is not None else set()
        return any(key in self._keys for key in keys)


@dataclass(frozen=True)
class Format:
    """One weight format.

    Attributes:
        name: its name everywhere (``--format``, ``source["format"]``, ``msn_export.json``).
        summary: what it is, in a few words (CLI help, messages).
        looks_for: what :attr:`sniff` recognises (messages).
        sniff: whether a :class:`Probe` is a folder / structured file of this format.
        read: the :class:`~msn.export.common.WeightsSource` of a path that :attr:`sniff` accepted.
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


FORMATS: dict[str, Format] = {fmt.name: fmt for fmt in (
    Format(native.CHECKPOINT, "our training checkpoint", "checkpoints/latest.pt, latest.pt or format: msn-checkpoint",
           native.sniff_checkpoint, native.read_checkpoint, ("backbone.vit.cls_token",), native.read_network_state),
    Format(native.EXPORT, "backbone + projection head + prototypes", "weights.safetensors",
           native.sniff_export, native.read_export, ("backbone.cls_token",), native.read_export_state,
           write=native.export_native),
    Format(reference.CHECKPOINT, "the MSN reference's training checkpoint", "encoder + target_encoder",
           reference.sniff_checkpoint, reference.read),
    Format(reference.RELEASE, "the MSN reference's released weights", "target_encoder",
           reference.sniff_release, reference.read),
    Format(hf.HF, "transformers ViTMSN", "config.json with model_type vit_msn", hf.sniff, hf.read,
           hf.STATE_MARKERS, hf.read_state, write=hf.export_hf, takes_labels=True),
    Format(timm_format.TIMM, "timm VisionTransformer", "config.json with architecture", timm_format.sniff,
           timm_format.read, timm_format.STATE_MARKERS, timm_format.read_state, write=timm_format.export_timm),
    Format(onnx_format.ONNX, "ONNX graph of the CLS feature (inference only)", "model.onnx", onnx_format.sniff,
           onnx_format.read, write=onnx_format.export_onnx),
)}


def writable() -> tuple[str, ...]:
    """Names of the formats ``msn-export --format`` writes."""
    return tuple(name for name, fmt in FORMATS.items() if fmt.write is not None)
