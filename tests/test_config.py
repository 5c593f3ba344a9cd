"""Config presets compose, overrides win, and bad values fail with one line naming the key."""

from pathlib import Path

import pytest
from conftest import compose_config, tiny_config_dict

from msn.architectures import MODELS as ARCH_MODELS
from msn.config import ConfigError, from_dict, load_config, to_dict, validate
from msn.config_files import CONFIG_DIR

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))


PAPER = {  # preset: (model group, mask ratio, epochs)
    "vits16_in1k": ("vit_small_16", 0.15, 800),
    "vitb16_in1k": ("vit_base_16", 0.3, 600),
    "vitl16_in1k": ("vit_large_16", 0.5, 600),
    "vitb4_in1k": ("vit_base_4", 0.7, 300),
    "vitl7_in1k": ("vit_large_7", 0.7, 200),
}


def test_all_presets_exist():
    assert set(PAPER) | {"fmnist_demo"} <= set(EXPERIMENTS)
    assert {"vit_tiny_16", "vit_small_16", "vit_base_16", "vit_large_16", "vit_base_4", "vit_large_7", "vit_mini_4"} <= set(MODELS)
    assert set(MODELS) == set(ARCH_MODELS)  # one Hydra file per registry preset, nothing else


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_presets_compose_and_validate(name, tmp_path):
    raw = compose_config(f"experiment={name}", f"data.root={tmp_path}")
    cfg = load_config(raw)
    model, ratio, epochs = PAPER[name]
    assert cfg.model.name == model and cfg.mask.ratio == ratio and cfg.optim.epochs == epochs
    assert cfg.data.name == "imagenet" and cfg.output_dir == f"outputs/{name}"
    assert cfg.data.views.rand_size == 224 and cfg.data.views.num_focal == 10
    assert cfg.optim.lr == 1e-3 and cfg.optim.start_lr == 2e-4 and cfg.optim.warmup_epochs == 15
    assert cfg.loss.num_prototypes == 1024 and cfg.head.hidden_dim == 2048 and cfg.head.output_dim == 256


@pytest.mark.parametrize("model", MODELS)
def test_every_model_composes(model, tmp_path):
    size = 28 if model.endswith("_4") else 224
    focal = 12 if size == 28 else (98 if model.endswith("_7") else 96)
    cfg = load_config(compose_config(f"model={model}", f"data.root={tmp_path}", f"data.views.rand_size={size}",
                               f"data.views.focal_size={focal}"))
    assert cfg.model.name == model


def test_model_presets_come_from_the_registry_and_overrides_win(tmp_path):
    for name, preset in ARCH_MODELS.items():
        m = load_config(compose_config(f"model={name}", f"data.root={tmp_path}", "data.views.rand_size=28",
                                 "data.views.focal_size=28", "model.patch_size=4")).model
        assert (m.name, m.arch, m.patch_size) == (name, preset.arch, 4)
    m = load_config(compose_config("model=vit_large_7", f"data.root={tmp_path}", "data.views.focal_size=98")).model
    assert (m.arch, m.patch_size) == ("vit_large", 7)
    assert from_dict(to_dict(load_config(compose_config("model=vit_base_4", f"data.root={tmp_path}")))).model.patch_size == 4
    with pytest.raises(ConfigError, match="model.name: unknown preset 'vit_huge_14'"):
        load_config(compose_config("model.name=vit_huge_14", f"data.root={tmp_path}"))
    m = load_config(compose_config("model.name=mine", "model.arch=vit_tiny", "model.patch_size=8", f"data.root={tmp_path}")).model
    assert (m.arch, m.patch_size) == ("vit_tiny", 8)


def test_command_line_overrides_beat_the_preset(tmp_path):
    cfg = load_config(compose_config("experiment=fmnist_demo", "data=folder", f"data.root={tmp_path}", "model=vit_tiny_16",
                                     "mask.ratio=0.5"))
    assert cfg.data.name == "folder" and cfg.data.root == str(tmp_path)
    assert cfg.model.arch == "vit_tiny" and cfg.model.patch_size == 16 and cfg.mask.ratio == 0.5
    cfg = load_config(compose_config("experiment=vits16_in1k", "model=vit_tiny_16", f"data.root={tmp_path}"))
    assert cfg.model.arch == "vit_tiny" and cfg.mask.ratio == 0.15


def test_demo_preset_targets_fashion_mnist():
    raw = compose_config("experiment=fmnist_demo")
    assert raw.data.name == "fashion_mnist" and raw.model.name == "vit_mini_7"
    assert load_config(raw).model.patch_size == 7  # the showcase's model (fmnist_msn)
    assert raw.data.views.rand_size == 28 and raw.data.views.focal_size == 14


