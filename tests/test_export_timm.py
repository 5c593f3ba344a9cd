"""timm export/import: timm folders and bare timm state dicts (msn.export.timm_format, loading)."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import msn.checkpoint
import msn.config
import msn.models
from msn.export import WeightsMismatchError, export, load_backbone
from msn.export.timm_format import VIT_MSN, register_vit_msn, timm_architecture
from weights_helpers import random_images, small_config, EXACT, float64, randomize, write_run

DEPTH, WIDTH, HEADS, PATCH, SIZE = 2, 64, 4, 8, 32


def tiny_cfg():
    return small_config(SIZE, WIDTH, DEPTH, HEADS, PATCH)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("run"), tiny_cfg(), SIZE, (3, 4), step=5, epoch=1)


@pytest.fixture(scope="module")
def timm_dir(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "timm"
    export(run["path"], out, "timm")
    return out


def images(batch: int = 3, seed: int = 0) -> torch.Tensor:
    return random_images(batch, SIZE, seed)


def our_features(network, x):
    with torch.no_grad():
        tokens, last = network.backbone.forward_blocks(x, collect_last=1)
    return tokens, last[-1][:, 0]


def test_timm_export_strict_load_gives_the_same_features(run, timm_dir):
    config = json.loads((timm_dir / "config.json").read_text())
    assert config["num_classes"] == 0
    args = config["model_args"]
    assert (args["patch_size"], args["img_size"], args["embed_dim"], args["depth"], args["num_heads"]) == (PATCH, SIZE, WIDTH, DEPTH, HEADS)
    assert config["pretrained_cfg"]["input_size"] == [3, SIZE, SIZE]
    assert config["pretrained_cfg"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert config["pretrained_cfg"]["std"] == pytest.approx([0.229, 0.224, 0.225])
    with safe_open(timm_dir / "model.safetensors", "pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    model = timm.create_model(config["architecture"], pretrained=False, num_classes=0, **args)
    model.load_state_dict(load_file(timm_dir / "model.safetensors"), strict=True)
    model.double().eval()
    x = images().double()
    tokens, pre_ln_cls = our_features(float64(run["target"]), x)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), tokens, **EXACT)
        intermediates = model.forward_intermediates(x, indices=1, norm=False, output_fmt="NLC",
                                                    return_prefix_tokens=True, intermediates_only=True)
        torch.testing.assert_close(intermediates[0][1][:, 0], pre_ln_cls, **EXACT)
        torch.testing.assert_close(model(x), tokens[:, 0], **EXACT)  # num_classes=0: post-LN CLS
    info = json.loads((timm_dir / "msn_export.json").read_text())
    assert info["format"] == "timm" and info["source"]["step"] == 5 and info["feature"]["recommended"] == "pre-LN CLS"
    # timm registers no 64-wide 2-block ViT: the generic entry, not a borrowed name
    assert config["architecture"] == VIT_MSN and info["timm_architecture_registered_by"] == "msn"


def test_timm_local_dir_route(run, timm_dir):
    model = timm.create_model(f"local-dir:{timm_dir}", pretrained=True).double().eval()
    assert model.num_classes == 0
    x = images().double()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), our_features(float64(run["target"]), x)[0], **EXACT)


def test_timm_round_trip_and_online(run, timm_dir, tmp_path):
    loaded = load_backbone(timm_dir)
    for key, tensor in run["target"].backbone.vit.state_dict().items():
        assert torch.equal(loaded.backbone.vit.state_dict()[key], tensor), key
    export(run["path"], tmp_path / "online", "timm", which="online")
    x = images()
    torch.testing.assert_close(our_features(load_backbone(tmp_path / "online", "online"), x)[0],
                               our_features(run["online"], x)[0], atol=0, rtol=0)


def test_bare_timm_state_dicts_with_and_without_module_prefix(run, tmp_path):
    state = run["target"].backbone.vit.state_dict()
    torch.save({"module." + key: value for key, value in state.items()}, tmp_path / "ddp.pth")
    save_file({key: value.contiguous() for key, value in state.items()}, tmp_path / "plain.safetensors")
    x = images()
    expected = our_features(run["target"], x)[0]
    for name in ("ddp.pth", "plain.safetensors"):
        with pytest.raises(ValueError, match="num_heads"):  # width 64 is not in the table
            load_backbone(tmp_path / name)
        loaded = load_backbone(tmp_path / name, num_heads=HEADS)
        assert loaded.source["architecture"] == {"embed_dim": WIDTH, "depth": DEPTH, "num_heads": HEADS, "mlp_ratio": 4.0,
                                                 "patch_size": PATCH, "image_size": SIZE}
        assert loaded.network is None and loaded.prototypes is None
        assert torch.equal(our_features(loaded, x)[0], expected)


def test_timm_model_with_classifier_and_heads_table(tmp_path):
    """A real timm ViT-Ti-width model (num_classes=10): heads from the width table, classifier ignored."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=SIZE, patch_size=PATCH, depth=1).eval()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "timm_ckpt.pth.tar")
    loaded = load_backbone(tmp_path / "timm_ckpt.pth.tar")
    assert loaded.source["architecture"]["num_heads"] == 3  # 192 -> 3
    assert loaded.source["ignored"] == ["head.bias", "head.weight"]
    x = images().double()
    with torch.no_grad():
        torch.testing.assert_close(float64(loaded.backbone).forward_blocks(x)[0], model.double().forward_features(x), **EXACT)


