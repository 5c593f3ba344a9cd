"""Import side of msn.export: reference files, our exports, init_from helpers, CLI."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import msn.checkpoint
import msn.config
import msn.models
from msn.export import (
    InitWeights,
    WeightsMismatchError,
    apply_init,
    export,
    load_backbone,
    load_init_weights,
)
from msn.export.cli import main
from msn.models import Prototypes
from weights_helpers import random_images, randomize as shared_randomize

ROOT = Path(__file__).resolve().parents[1]
# width 192 (ViT-Ti) so that bare files exercise the heads-by-width table (192 -> 3)
DEPTH, WIDTH, HEADS, PATCH, SIZE, HIDDEN, OUT, K = 2, 192, 3, 8, 32, 48, 24, 16


def make_cfg(width: int = WIDTH, heads: int = HEADS):
    return msn.config.load_config({
        "data": {"name": "synthetic", "views": {"rand_size": SIZE, "focal_size": 16}},
        "model": {"arch": "vit_tiny", "depth": DEPTH, "embed_dim": width, "num_heads": heads, "patch_size": PATCH},
        "head": {"hidden_dim": HIDDEN, "output_dim": OUT},
        "loss": {"num_prototypes": K},
    })


def randomize(network: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random values everywhere, BN running stats and counters included."""
    return shared_randomize(network, seed, int_fill=seed + 10).eval()


def fresh_network(cfg=None):
    cfg = cfg or make_cfg()
    return msn.models.build_network(cfg.model, cfg.head, SIZE)


def reference_state(network: msn.models.MSNNetwork) -> dict[str, torch.Tensor]:
    """The reference's key names, written out by hand: module.<timm name>, module.fc.<head name>."""
    state = {"module." + key: value.clone() for key, value in network.backbone.vit.state_dict().items()}
    state.update({"module.fc." + key: value.clone() for key, value in network.head.state_dict().items()})
    return state


def images(batch: int = 3, seed: int = 0) -> torch.Tensor:
    return random_images(batch, SIZE, seed)


def assert_same_state(module: torch.nn.Module, other: torch.nn.Module) -> None:
    theirs = other.state_dict()
    for key, tensor in module.state_dict().items():
        assert torch.equal(tensor, theirs[key]), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A file in the reference's released layout (vits16_800ep.pth.tar style)."""
    network = randomize(fresh_network(), 1)
    prototypes = torch.randn(K, OUT, generator=torch.Generator().manual_seed(9))
    state = reference_state(network)
    assert "module.cls_token" in state and "module.blocks.1.attn.qkv.weight" in state
    assert "module.fc.bn1.running_mean" in state and "module.fc.fc3.bias" in state
    path = tmp_path_factory.mktemp("ref") / "x.pth.tar"
    torch.save({"target_encoder": state, "prototypes": prototypes}, path)
    return {"path": path, "network": network, "prototypes": prototypes}


def test_reference_release_imports_with_head_and_prototypes(reference):
    loaded = load_backbone(reference["path"])
    assert loaded.source["format"] == "msn-reference-release"
    assert loaded.source["architecture"] == {"embed_dim": WIDTH, "depth": DEPTH, "num_heads": HEADS, "mlp_ratio": 4.0,
                                             "patch_size": PATCH, "image_size": SIZE}
    assert loaded.mean == pytest.approx((0.485, 0.456, 0.406)) and loaded.image_size == SIZE
    x = images()
    with torch.no_grad():
        tokens, last = loaded.backbone.forward_blocks(x, collect_last=1)
        ref_tokens, ref_last = reference["network"].backbone.forward_blocks(x, collect_last=1)
        assert torch.equal(tokens, ref_tokens) and torch.equal(last[-1], ref_last[-1])
        assert loaded.network is not None
        assert_same_state(loaded.network, reference["network"])  # head incl. BN running stats
        torch.testing.assert_close(loaded.network(x), reference["network"](x), atol=0, rtol=0)
    assert torch.equal(loaded.prototypes, reference["prototypes"])
    with pytest.raises(ValueError, match="holds no online encoder"):
        load_backbone(reference["path"], "online")


