"""What is evaluated, by ``baseline=...`` name (``msn.eval.baselines``)."""

from __future__ import annotations

import math

import pytest
import torch

from msn.config import ConfigError
from msn.eval.baseline_names import BASELINE_NAMES
from msn.eval.baselines import BASELINES, Backbone, Pixels, Random, Supervised
from msn.eval.classifier import normalize_rows
from msn.eval.config import load_eval_config
from msn.eval.subsets import LabelledSubset
from msn.models import build_vit
from test_eval_cli import checkpoint, synthetic  # noqa: F401 - the module fixture is reused

CPU = torch.device("cpu")
ARCHITECTURE = {"image_size": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "embed_dim": 128,
                "depth": 2, "patch_size": 8}
RECORD_KEYS = ["split", "accuracy", "knn_accuracy", "lambda", "lambda_selection", "cv_folds", "cv_scores",
               "train_size", "images_per_class", "classes_without_images", "<detail>", "knn_k_used", "source",
               "file", "seconds"]


def options(tmp_path, **overrides):
    return load_eval_config({"data": synthetic(), "output_dir": str(tmp_path), "progress": False, **overrides})


def test_the_table_holds_exactly_the_names_the_config_accepts(tmp_path):
    assert tuple(BASELINES) == BASELINE_NAMES
    assert BASELINES == {None: Backbone, "pixels": Pixels, "random": Random, "supervised": Supervised}
    assert all(cls.name == name for name, cls in BASELINES.items())
    assert options(tmp_path, baseline="none", backbone=__file__).baseline is None
    with pytest.raises(ConfigError, match="^baseline: must be null, pixels, random or supervised, got 'imagenet'$"):
        options(tmp_path, baseline="imagenet", backbone=__file__)


def test_backbone_and_random_describe_the_checkpoint_and_name_the_cache_entry(checkpoint, tmp_path):  # noqa: F811
    cfg = options(tmp_path, backbone=str(checkpoint), feature="cls_concat", feature_blocks=2)
    encoder, info = Backbone(cfg, CPU).build_encoder()
    assert info["path"] == str(checkpoint) and info["which"] == "target" and "random_seed" not in info
    assert {k: info[k] for k in ARCHITECTURE} == ARCHITECTURE
    assert list(encoder.identity) == ["weights", "which", "feature", "blocks", "name"]
    assert encoder.identity["name"] == encoder.name == "backbone" and encoder.identity["blocks"] == 2
    assert (encoder.kind, encoder.blocks, encoder.image_size, encoder.architecture) == ("cls_concat", 2, 32, None)

    cfg.baseline = "random"
    random, random_info = Random(cfg, CPU).build_encoder()
    assert random_info == {**info, "random_seed": 0} and list(random_info)[-1] == "random_seed"
    assert list(random.identity) == ["weights", "which", "feature", "blocks", "name", "seed"]
    assert random.identity == {**encoder.identity, "name": "random", "seed": 0} and random.name == "random"
    assert not torch.equal(random.model.vit.patch_embed.proj.weight, encoder.model.vit.patch_embed.proj.weight)


def test_too_many_blocks_for_the_backbone_is_a_config_error(checkpoint, tmp_path):  # noqa: F811
    cfg = options(tmp_path, backbone=str(checkpoint), feature="cls_concat", feature_blocks=3)
    with pytest.raises(ConfigError, match=r"^feature_blocks: 3 exceeds the backbone's depth \(2\)$"):
        Backbone(cfg, CPU).build_encoder()


def test_pixels_loads_no_backbone(tmp_path):
    encoder, info = Pixels(options(tmp_path, baseline="pixels", pixels_size=16), CPU).build_encoder()
    assert info == {"path": None, "which": None, "format": None, "image_size": 16}
    assert (encoder.name, encoder.identity, encoder.model, encoder.image_size) == (
        "pixels", {"name": "pixels", "size": 16}, None, 16)


def test_supervised_keeps_the_architecture_and_extracts_images(checkpoint, tmp_path):  # noqa: F811
    encoder, info = Supervised(options(tmp_path, baseline="supervised", backbone=str(checkpoint)), CPU).build_encoder()
    assert info == {"path": str(checkpoint), "which": None, **ARCHITECTURE}
    assert (encoder.name, encoder.identity, encoder.model) == ("pixels", {"name": "pixels", "size": 32}, None)
    assert len(encoder.architecture.vit.blocks) == 2


@pytest.mark.parametrize("baseline,feature,kind,blocks", [
    (None, "cls_concat", "cls_concat", 4), (None, "patch_mean", "patch_mean", None),
    ("random", "cls_concat", "cls_concat", None), ("pixels", "cls_concat", "pixels", None),
    ("supervised", "cls_pre_ln", "supervised (end to end)", None),
])
def test_feature_section_and_recipe(baseline, feature, kind, blocks, tmp_path):
    evaluated = BASELINES[baseline](options(tmp_path, baseline=baseline, feature=feature, backbone=__file__), CPU)
    assert (evaluated.feature_kind(), evaluated.feature_blocks()) == (kind, blocks)
    recipe = evaluated.recipe()
    if baseline == "supervised":
        assert recipe["steps"] == 200 and recipe["model"].startswith("backbone architecture, random init")
    else:
        assert recipe is None


def test_both_kinds_of_record_have_the_same_fields_in_the_same_order(tmp_path):
    generator = torch.Generator().manual_seed(0)
    train_y, test_y = torch.arange(8) % 2, torch.arange(6) % 2
    subset = LabelledSubset("4", 0, list(range(8)), shots=4, source="generated")
    frozen = Backbone(options(tmp_path, backbone=__file__, lambd=0.5, knn_k=3), CPU)
    raw = torch.randn(8, 5, generator=generator) + train_y[:, None] * 3
    train_x = frozen.inputs(raw, None)
    assert torch.equal(train_x, normalize_rows(raw))
    record = frozen.evaluate(subset, None, train_x, train_y, train_x[:6], test_y, 2)
    assert [("<detail>" if k == "solver" else k) for k in record] == RECORD_KEYS
    assert record["lambda"] == 0.5 and record["lambda_selection"] == "fixed" and record["knn_k_used"] == 3
    assert record["images_per_class"] == {"min": 4, "max": 4, "mean": 4.0} and record["classes_without_images"] == 0

    supervised = Supervised(options(tmp_path, baseline="supervised", backbone=__file__, supervised_steps=1,
                                    supervised_min_epochs=0, knn_k=3), CPU)
    architecture = build_vit("vit_mini", patch_size=4, img_size=8, depth=1, embed_dim=16, num_heads=2)
    encoder = type("Images", (), {"image_size": 8, "architecture": architecture})()
    images = supervised.inputs(torch.randn(8, 3 * 8 * 8, generator=generator), encoder)
    assert images.shape == (8, 3, 8, 8)
    record = supervised.evaluate(subset, encoder, images, train_y, images[:6], test_y, 2)
    assert [("<detail>" if k == "supervised" else k) for k in record] == RECORD_KEYS
    assert math.isnan(record["lambda"]) and record["lambda_selection"] == "supervised"
    assert record["supervised"] == {"steps": 1, "seed": 8}
