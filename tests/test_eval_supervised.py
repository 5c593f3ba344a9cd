"""The supervised from-scratch baseline (``msn.eval.supervised``, ``baseline=supervised``)."""

from __future__ import annotations

import torch

from msn.eval.config import load_eval_config
from msn.eval.lowshot import run_lowshot
from msn.eval.supervised import SupervisedOptions, augment, predict, total_steps, train_supervised
from msn.models import build_vit
from test_eval_cli import checkpoint, synthetic  # noqa: F401 - the module fixture is reused


def stripes(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0: horizontal stripes, class 1: vertical stripes (random phase, plus noise)."""
    labels = torch.arange(n) % 2
    grid = torch.arange(16).float()
    phase = torch.rand(n, 1, 1, generator=generator) * 6.28
    rows = torch.sin(grid.view(1, 16, 1) * 1.5 + phase).expand(n, 16, 16)
    cols = torch.sin(grid.view(1, 1, 16) * 1.5 + phase).expand(n, 16, 16)
    images = torch.where(labels.view(n, 1, 1) == 0, rows, cols)
    images = images + 0.1 * torch.randn(n, 16, 16, generator=generator)
    return images.unsqueeze(1).expand(n, 3, 16, 16).contiguous(), labels


def small_vit():
    return build_vit("vit_mini", patch_size=4, img_size=16, depth=2, embed_dim=32, num_heads=2)


def test_learns_a_task_a_random_network_cannot_solve_by_chance():
    generator = torch.Generator().manual_seed(0)
    train_x, train_y = stripes(32, generator)
    test_x, test_y = stripes(200, generator)
    options = SupervisedOptions(steps=120, batch_size=16, lr=2e-3, crop_scale=(0.8, 1.0))
    model = train_supervised(small_vit(), train_x, train_y, 2, options, seed=0)
    predictions, features = predict(model, test_x)
    assert features.shape == (200, 32)
    assert (predictions == test_y).float().mean() >= 0.9


def test_same_seed_same_network_and_other_seed_differs():
    generator = torch.Generator().manual_seed(1)
    x, y = stripes(8, generator)
    options = SupervisedOptions(steps=3, batch_size=4)
    backbone = small_vit()
    a = train_supervised(backbone, x, y, 2, options, seed=5)
    b = train_supervised(backbone, x, y, 2, options, seed=5)
    c = train_supervised(backbone, x, y, 2, options, seed=6)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.classifier.weight, c.classifier.weight)
    # the architecture is copied, its weights are not: the source backbone is untouched
    assert not torch.equal(a.backbone.vit.patch_embed.proj.weight, backbone.vit.patch_embed.proj.weight)


def test_total_steps_is_at_least_steps_and_at_least_min_epochs_passes():
    options = SupervisedOptions(steps=200, min_epochs=30, batch_size=32)
    assert total_steps(10, options) == 200  # 30 passes over 10 images in batches of 10: 30 steps
    assert total_steps(600, options) == 563  # ceil(30 * 600 / 32)
    assert total_steps(600, SupervisedOptions(steps=200, min_epochs=0, batch_size=32)) == 200


def test_augment_crops_each_image_from_itself_and_flips():
    generator = torch.Generator().manual_seed(0)
    constant = torch.arange(6).float().view(6, 1, 1, 1).expand(6, 3, 16, 16).contiguous()
    out = augment(constant, SupervisedOptions(crop_scale=(0.2, 1.0), hflip=0.5), generator)
    assert out.shape == constant.shape
    assert torch.allclose(out, constant, atol=1e-5)  # crop k comes from image k
    ramp = torch.arange(16).float().view(1, 1, 1, 16).expand(4, 3, 16, 16).contiguous()
    flipped = augment(ramp, SupervisedOptions(crop_scale=(1.0, 1.0), hflip=1.0), generator)
    assert (flipped[..., 0] > flipped[..., -1]).all()  # the increasing ramp now decreases
    kept = augment(ramp, SupervisedOptions(crop_scale=(1.0, 1.0), hflip=0.0), generator)
    assert (kept[..., 0] < kept[..., -1]).all()


def test_pipeline_baseline_supervised(checkpoint, tmp_path):  # noqa: F811 - pytest fixture
    cfg = load_eval_config({
        "backbone": str(checkpoint), "baseline": "supervised", "data": synthetic(synthetic_size=40),
        "shots": [2], "splits": 2, "supervised_steps": 4, "supervised_min_epochs": 0, "output_dir": str(tmp_path), "cache": False,
        "progress": False, "plot": False,
    })
    results = run_lowshot(cfg)
    entry = results["shots"]["2"]
    assert entry["lambda_selection"] == ["supervised", "supervised"]
    assert len(entry["accuracy"]) == 2 and all(0.0 <= a <= 100.0 for a in entry["accuracy"])
    assert results["feature"]["kind"] == "supervised (end to end)"
    assert results["supervised"]["steps"] == 4
    assert [s["supervised"]["steps"] for s in entry["splits"]] == [4, 4]