def test_reference_full_training_checkpoint(tmp_path):
    online, target = randomize(fresh_network(), 2), randomize(fresh_network(), 3)
    prototypes = torch.randn(K, OUT)
    state = {"encoder": reference_state(online), "target_encoder": reference_state(target), "prototypes": prototypes,
             "opt": torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))]).state_dict(), "epoch": 12, "loss": 3.2,
             "batch_size": 64, "world_size": 16, "lr": 1e-3, "temperature": 0.1}
    torch.save(state, tmp_path / "msn-ep12.pth.tar")
    x = images()
    for which, network in (("target", target), ("online", online)):
        loaded = load_backbone(tmp_path / "msn-ep12.pth.tar", which)
        assert loaded.source["format"] == "msn-reference-checkpoint" and loaded.source["epoch"] == 12
        with torch.no_grad():
            assert torch.equal(loaded.backbone.forward_blocks(x)[0], network.backbone.forward_blocks(x)[0])
        assert_same_state(loaded.network, network)
    init = load_init_weights(tmp_path / "msn-ep12.pth.tar")
    net, tgt, protos = fresh_network(), fresh_network(), Prototypes(K, OUT)
    lines = apply_init(net, tgt, protos, init)
    assert_same_state(net, online) and assert_same_state(tgt, target)
    assert torch.equal(protos.weight, prototypes)
    assert any("target: loaded" in line for line in lines)


def test_init_from_reference_file(reference):
    init = load_init_weights(reference["path"])
    assert isinstance(init, InitWeights) and init.target_state is None
    assert set(init.backbone_state) == set(fresh_network().backbone.vit.state_dict())
    net, tgt, protos = fresh_network(), fresh_network(), Prototypes(K, OUT)
    lines = apply_init(net, tgt, protos, init)
    assert_same_state(net, reference["network"])
    assert_same_state(tgt, reference["network"])  # target starts as a copy of the online network
    assert torch.equal(protos.weight, reference["prototypes"])
    assert protos.weight.requires_grad
    assert lines[0].startswith("backbone: ") and "target: copy of the online network" in lines


def test_init_from_shape_mismatch_is_one_line(reference):
    init = load_init_weights(reference["path"])
    small = fresh_network(make_cfg(width=96, heads=3))
    with pytest.raises(WeightsMismatchError) as error:
        apply_init(small, None, None, init)
    message = str(error.value)
    assert "\n" not in message
    assert str(reference["path"]) in message and "module.cls_token" in message
    assert "(1, 1, 192)" in message and "(1, 1, 96)" in message
    # prototypes of another size
    with pytest.raises(WeightsMismatchError, match=r"prototypes: shape \(16, 24\) in the file, \(32, 24\) in the model"):
        apply_init(fresh_network(), None, Prototypes(32, OUT), init)
    # head of another size: named by its reference key; load_head=False keeps the fresh head
    other_head = dataclasses.replace(make_cfg(), head=dataclasses.replace(make_cfg().head, hidden_dim=2 * HIDDEN))
    net = msn.models.build_network(other_head.model, other_head.head, SIZE)
    with pytest.raises(WeightsMismatchError, match=r"module\.fc\.fc1\.weight: shape \(48, 192\) in the file, \(96, 192\)"):
        apply_init(net, None, None, init)
    lines = apply_init(net, None, None, init, load_head=False)
    assert_same_state(net.backbone, reference["network"].backbone)
    assert "projection head: kept freshly initialised (load_head=False)" in lines


def test_missing_tensor_is_named(reference, tmp_path):
    state = reference_state(reference["network"])
    del state["module.blocks.1.mlp.fc2.bias"]
    torch.save({"target_encoder": state}, tmp_path / "broken.pth.tar")
    with pytest.raises(WeightsMismatchError, match=r"missing key blocks\.1\.mlp\.fc2\.bias \(the model expects shape \(192,\)\)"):
        load_backbone(tmp_path / "broken.pth.tar")


@pytest.fixture(scope="module")
def our_run(tmp_path_factory):
    cfg = make_cfg()
    online, target = randomize(fresh_network(cfg), 4), randomize(fresh_network(cfg), 5)
    prototypes = torch.randn(K, OUT)
    path = msn.checkpoint.save_training_checkpoint(
        {"config": msn.config.to_dict(cfg), "step": 3, "epoch": 0, "encoder": online.state_dict(),
         "target_encoder": target.state_dict(), "prototypes": prototypes, "optimizer": {}, "rng": {}},
        tmp_path_factory.mktemp("run"),
    )
    return {"path": path, "online": online, "target": target, "prototypes": prototypes, "cfg": cfg}


