"""transformers export/import: ViTMSNModel / ViTMSNForImageClassification folders (msn.export.hf)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import msn.checkpoint
import msn.config
import msn.models
from msn.export import WeightsMismatchError, export, load_backbone
from msn.export.cli import main
from weights_helpers import random_images, small_config, EXACT_BUT_FP32_SOFTMAX, float64, write_run

import transformers  # noqa: E402,F401 - a test dependency: missing means a broken set-up, not a skip
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import ViTMSNConfig, ViTMSNForImageClassification, ViTMSNModel  # noqa: E402

DEPTH, WIDTH, HEADS, PATCH, SIZE = 2, 64, 4, 8, 32
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def tiny_cfg():
    return small_config(SIZE, WIDTH, DEPTH, HEADS, PATCH, mean=MEAN, std=STD)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A training checkpoint with distinct online and target encoders."""
    return write_run(tmp_path_factory.mktemp("run"), tiny_cfg(), SIZE, (1, 2), step=3, epoch=0, int_fill=7)


@pytest.fixture(scope="module")
def hf_dir(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "hf"
    assert main([str(run["path"]), "--format", "hf", "--output", str(out)]) == 0
    return out


def images(batch: int = 3, seed: int = 0) -> torch.Tensor:
    return random_images(batch, SIZE, seed)


def classic_names(depth: int, prefix: str = "") -> set[str]:
    """The on-disk names transformers 4.x reads, spelled out from docs/formats.md Sec. 3 (not from msn/export/key_maps.py)."""
    keys = {"embeddings.cls_token", "embeddings.position_embeddings", "embeddings.patch_embeddings.projection.weight",
            "embeddings.patch_embeddings.projection.bias", "layernorm.weight", "layernorm.bias"}
    for i in range(depth):
        for module in ("layernorm_before", "attention.attention.query", "attention.attention.key", "attention.attention.value",
                       "attention.output.dense", "layernorm_after", "intermediate.dense", "output.dense"):
            keys |= {f"encoder.layer.{i}.{module}.weight", f"encoder.layer.{i}.{module}.bias"}
    return {prefix + key for key in keys}


def test_hf_export_matches_our_encoder(run, hf_dir):
    model, info = ViTMSNModel.from_pretrained(hf_dir, attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    model.double().eval()
    x = images().double()
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
        tokens, last = float64(run["target"]).backbone.forward_blocks(x, collect_last=1)
    assert out.last_hidden_state.shape == tokens.shape
    torch.testing.assert_close(out.last_hidden_state, tokens, **EXACT_BUT_FP32_SOFTMAX)
    torch.testing.assert_close(out.hidden_states[-1][:, 0], last[-1][:, 0], **EXACT_BUT_FP32_SOFTMAX)  # pre-LN CLS
    # and the export is the TARGET encoder, not the online one
    with torch.no_grad():
        online_tokens, _ = float64(run["online"]).backbone.forward_blocks(x)
    assert (out.last_hidden_state - online_tokens).abs().max() > 1e-2


def test_hf_files_use_the_names_both_transformers_versions_read(hf_dir, tmp_path):
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["model_type"] == "vit_msn" and config["architectures"] == ["ViTMSNModel"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (WIDTH, DEPTH, HEADS)
    assert (config["intermediate_size"], config["image_size"], config["patch_size"]) == (4 * WIDTH, SIZE, PATCH)
    assert config["layer_norm_eps"] == 1e-6 and config["qkv_bias"] is True and config["hidden_act"] == "gelu"
    with safe_open(hf_dir / "model.safetensors", "pt") as handle:
        assert handle.metadata() == {"format": "pt"}
        keys = set(handle.keys())
    assert keys == classic_names(DEPTH)
    # ... which is also exactly what transformers' own save_pretrained writes for ViTMSNModel
    reference = ViTMSNModel(ViTMSNConfig(**{k: config[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                                      "intermediate_size", "image_size", "patch_size")}))
    reference.save_pretrained(tmp_path / "saved")
    assert set(load_file(tmp_path / "saved" / "model.safetensors")) == keys


def test_which_online_exports_the_online_encoder(run, tmp_path):
    out = tmp_path / "hf-online"
    export(run["path"], out, "hf", which="online")
    model = ViTMSNModel.from_pretrained(out, attn_implementation="eager").double().eval()
    x = images().double()
    with torch.no_grad():
        torch.testing.assert_close(model(x).last_hidden_state, float64(run["online"]).backbone.forward_blocks(x)[0], **EXACT_BUT_FP32_SOFTMAX)
    info = json.loads((out / "msn_export.json").read_text())
    assert info["which"] == "online"
    with pytest.raises(ValueError, match="holds no target encoder"):
        load_backbone(out, "target")


def test_export_info(run, hf_dir):
    info = json.loads((hf_dir / "msn_export.json").read_text())
    assert info["format"] == "hf" and info["which"] == "target"
    # the source by its file name only: an export names no folder of this machine
    assert info["source"]["file"] == "latest.pt" and "path" not in info["source"] and info["source"]["step"] == 3
    assert load_backbone(hf_dir).source["exported_from"] == "latest.pt"
    assert info["model"]["embed_dim"] == WIDTH and info["model"]["depth"] == DEPTH and info["model"]["patch_size"] == PATCH
    assert info["architecture"] == {"embed_dim": WIDTH, "depth": DEPTH, "num_heads": HEADS, "mlp_ratio": 4.0,
                                    "patch_size": PATCH, "image_size": SIZE}
    assert info["feature"]["recommended"] == "pre-LN CLS"
    assert "hidden_states[-1][:, 0]" in info["feature"]["hf"]
    assert info["preprocessing"]["mean"] == pytest.approx(MEAN) and info["preprocessing"]["std"] == pytest.approx(STD)


def test_preprocessor_is_the_training_eval_transform(hf_dir):
    from PIL import Image
    from transformers import AutoImageProcessor

    from msn.data import eval_transform

    prep = json.loads((hf_dir / "preprocessor_config.json").read_text())
    assert prep["image_processor_type"] == "BitImageProcessor"
    assert prep["size"] == {"shortest_edge": round(SIZE * 256 / 224)} and prep["crop_size"] == {"height": SIZE, "width": SIZE}
    assert prep["do_center_crop"] is True and prep["resample"] == 2
    assert prep["image_mean"] == pytest.approx(MEAN) and prep["image_std"] == pytest.approx(STD)
    processor = AutoImageProcessor.from_pretrained(hf_dir)
    generator = torch.Generator().manual_seed(0)
    # resized to 37 px on the short side: long sides 37, 40, 51, 54 and 66 leave margins of
    # 5, 8, 19, 22 and 34 px around the 32 px crop (19: where rounding half to even and
    # flooring disagree); random pixels, so a one-pixel shift cannot hide
    for height, width in ((37, 37), (37, 40), (37, 51), (54, 37), (45, 66), (375, 500)):
        pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=generator)
        ours = eval_transform(SIZE, MEAN, STD)(pixels.permute(2, 0, 1))
        theirs = processor(images=Image.fromarray(pixels.numpy()), return_tensors="pt")["pixel_values"][0]
        assert theirs.shape == ours.shape == (3, SIZE, SIZE)
        # the same pixels: PIL's and torchvision's uint8 bilinear resize agree exactly, the
        # crops start at the same offsets; only float32 rounding of the normalisation differs
        torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=0, msg=f"{height}x{width}")


def test_classification_export_loads_and_runs_in_pipeline(run, tmp_path):
    from PIL import Image

    labels_file = tmp_path / "classes.txt"
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat"]
    labels_file.write_text("\n".join(names) + "\n")
    out = tmp_path / "hf-cls"
    assert main([str(run["path"]), "--format", "hf", "--labels", str(labels_file), "--output", str(out)]) == 0
    state = load_file(out / "model.safetensors")
    assert set(state) == classic_names(DEPTH, "vit.") | {"classifier.weight", "classifier.bias"}
    model, info = ViTMSNForImageClassification.from_pretrained(out, attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.config.id2label == dict(enumerate(names)) and model.config.label2id == {n: i for i, n in enumerate(names)}
    model.double().eval()
    x = images().double()
    with torch.no_grad():
        post_ln_cls = float64(run["target"]).backbone.forward_blocks(x)[0][:, 0]
        expected = post_ln_cls @ state["classifier.weight"].double().T + state["classifier.bias"].double()
        torch.testing.assert_close(model(x).logits, expected, **EXACT_BUT_FP32_SOFTMAX)

    try:
        from msn.data import FashionMNISTDataset

        image = Image.fromarray(FashionMNISTDataset(train=False).images[0].numpy())  # 28x28 grey
    except OSError:  # FileNotFoundError included
        image = Image.fromarray(torch.randint(0, 255, (28, 28), dtype=torch.uint8).numpy())  # dataset absent
    classifier = transformers.pipeline("image-classification", model=str(out))
    predictions = classifier(image, top_k=len(names))
    assert {p["label"] for p in predictions} == set(names)
    assert sum(p["score"] for p in predictions) == pytest.approx(1.0, abs=1e-4)


def test_num_labels_and_errors(run, tmp_path, capsys):
    out = tmp_path / "hf-n"
    assert main([str(run["path"]), "--format", "hf", "--num-labels", "3", "--output", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["id2label"] == {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}
    assert main([str(run["path"]), "--format", "hf", "--output", str(out)]) == 2  # not empty
    assert "is not empty" in capsys.readouterr().err
    assert main([str(run["path"]), "--format", "timm", "--num-labels", "3", "--output", str(tmp_path / "t")]) == 2
    assert "only with --format hf" in capsys.readouterr().err


def test_hf_ours_hf_round_trip_is_exact(run, hf_dir, tmp_path):
    loaded = load_backbone(hf_dir)
    assert loaded.source["which"] == "target" and loaded.image_size == SIZE
    assert loaded.mean == pytest.approx(MEAN) and loaded.std == pytest.approx(STD)
    for key, tensor in run["target"].backbone.vit.state_dict().items():  # HF -> ours: exact
        assert torch.equal(loaded.backbone.vit.state_dict()[key], tensor), key
    export(hf_dir, tmp_path / "again", "hf")  # ours -> HF: exact
    first, second = load_file(hf_dir / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert json.loads((hf_dir / "config.json").read_text()) == json.loads((tmp_path / "again" / "config.json").read_text())


def test_import_transformers_in_memory_names_and_classifier_prefix(run, hf_dir, tmp_path):
    model = ViTMSNModel.from_pretrained(hf_dir).eval()
    memory = tmp_path / "memory"
    memory.mkdir()
    shutil.copy(hf_dir / "config.json", memory / "config.json")  # no preprocessor: ImageNet mean/std
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    assert any(".q_proj." in key for key in state)  # 5.x names
    save_file(state, memory / "model.safetensors", metadata={"format": "pt"})
    x = images()
    with torch.no_grad():
        expected = run["target"].backbone.forward_blocks(x)[0]
        assert torch.equal(load_backbone(memory).backbone.forward_blocks(x)[0], expected)
        # a lone weights file (pytorch_model.bin style) with the vit. prefix of a classifier
        prefixed = {"vit." + key: value for key, value in load_file(hf_dir / "model.safetensors").items()}
        prefixed |= {"classifier.weight": torch.zeros(2, WIDTH), "classifier.bias": torch.zeros(2)}
        torch.save(prefixed, tmp_path / "pytorch_model.bin")
        loaded = load_backbone(tmp_path / "pytorch_model.bin", num_heads=HEADS)
        assert torch.equal(loaded.backbone.forward_blocks(x)[0], expected)
        assert loaded.source["ignored"] == ["classifier.bias", "classifier.weight"]


def test_mismatching_hf_folder_names_key_and_shapes(hf_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(hf_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["image_size"] = 2 * SIZE
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsMismatchError) as error:
        load_backbone(broken)
    message = str(error.value)
    assert "\n" not in message
    assert "embeddings.position_embeddings" in message
    assert f"(1, {1 + (SIZE // PATCH) ** 2}, {WIDTH})" in message and f"(1, {1 + (2 * SIZE // PATCH) ** 2}, {WIDTH})" in message


def test_written_files_respect_the_umask(run, tmp_path):
    """safetensors and mkstemp create files readable by their owner only; exports and
    checkpoints get the mode of any other new file (0o666 less the umask)."""
    previous = os.umask(0o022)
    try:
        out = tmp_path / "hf"
        export(run["path"], out, "hf")
        modes = {path.name: path.stat().st_mode & 0o777 for path in out.iterdir()}
        assert modes and set(modes.values()) == {0o644}, modes
        saved = msn.checkpoint.atomic_save({"x": 1}, tmp_path / "ckpt" / "latest.pt")
        assert saved.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(previous)


def test_export_carries_a_model_card_and_the_transformers_version(run, hf_dir, tmp_path):
    from importlib.metadata import version

    config = json.loads((hf_dir / "config.json").read_text())
    assert config["transformers_version"] == version("transformers")
    card = (hf_dir / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: transformers" in front and "pipeline_tag: image-feature-extraction" in front
    assert "license: " in front and "- msn" in front
    assert f"Width {WIDTH}, {DEPTH} blocks, {HEADS} heads" in card and f"patch {PATCH} px, {SIZE} px inputs" in card
    assert "after 3 optimiser steps" in card and "Data: synthetic" in card and "16 prototypes" in card
    assert "README.md" in json.loads((hf_dir / "msn_export.json").read_text())["files"]
    labelled = tmp_path / "cls"
    export(run["path"], labelled, "hf", labels=["cat", "dog"])
    card = (labelled / "README.md").read_text()
    assert "pipeline_tag: image-classification" in card and "2 classes: cat, dog" in card


def test_model_card_reports_the_lowshot_evaluations_of_these_weights(tmp_path):
    """An evaluation of the checkpoint written into its run folder is found and reported in
    the card (its numbers, to one decimal); a baseline's is not; ``--lowshot FILE`` reports
    one from anywhere; a file that is not a results.json fails with one line."""
    import msn

    made = write_run(tmp_path / "run", tiny_cfg(), SIZE, (1, 2), step=3, epoch=0, int_fill=7)
    run_dir = made["path"].parent.parent
    assert (run_dir / "checkpoints").is_dir()
    common = ["splits=1", "lambd=0.1", "progress=false", "plot=false", "data.synthetic_size=48",
              "data.synthetic_classes=4", f"data.synthetic_image_size={SIZE}", "cache=false"]
    ours = msn.lowshot(made["path"], data="synthetic", shots=[1, 2], overrides=[*common, f"output_dir={run_dir / 'lowshot' / 'a'}"])
    msn.lowshot(made["path"], data="synthetic", shots=[1], overrides=[*common, "baseline=random",
                                                                          f"output_dir={run_dir / 'lowshot' / 'random'}"])
    out = tmp_path / "hf"
    assert main([str(made["path"]), "--format", "hf", "--output", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert card.count("## Low-shot results") == 1 and card.count("| labelled images / class |") == 1
    for k in ("1", "2"):
        entry = ours["shots"][k]
        assert f"| {k} | 1 | {entry['mean']:.1f} +- {entry['std']:.1f} | {entry['knn_mean']:.1f} +- {entry['knn_std']:.1f} |" in card
    assert "synthetic, " in card

    elsewhere = tmp_path / "elsewhere.json"
    shutil.copy(run_dir / "lowshot" / "a" / "results.json", elsewhere)
    shutil.rmtree(run_dir / "lowshot")
    assert main([str(made["path"]), "--format", "hf", "--output", str(tmp_path / "plain")]) == 0
    assert "## Low-shot results" not in (tmp_path / "plain" / "README.md").read_text()
    assert main([str(made["path"]), "--format", "hf", "--output", str(tmp_path / "given"), "--lowshot", str(elsewhere)]) == 0
    assert "## Low-shot results" in (tmp_path / "given" / "README.md").read_text()


def test_lowshot_option_errors_are_one_line(tmp_path, capsys, run):
    not_results = tmp_path / "config.json"
    not_results.write_text('{"schema": "something-else"}')
    assert main([str(run["path"]), "--format", "hf", "--output", str(tmp_path / "a"), "--lowshot", str(not_results)]) == 2
    assert main([str(run["path"]), "--format", "timm", "--output", str(tmp_path / "b"), "--lowshot", str(not_results)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == f"msn-export: error: {not_results}: not a low-shot results.json (schema is not 'msn-lowshot-results')"
    assert lines[1] == "msn-export: error: --lowshot: only with --format hf (its model card reports them)"
