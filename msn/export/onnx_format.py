"""ONNX (``onnx``): the backbone's CLS feature as an inference graph (docs/formats.md Sec. 8).

``model.onnx`` maps ``pixel_values`` (float32 ``[B, 3, S, S]``, already resized, cropped and
normalised as ``msn_export.json`` says) to ``features`` (``[B, D]``: the CLS token before the
final LayerNorm, the paper's low-shot feature), with a dynamic batch size. Exported with
``torch.onnx.export(..., dynamo=True)`` (needs ``onnx`` and ``onnxscript``); run it with
onnxruntime. Written only: an ONNX graph is not read back into a trainable model.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
import torch
from torch import nn

from msn.export.export_record import EXPORT_INFO, export_info
from msn.export.weight_files import read_json, write_json
from msn.export.weight_types import LoadedBackbone, Probe, WeightsSource
from msn.files import write_with
from msn.models import MSNViT

ONNX = "onnx"
GRAPH = "model.onnx"
OPSET = 18


class CLSFeatures(nn.Module):
    """The exported function: images -> CLS token before the final LayerNorm."""

    def __init__(self, backbone: MSNViT):
        super().__init__()
        self.backbone = backbone

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        _, last = self.backbone.forward_blocks(pixel_values, collect_last=1)
        return last[-1][:, 0]  # the evaluator's ``cls_pre_ln`` (a test checks they agree)


def export_onnx(loaded: LoadedBackbone, output: str | os.PathLike) -> list[Path]:
    """Write ``model.onnx`` and ``msn_export.json`` into ``output``; returns the files."""
    for package in ("onnx", "onnxscript"):
        if importlib.util.find_spec(package) is None:
            raise ValueError(f"--format onnx: needs the {package} package (pip install 'msn[onnx]')")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    model = CLSFeatures(loaded.backbone).eval()
    example = torch.zeros(2, 3, loaded.image_size, loaded.image_size)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        write_with(output / GRAPH, lambda name: torch.onnx.export(
            model, (example,), name, dynamo=True, opset_version=OPSET, input_names=["pixel_values"],
            output_names=["features"], dynamic_shapes={"pixel_values": {0: batch}}, verbose=False))
    files = [output / GRAPH]
    info = export_info(loaded, ONNX, [GRAPH, EXPORT_INFO], output,
                       {"onnx": {"input": "pixel_values", "output": "features", "opset": OPSET,
                                 "feature": "CLS token before the final LayerNorm"}})
    files.append(write_json(info, output / EXPORT_INFO))
    return files


def sniff(probe: Probe) -> bool:
    """A folder holding ``model.onnx``."""
    return probe.is_folder and (probe.location / GRAPH).is_file()


def read(probe: Probe) -> WeightsSource:
    """Refuse, naming the checkpoint to load instead (an inference graph has no weights to train)."""
    info_path = probe.location / EXPORT_INFO
    source = (read_json(info_path).get("source") or {}) if info_path.is_file() else {}
    origin = source.get("file") or source.get("path")
    where = f"; load the checkpoint it came from ({origin})" if origin else ""
    raise ValueError(f"{probe.path}: an ONNX export is for inference and is not read back{where}")