def test_our_checkpoint_and_run_folder(our_run):
    for source in (our_run["path"], our_run["path"].parent, our_run["path"].parent.parent):
        loaded = load_backbone(source)
        assert loaded.config == our_run["cfg"] and loaded.source["step"] == 3
        assert_same_state(loaded.network, our_run["target"])
    assert_same_state(load_backbone(our_run["path"], "online").network, our_run["online"])
    init = load_init_weights(our_run["path"])
    net, tgt, protos = fresh_network(), fresh_network(), Prototypes(K, OUT)
    apply_init(net, tgt, protos.weight, init)  # a bare Parameter works too
    assert_same_state(net, our_run["online"]) and assert_same_state(tgt, our_run["target"])
    assert torch.equal(protos.weight, our_run["prototypes"])


def test_native_export_continues_pretraining(our_run, tmp_path):
    out = tmp_path / "msn_export"
    export(our_run["path"], out, "msn", which="online")
    state = load_file(out / "weights.safetensors")
    assert "backbone.cls_token" in state and "head.bn1.running_var" in state and torch.equal(state["prototypes"], our_run["prototypes"])
    info = json.loads((out / "msn_export.json").read_text())
    assert info["format"] == "msn" and info["which"] == "online" and info["source"]["step"] == 3
    assert info["config"]["model"]["embed_dim"] == WIDTH and info["feature"]["recommended"] == "pre-LN CLS"
    loaded = load_backbone(out, "online")
    assert_same_state(loaded.network, our_run["online"]) and loaded.config == our_run["cfg"]
    init = load_init_weights(out)
    assert init.target_state is None
    net, tgt, protos = fresh_network(), fresh_network(), Prototypes(K, OUT)
    apply_init(net, tgt, protos, init)
    assert_same_state(net, our_run["online"]) and assert_same_state(tgt, our_run["online"])
    assert torch.equal(protos.weight, our_run["prototypes"])


def test_reference_to_hf_conversion_via_module_cli(reference, tmp_path):
    """python -m msn.export on a reference file; a sourceless export cannot claim our config."""
    out = tmp_path / "conv"
    result = subprocess.run([sys.executable, "-m", "msn.export", str(reference["path"]), "--format", "msn", "--output", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    info = json.loads((out / "msn_export.json").read_text())
    assert info["source"]["format"] == "msn-reference-release" and info["config"] is None
    assert_same_state(load_backbone(out).network, reference["network"])


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "nope.pt"), "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "no such file" in err


def test_unrecognised_file(tmp_path):
    torch.save({"weights": {"foo.weight": torch.zeros(2)}}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="not a recognised weights file"):
        load_backbone(tmp_path / "odd.pt")
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "odd2.pt")
    with pytest.raises(ValueError, match="no ViT backbone found"):
        load_backbone(tmp_path / "odd2.pt")


def test_one_table_names_every_format(our_run, reference, tmp_path):
    """The CLI's --format choices, the readers' source["format"] and the messages all use FORMATS."""
    from msn.export import FORMATS
    from msn.export.cli import build_parser

    writable = tuple(name for name, fmt in FORMATS.items() if fmt.write is not None)
    choices = next(action.choices for action in build_parser()._actions if action.dest == "format")
    assert tuple(choices) == writable and set(writable) == {"hf", "timm", "msn", "onnx"}
    assert load_backbone(our_run["path"]).source["format"] == "msn-checkpoint"
    assert load_backbone(reference["path"]).source["format"] == "msn-reference-release"
    for name in writable:
        export(our_run["path"], tmp_path / name, name)
        if name == "onnx":  # an inference graph: written, recognised, refused in one line
            with pytest.raises(ValueError, match="is not read back"):
                load_backbone(tmp_path / name)
            continue
        loaded = load_backbone(tmp_path / name)
        assert loaded.source["format"] == name and loaded.source["export"] == name
    # a bare state dict is read by the format whose names it uses
    torch.save(our_run["target"].state_dict(), tmp_path / "network.pt")
    torch.save(our_run["target"].backbone.vit.state_dict(), tmp_path / "timm.pt")
    for file, name in (("network.pt", "msn-checkpoint"), ("timm.pt", "timm")):
        source = load_backbone(tmp_path / file).source
        assert (source["format"], source["variant"]) == (name, "state dict")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="a folder of none of the formats") as error:
        load_backbone(tmp_path / "empty")
    assert all(name in str(error.value) for name in FORMATS)
    with pytest.raises(ValueError, match="must be one of msn, hf, timm"):
        export(our_run["path"], tmp_path / "x", "msn-checkpoint")
