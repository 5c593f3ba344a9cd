"""The one table of weight formats (docs/formats.md Sec. 7).

:data:`FORMATS` names every format this package reads or writes; the loader
(:func:`msn.export.load_backbone`, ``init_from``), the evaluator and ``msn-export --format``
all dispatch through it, and their messages list its names. Its order is the order in which
a path is tried: our checkpoints, our export, the authors' files, transformers, timm. Each
row is a :class:`~msn.export.weight_types.Format` whose functions live in the format's module.
"""

from __future__ import annotations

from msn.export import authors_format, hf, msn_format, onnx_format, timm_format
from msn.export.weight_types import Format

FORMATS: dict[str, Format] = {fmt.name: fmt for fmt in (
    Format(msn_format.CHECKPOINT, "our training checkpoint", "checkpoints/latest.pt, latest.pt or format: msn-checkpoint",
           msn_format.sniff_checkpoint, msn_format.read_checkpoint, ("backbone.vit.cls_token",),
           msn_format.read_network_state),
    Format(msn_format.EXPORT, "backbone + projection head + prototypes", "weights.safetensors",
           msn_format.sniff_export, msn_format.read_export, ("backbone.cls_token",), msn_format.read_export_state,
           write=msn_format.export_msn),
    Format(authors_format.CHECKPOINT, "the MSN reference's training checkpoint", "encoder + target_encoder",
           authors_format.sniff_checkpoint, authors_format.read),
    Format(authors_format.RELEASE, "the MSN reference's released weights", "target_encoder",
           authors_format.sniff_release, authors_format.read),
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
