"""ONNX export (msn.export.onnx_format): the graph computes our CLS feature."""

from __future__ import annotations

import json

import pytest

from msn.export import load_backbone
from msn.export.cli import main as main_export
from weights_helpers import random_images, small_config, write_run

DEPTH, WIDTH, HEADS, PATCH, SIZE = 2, 64, 4, 8, 32


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("run"), small_config(SIZE, WIDTH, DEPTH, HEADS, PATCH), SIZE, (3, 4),
                     step=5, epoch=1)


def images(batch: int, seed: int = 0):
    return random_images(batch, SIZE, seed)


def test_onnx_export_gives_our_cls_features(run, tmp_path):
    """``--format onnx``: onnxruntime on the graph equals our pre-LayerNorm CLS feature to
    1e-5 (float32 both; the graph's kernels differ from torch's, so not bitwise), for a
    batch size other than the one traced."""
    import numpy as np
    import onnxruntime

    from msn.eval.features import backbone_features

    out = tmp_path / "onnx"
    assert main_export([str(run["path"]), "--format", "onnx", "--output", str(out)]) == 0
    info = json.loads((out / "msn_export.json").read_text())
    assert info["format"] == "onnx" and info["onnx"]["output"] == "features"
    session = onnxruntime.InferenceSession(str(out / "model.onnx"))
    x = images(5, seed=3)
    theirs = session.run(None, {"pixel_values": x.numpy()})[0]
    ours = backbone_features(load_backbone(run["path"]).backbone, x).detach().numpy()
    assert theirs.shape == ours.shape == (5, WIDTH)
    assert np.abs(theirs - ours).max() < 1e-5
    with pytest.raises(ValueError, match="an ONNX export is for inference and is not read back; load the checkpoint"):
        load_backbone(out)