def test_unexpected_timm_tensor_is_reported(run, tmp_path):
    state = dict(run["target"].backbone.vit.state_dict())
    state["fc_norm.weight"] = torch.ones(WIDTH)
    torch.save(state, tmp_path / "extra.pth")
    with pytest.raises(WeightsMismatchError, match=r"unexpected key fc_norm.weight with shape \(64,\)"):
        load_backbone(tmp_path / "extra.pth", num_heads=HEADS)


def export_bare_backbone(backbone, tmp_path, name, num_heads=None):
    """Export a bare backbone state dict as a timm folder; returns (folder, config, msn_export.json)."""
    torch.save(backbone.vit.state_dict(), tmp_path / f"{name}.pth")
    export(tmp_path / f"{name}.pth", tmp_path / name, "timm", num_heads=num_heads)
    return (tmp_path / name, json.loads((tmp_path / name / "config.json").read_text()),
            json.loads((tmp_path / name / "msn_export.json").read_text()))


def assert_both_timm_routes_match(folder, config, backbone):
    """create_model(architecture, **model_args) + strict load, and local-dir:, give our features."""
    by_name = timm.create_model(config["architecture"], pretrained=False, num_classes=0, **config["model_args"])
    by_name.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
    by_folder = timm.create_model(f"local-dir:{folder}", pretrained=True)
    x = images().double()
    with torch.no_grad():
        expected = float64(backbone).forward_blocks(x)[0]
        for model in (by_name, by_folder):
            assert model.num_classes == 0
            torch.testing.assert_close(model.double().eval().forward_features(x), expected, **EXACT)


def test_a_published_shape_gets_timms_own_name(tmp_path):
    """A real ViT-Ti/16 (all 12 blocks; 32 px keeps it fast) is timm's vit_tiny_patch16_224."""
    backbone = randomize(msn.models.build_vit("vit_tiny", 16, SIZE), 3).eval()
    folder, config, info = export_bare_backbone(backbone, tmp_path, "vit_tiny")
    assert config["architecture"] == "vit_tiny_patch16_224" and info["timm_architecture_registered_by"] == "timm"
    assert_both_timm_routes_match(folder, config, backbone)


def test_an_unregistered_shape_is_named_vit_msn(tmp_path):
    """Our 128-wide vit_mini has no timm name: vit_msn, registered by importing msn.export."""
    backbone = randomize(msn.models.build_vit("vit_mini", PATCH, SIZE), 4).eval()
    folder, config, info = export_bare_backbone(backbone, tmp_path, "vit_mini", num_heads=4)
    assert config["architecture"] == VIT_MSN and info["timm_architecture_registered_by"] == "msn"
    assert_both_timm_routes_match(folder, config, backbone)


def test_timm_names_are_true_or_vit_msn():
    def arch(width, depth, heads, patch, size=224, mlp_ratio=4.0):
        return {"embed_dim": width, "depth": depth, "num_heads": heads, "mlp_ratio": mlp_ratio, "patch_size": patch, "image_size": size}

    assert timm_architecture(arch(384, 12, 6, 16)) == ("vit_small_patch16_224", "timm")
    assert timm_architecture(arch(384, 12, 6, 16, size=96)) == ("vit_small_patch16_224", "timm")
    assert timm_architecture(arch(768, 12, 12, 8)) == ("vit_base_patch8_224", "timm")
    assert timm_architecture(arch(768, 12, 12, 4)) == (VIT_MSN, "msn")  # ViT-B/4: timm registers none
    assert timm_architecture(arch(1024, 24, 16, 7)) == (VIT_MSN, "msn")  # ViT-L/7
    assert timm_architecture(arch(384, 12, 6, 16, mlp_ratio=2.0)) == (VIT_MSN, "msn")
    assert timm_architecture(arch(384, 2, 6, 16)) == (VIT_MSN, "msn")  # a ViT-S width, not ViT-S


def test_vit_msn_registration_is_idempotent(recwarn):
    register_vit_msn()
    register_vit_msn()
    assert timm.is_model(VIT_MSN) and timm.list_models(VIT_MSN) == [VIT_MSN]
    assert not [w for w in recwarn if "Overwriting" in str(w.message)]

