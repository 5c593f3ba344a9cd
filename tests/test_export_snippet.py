"""The snippets of docs/export.md ("Fine-tune in transformers", "Frozen features") run as written
(on a tiny export and a tiny image folder)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import msn.checkpoint
import msn.config
import msn.models
from msn.export.cli import main

import transformers  # noqa: E402,F401 - a test dependency: missing means a broken set-up, not a skip

DOC = Path(__file__).resolve().parents[1] / "docs" / "export.md"
SIZE = 32


def snippets() -> dict[str, str]:
    """``<!-- snippet: NAME -->`` followed by a ```python block, exactly as in the file."""
    found = dict(re.findall(r"<!-- snippet: (\w+) -->\n```python\n(.*?)```", DOC.read_text(), re.S))
    assert {"finetune", "features"} <= set(found), f"snippets missing from {DOC}: {sorted(found)}"
    return found


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """exports/hf, exports/timm (from a tiny checkpoint) and data/train (2 classes x 4 images)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("snippet")
    cfg = msn.config.load_config({
        "data": {"name": "synthetic", "views": {"rand_size": SIZE, "focal_size": 16}},
        "model": {"arch": "vit_mini", "depth": 2, "embed_dim": 64, "num_heads": 4, "patch_size": 8},
        "head": {"hidden_dim": 64, "output_dim": 32},
        "loss": {"num_prototypes": 16},
    })
    net = msn.models.build_network(cfg.model, cfg.head, SIZE)
    ckpt = msn.checkpoint.save_training_checkpoint(
        {"config": msn.config.to_dict(cfg), "step": 3, "epoch": 0, "encoder": net.state_dict(),
         "target_encoder": net.state_dict(), "prototypes": torch.randn(16, 32), "optimizer": {}, "rng": {}},
        root / "run",
    )
    for fmt in ("hf", "timm"):
        assert main([str(ckpt), "--format", fmt, "--output", str(root / "exports" / fmt)]) == 0
    generator = torch.Generator().manual_seed(0)
    for label, name in enumerate(("bag", "shoe")):
        folder = root / "data" / "train" / name
        folder.mkdir(parents=True)
        for index in range(4):
            pixels = (torch.rand(40, 50, 3, generator=generator) * 128 + 100 * label).to(torch.uint8)
            Image.fromarray(pixels.numpy()).save(folder / f"{index}.png")
    return root


def run_snippet(name: str, workdir: Path, monkeypatch) -> dict:
    monkeypatch.chdir(workdir)
    namespace: dict = {"__name__": "__snippet__"}
    exec(compile(snippets()[name], f"{DOC}:{name}", "exec"), namespace)  # noqa: S102 - our own docs
    return namespace


def test_finetune_snippet_runs(workdir, monkeypatch, capsys):
    namespace = run_snippet("finetune", workdir, monkeypatch)
    assert namespace["model"].config.id2label == {0: "bag", 1: "shoe"}
    assert torch.isfinite(namespace["loss"]).item()
    assert "epoch 1: loss" in capsys.readouterr().out


def test_features_snippet_runs(workdir, monkeypatch):
    namespace = run_snippet("features", workdir, monkeypatch)
    assert namespace["feature"].shape == (2, 64)