@pytest.mark.parametrize(
    "change, key",
    [
        ({"mask": {"ratio": 1.0}}, "mask.ratio"),
        ({"mask": {"ratio": -0.1}}, "mask.ratio"),
        ({"model": {"arch": "vit_huge"}}, "model.arch"),
        ({"model": {"patch_size": 5}}, "data.views.rand_size"),
        ({"data": {"name": "folder", "root": "/nonexistent/images"}}, "data.root"),
        ({"data": {"name": "imagenet", "root": None}}, "data.root"),
        ({"data": {"name": "mnist"}}, "data.name"),
        ({"optim": {"batch_size": 0}}, "optim.batch_size"),
        ({"optim": {"batch_size": "many"}}, "optim.batch_size"),
        ({"mask": {"ratioo": 0.1}}, "mask.ratioo"),
        ({"precision": "fp8"}, "precision"),
        ({"logging": {"wandb": "cloud"}}, "logging.wandb"),
        ({"resume": "/nonexistent/latest.pt"}, "resume"),
        ({"loss": {"prior": "zipf"}}, "loss.prior"),
        ({"loss": {"prior_exponent": -0.25}}, "loss.prior_exponent"),
        ({"data": {"long_tail_ratio": 0.5}}, "data.long_tail_ratio"),
        ({"model": {"pos_embed": "rope"}}, "model.pos_embed"),
    ],
)
def test_bad_values_name_the_key(change, key, tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tiny_config_dict(tmp_path, **change))
    message = str(info.value)
    assert message.startswith(key + ":") and "\n" not in message


def test_batch_must_divide_world_size(tmp_path):
    cfg = load_config(tiny_config_dict(tmp_path))
    validate(cfg, world_size=4)
    with pytest.raises(ConfigError, match=r"^optim.batch_size: global batch 8 is not divisible by the world size 3"):
        validate(cfg, world_size=3)


def test_missing_fashion_mnist_root_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="^data.root: directory not found"):
        load_config(tiny_config_dict(tmp_path, data={"name": "fashion_mnist", "root": str(tmp_path / "nope")}))
    assert Path(tmp_path).is_dir()


def _leaves(values: dict, prefix: str = ""):
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_prior_and_long_tail_defaults_and_overrides(tmp_path):
    cfg = load_config(tiny_config_dict(tmp_path))
    assert (cfg.loss.prior, cfg.loss.prior_exponent, cfg.data.long_tail_ratio) == ("uniform", 0.25, None)
    cfg = load_config(compose_config("loss.prior=power_law", "loss.prior_exponent=0.5", "data=synthetic",
                                     "data.long_tail_ratio=10", f"output_dir={tmp_path}"))
    assert (cfg.loss.prior, cfg.loss.prior_exponent, cfg.data.long_tail_ratio) == ("power_law", 0.5, 10.0)


def test_a_model_or_data_override_brings_its_own_patch_and_views(tmp_path):
    """The Fashion-MNIST presets take their model (patch 7) and their views (14 px focal views)
    from the model and data groups: overriding either brings that group's own values instead
    of keeping the preset's, and what does not fit is refused in one line."""
    demo = compose_config("experiment=fmnist_demo")
    assert (demo.model.name, demo.data.views.rand_size, demo.data.views.focal_size, demo.data.views.num_focal) == \
        ("vit_mini_7", 28, 14, 6)
    assert load_config(demo).model.patch_size == 7
    tiny = compose_config("experiment=fmnist_demo", "model=vit_tiny_16")
    with pytest.raises(ConfigError, match=r"^data.views.rand_size: 28 px is not a positive multiple of model.patch_size=16"):
        load_config(tiny)
    (tmp_path / "images").mkdir()
    folder = compose_config("experiment=fmnist_demo", "data=folder", f"data.root={tmp_path / 'images'}")
    views = folder.data.views
    assert (views.rand_size, views.focal_size, views.num_focal, list(views.mean)) == (224, 96, 10, [0.485, 0.456, 0.406])
    with pytest.raises(ConfigError, match=r"^data.views.focal_size: 96 px is not a positive multiple of model.patch_size=7$"):
        load_config(folder)  # the folder's 96 px focal views do not fit the preset's patch 7: say so, do not guess


def test_data_subset_is_a_seeded_draw_over_every_class():
    from msn.data import SyntheticImages, training_subset

    data = SyntheticImages(size=100, num_classes=10, image_size=8)
    drawn = training_subset(data, 30, seed=0)
    assert list(drawn.indices) == sorted(drawn.indices) and len(set(drawn.indices)) == 30
    assert max(drawn.indices) > 30  # not the first 30
    assert list(training_subset(data, 30, seed=0).indices) == list(drawn.indices)
    assert list(training_subset(data, 30, seed=1).indices) != list(drawn.indices)
    assert list(training_subset(data, 30, seed=0, shard_local=True).indices) == list(range(30))
    assert training_subset(data, None, seed=0) is data and training_subset(data, 100, seed=0) is data
    with pytest.raises(ValueError, match="^data.subset: 101 images asked for, the data set holds 100$"):
        training_subset(data, 101, seed=0)
