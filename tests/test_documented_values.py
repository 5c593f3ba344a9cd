"""Default and preset values that README.md and docs/*.md state, each checked against the
config, model or file that carries it: a test here fails when the page and the code part."""

from __future__ import annotations

import json
import math
import tomllib

import pytest
import torch
from conftest import ROOT, compose_config

from msn.config import MSNConfig, load_config
from msn.config_files import CONFIG_DIR

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
#: docs/training.md "Presets": preset -> (global batch, focal view side, backbone parameters in millions
#: as the model column rounds them)
IMAGENET_PRESETS = {
    "vits16_in1k": (1024, 96, 21.7),
    "vitb16_in1k": (1024, 96, 85.8),
    "vitl16_in1k": (1024, 96, 303.3),
    "vitb4_in1k": (1152, 96, 87.5),
    "vitl7_in1k": (1024, 98, 303.5),
}
FASHION_MNIST_PRESETS = ("fmnist_demo", "fmnist_msn")


def preset(name: str, tmp_path) -> MSNConfig:
    return load_config(compose_config(f"experiment={name}", f"data.root={tmp_path}"))


def test_every_preset_the_readme_lists_exists():
    """docs/training.md "Presets (`experiment=`)": the table lists exactly these presets."""
    assert set(EXPERIMENTS) == set(IMAGENET_PRESETS) | set(FASHION_MNIST_PRESETS)


@pytest.mark.parametrize("name", sorted(IMAGENET_PRESETS))
def test_imagenet_preset_global_batch_and_focal_size(name, tmp_path):
    """docs/training.md "Presets": the "global batch" column (1024; 1152 for `vitb4_in1k`) and, for
    `vitl7_in1k`, "focal views 98 px (14 patches of 7)" (the others 96 px)."""
    cfg = preset(name, tmp_path)
    batch, focal, _ = IMAGENET_PRESETS[name]
    assert cfg.optim.batch_size == batch
    assert cfg.data.views.focal_size == focal
    if name == "vitl7_in1k":
        assert cfg.model.patch_size == 7 and focal // 7 == 14


@pytest.mark.parametrize("name", sorted(IMAGENET_PRESETS))
def test_imagenet_preset_parameter_count(name, tmp_path):
    """docs/training.md "Presets": the model column's parameter counts, ViT-S/16 (21.7M), ViT-B/16
    (85.8M), ViT-L/16 (303.3M), ViT-B/4 (87.5M), ViT-L/7 (303.5M): the backbone built from the
    preset at its 224 px views, rounded to 0.1M (built on the meta device: no memory)."""
    from msn.architectures import MODELS
    from msn.models import build_vit

    cfg = preset(name, tmp_path)
    arch = cfg.model.arch or MODELS[cfg.model.name].arch
    patch = cfg.model.patch_size or MODELS[cfg.model.name].patch_size
    with torch.device("meta"):
        backbone = build_vit(arch, patch, cfg.data.views.rand_size, embed_dim=cfg.model.embed_dim,
                             depth=cfg.model.depth, num_heads=cfg.model.num_heads, mlp_ratio=cfg.model.mlp_ratio,
                             drop_path_rate=cfg.model.drop_path_rate, pos_embed=cfg.model.pos_embed)
    count = sum(p.numel() for p in backbone.parameters())
    assert round(count / 1e6, 1) == IMAGENET_PRESETS[name][2]


@pytest.mark.parametrize("name", sorted(IMAGENET_PRESETS))
def test_imagenet_presets_share_the_vits16_recipe(name, tmp_path):
    """docs/training.md "Presets": "All ImageNet presets use the reference's ViT-S/16 optimisation recipe
    (AdamW, LR warm-up 2e-4 -> 1e-3 over 15 epochs then cosine toward 1e-6, WD cosine 0.04 ->
    0.4, EMA 0.996 -> 1, every schedule stretched over 1.25x the run, gradient clip 3.0), 1
    target + 1 anchor at 224 px and 10 focal views at 96 px, a 2048-2048-256 projection head
    with BN, 1024 prototypes, tau 0.1, sharpening T 0.25, Sinkhorn on and ME-MAX weight 1"
    (96 px except ViT-L/7's 98, tested above)."""
    cfg = preset(name, tmp_path)
    o, loss, views, head = cfg.optim, cfg.loss, cfg.data.views, cfg.head
    assert (o.start_lr, o.lr, o.warmup_epochs, o.final_lr) == (2e-4, 1e-3, 15, 1e-6)
    assert (o.weight_decay, o.final_weight_decay) == (0.04, 0.4)
    assert (o.ema_start, o.ema_end) == (0.996, 1.0)
    assert o.schedule_stretch == 1.25 and o.clip_grad == 3.0
    assert views.rand_size == 224 and views.num_focal == 10
    assert (head.hidden_dim, head.output_dim, head.use_bn) == (2048, 256, True)
    assert loss.num_prototypes == 1024 and loss.temperature == 0.1
    assert loss.sharpen_start == loss.sharpen_final == 0.25
    assert loss.use_sinkhorn is True and loss.memax_weight == 1.0


@pytest.mark.parametrize("name", sorted(IMAGENET_PRESETS))
def test_imagenet_presets_use_the_paper_view_scales(name, tmp_path):
    """docs/method.md Sec. 1: target and anchor views "at 224 px (... scale 0.3-1.0), and 10
    focal views at 96 px (scale 0.05-0.3)"."""
    views = preset(name, tmp_path).data.views
    assert tuple(views.rand_scale) == (0.3, 1.0) and tuple(views.focal_scale) == (0.05, 0.3)


def test_view_defaults():
    """docs/method.md Sec. 1: "one target view and one anchor view at 224 px (... scale
    0.3-1.0), and 10 focal views at 96 px (scale 0.05-0.3)"; every view flipped with p 0.5,
    colour jitter 0.4/0.4/0.4/0.1 with p 0.8, grayscale p 0.2, blur sigma [0.1, 2.0] with p 0.5,
    ImageNet mean/std."""
    views = MSNConfig().data.views
    assert (views.rand_size, views.focal_size, views.num_focal) == (224, 96, 10)
    assert tuple(views.rand_scale) == (0.3, 1.0) and tuple(views.focal_scale) == (0.05, 0.3)
    assert views.hflip == 0.5 and views.color_jitter_prob == 0.8
    # brightness/contrast/saturation 0.8 s and hue 0.2 s (msn/config.py), s = color_jitter
    assert math.isclose(0.8 * views.color_jitter, 0.4) and math.isclose(0.2 * views.color_jitter, 0.1)
    assert views.grayscale_prob == 0.2 and views.blur_prob == 0.5 and tuple(views.blur_sigma) == (0.1, 2.0)
    assert tuple(views.mean) == (0.485, 0.456, 0.406) and tuple(views.std) == (0.229, 0.224, 0.225)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_entropy_weight_is_0_in_every_preset(name, tmp_path):
    """docs/method.md Sec. 5, item 7: "an optional mean prediction entropy (weight 0 in every
    recipe)"."""
    assert preset(name, tmp_path).loss.entropy_weight == 0.0


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_monitor_is_on_in_the_fashion_mnist_presets_only(name, tmp_path):
    """docs/eval.md "Live monitor": "`monitor.enabled=true` (on in the Fashion-MNIST presets
    `fmnist_demo` and `fmnist_msn`, off in the ImageNet ones)"."""
    assert preset(name, tmp_path).monitor.enabled is (name in FASHION_MNIST_PRESETS)


@pytest.mark.parametrize("name", sorted(IMAGENET_PRESETS))
def test_no_dropout_and_no_drop_path_in_the_paper_presets(name, tmp_path):
    """docs/method.md Sec. 3: "no dropout, no drop-path in the released recipes": the network a
    paper preset builds has every dropout probability and every drop-path rate at 0."""
    from msn.models import build_network

    cfg = preset(name, tmp_path)
    assert cfg.model.drop_path_rate == 0.0
    with torch.device("meta"):
        network = build_network(cfg.model, cfg.head, cfg.data.views.rand_size)
    dropouts = [m for m in network.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
    assert dropouts and all(m.p == 0.0 for m in dropouts)
    assert all(getattr(m, "drop_prob", 0.0) == 0.0 for m in network.modules())
    assert all(getattr(m, "attn_drop", None) is None or getattr(m.attn_drop, "p", 0.0) == 0.0
               for m in network.modules())


def test_readme_key_settings_defaults(tmp_path):
    """docs/training.md "Key settings": the default column of the table, read from the composed default
    configuration (`configs/config.yaml` with no preset)."""
    cfg = load_config(compose_config(f"data.root={tmp_path}"))
    assert cfg.name == "msn" and cfg.output_dir == "outputs/msn"  # outputs/${name}
    assert cfg.seed == 0 and cfg.device == "auto" and cfg.precision == "auto"
    assert cfg.optim.epochs == 800 and cfg.optim.batch_size == 1024 and cfg.train.max_steps is None
    assert cfg.mask.ratio == 0.15 and cfg.mask.shared is False
    assert cfg.model.name == "vit_small_16" and cfg.model.pos_embed == "learned" and cfg.model.drop_path_rate == 0.0
    assert cfg.resume == "auto" and cfg.init_from is None and cfg.trust_pickle is False
    assert cfg.data.augment == "batched" and cfg.data.reduced_decode is True
    assert cfg.train.compile is False and cfg.train.compile_backend == "inductor"
    assert cfg.dist.strategy == "ddp"
    assert (cfg.loss.prior, cfg.loss.prior_exponent) == ("uniform", 0.25)
    assert (cfg.monitor.enabled, cfg.monitor.every) == (False, 1000)
    assert cfg.data.on_bad_image == "skip" and cfg.data.subset is None and cfg.data.num_workers is None
    assert cfg.logging.wandb == "disabled" and cfg.logging.artifact is None


def test_monitor_defaults():
    """docs/eval.md "Live monitor": `monitor.train_images` "(the pool, default 500)",
    `monitor.test_images` "(500)", "`monitor.knn_k` = 20 neighbours, temperature 0.07",
    `monitor.shots` "(`[1, 5]`)", `monitor.splits` "(3)", "at the fixed lambda `lambd_fallback`";
    docs/training.md "Key settings": `monitor.enabled`, `monitor.every` "false, 1000"."""
    import inspect

    from msn.eval.config import EvalConfig
    from msn.eval.monitor import knn_top1

    m = MSNConfig().monitor
    assert (m.enabled, m.every, m.train_images, m.test_images) == (False, 1000, 500, 500)
    assert (m.knn_k, list(m.shots), m.splits) == (20, [1, 5], 3)
    assert inspect.signature(knn_top1).parameters["temperature"].default == 0.07
    assert EvalConfig.lambd_fallback == 0.1


def test_adamw_betas_eps_and_clip():
    """docs/method.md Sec. 6: "AdamW (betas 0.9/0.999, eps 1e-8)"; "Gradient clipping at global
    norm 3.0 (encoder only)"."""
    from msn.train.optim import build_optimizer

    o = MSNConfig().optim
    optimizer = build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(2))]}], o.betas, o.eps)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["betas"] == (0.9, 0.999) and optimizer.defaults["eps"] == 1e-8
    assert o.clip_grad == 3.0


def test_prototypes_are_1024_by_256_uniform_in_the_reference_bound():
    """docs/method.md Sec. 4: "K = 1024 prototypes of width 256, initialised uniform in
    `[-1/sqrt(256), 1/sqrt(256)]`" (262,144 draws: mean and standard deviation within 1% of the
    bound of a uniform's, 0 and bound/sqrt(3))."""
    from msn.models import Prototypes

    cfg = MSNConfig()
    torch.manual_seed(0)
    weight = Prototypes(cfg.loss.num_prototypes, cfg.head.output_dim).weight.detach()
    bound = 1 / math.sqrt(256)
    assert weight.shape == (1024, 256)
    assert float(weight.abs().max()) <= bound and float(weight.abs().max()) > 0.999 * bound
    assert abs(float(weight.mean())) < 0.01 * bound
    assert float(weight.std()) == pytest.approx(bound / math.sqrt(3), rel=0.01)


def test_linear_layers_are_truncated_normal_002_with_zero_bias():
    """docs/method.md Sec. 3: "Initialisation: linear layers truncated normal (std 0.02) with
    zero bias" (ViT-S/16's first MLP layer, 589,824 draws: sample std within 1% of 0.02, mean
    near 0; `trunc_normal_` truncates at +-2 absolute, 100 std here, so no draw reaches it)."""
    from msn.models import build_vit

    torch.manual_seed(0)
    vit = build_vit("vit_small", 16, 224).vit
    linears = [m for m in vit.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.bias is None or torch.count_nonzero(m.bias) == 0 for m in linears)
    weight = vit.blocks[0].mlp.fc1.weight.detach()
    assert float(weight.std()) == pytest.approx(0.02, rel=0.01)
    assert abs(float(weight.mean())) < 1e-4


def test_reduced_decode_bound_and_factors():
    """docs/method.md Sec. 1, Decoding: "At the default views that bound is 245,760 pixels (the
    96 px focal views bind), so ImageNet's typical 500x375 photos decode in full and
    12-megapixel photos at 1/4"."""
    import io

    from PIL import Image

    from msn.data.decode import reduce_on_decode
    from msn.data.view_params import min_decode_pixels

    views = MSNConfig().data.views
    bound = min_decode_pixels(views)
    assert bound == 245_760 == math.ceil(96**2 / (0.05 * 0.75))
    assert bound > math.ceil(224**2 / (0.3 * 0.75))  # the focal views bind

    def factor(width, height):
        buffer = io.BytesIO()
        Image.new("RGB", (width, height), (90, 120, 150)).save(buffer, format="JPEG")
        buffer.seek(0)
        return reduce_on_decode(Image.open(buffer), bound)

    assert factor(500, 375) == 1 and factor(375, 500) == 1
    assert factor(4000, 3000) == 4 and factor(3000, 4000) == 4


def test_eval_options_defaults(tmp_path, monkeypatch):
    """docs/eval.md "Options": the default column, from `configs/eval_lowshot.yaml` as
    composed (EvalConfig's defaults and the YAML's data choice)."""
    from hydra import compose, initialize_config_dir

    from msn.eval.config import DEFAULT_LAMBDA_GRID

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        raw = compose("eval_lowshot", overrides=["baseline=pixels"])
    from omegaconf import OmegaConf

    from msn.eval.config import EvalConfig

    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EvalConfig), raw))
    assert cfg.backbone is None and cfg.backbone_which == "target"
    assert (cfg.supervised_steps, cfg.supervised_min_epochs, cfg.supervised_batch_size) == (200, 30, 32)
    assert (cfg.supervised_lr, cfg.supervised_weight_decay) == (1e-3, 0.05)
    assert cfg.feature == "cls_pre_ln" and cfg.feature_blocks == 4 and cfg.pixels_size is None
    assert list(cfg.shots) == [1, 2, 5] and cfg.splits == 3 and cfg.seed == 0
    assert cfg.percent is None and list(cfg.subset_dirs) == [] and cfg.percent_file is None
    assert cfg.lambd is None and cfg.lambd_fallback == 0.1 and cfg.cv_folds == 5
    # "1e-4 ... 1e2 in half decades"
    assert list(cfg.lambd_grid) == DEFAULT_LAMBDA_GRID
    assert [round(math.log10(v) * 2) for v in cfg.lambd_grid] == list(range(-8, 5))
    assert (cfg.tol, cfg.max_iter, cfg.solver_dtype) == (1e-6, 1000, "float64")
    assert (cfg.knn_k, cfg.knn_temperature) == (20, 0.07)
    assert cfg.test_limit is None and cfg.batch_size == 128
    assert cfg.device == "auto" and cfg.precision == "auto"
    assert cfg.cache is True and cfg.cache_dir is None
    assert cfg.output_dir.startswith("outputs/eval_lowshot/")
    assert cfg.progress is True and cfg.plot is True
    assert cfg.data.name == "fashion_mnist"


def test_pixels_size_default_is_the_view_size_capped_at_32(tmp_path):
    """docs/eval.md "Options": `pixels_size` "`null`: min(`data.views.rand_size`, 32)"."""
    from msn.eval.baselines import Pixels
    from msn.eval.config import load_eval_config

    def size(**views):
        cfg = load_eval_config({"baseline": "pixels", "data": {"name": "synthetic", "views": views}})
        return Pixels(cfg, torch.device("cpu")).build_encoder()[1]["image_size"]

    assert size(rand_size=28, focal_size=14) == 28
    assert size(rand_size=224, focal_size=96) == 32
    cfg = load_eval_config({"baseline": "pixels", "pixels_size": 20, "data": {"name": "synthetic"}})
    assert Pixels(cfg, torch.device("cpu")).build_encoder()[1]["image_size"] == 20


def test_supervised_baseline_recipe():
    """docs/eval.md "Baselines": the supervised baseline is "trained end to end with
    cross-entropy (label smoothing 0.1)" with RandomResizedCrop "scale 0.35-1" and horizontal
    flips, and a "10% linear warm-up" (Options: `supervised_lr`)."""
    from msn.eval.supervised import SupervisedOptions

    options = SupervisedOptions()
    assert options.label_smoothing == 0.1 and tuple(options.crop_scale) == (0.35, 1.0)
    assert options.hflip == 0.5 and options.warmup_fraction == 0.1


def test_dist_defaults():
    """docs/scaling.md: `dist.preempt_signals` "(default `USR1`, `USR2`, `TERM`)", "`dist.requeue:
    auto` (default)"; docs/scaling.md / msn/config.py: backend auto, `timeout_min` 30,
    `slurm_env` auto, strategy ddp."""
    d = MSNConfig().dist
    assert list(d.preempt_signals) == ["USR1", "USR2", "TERM"] and d.requeue == "auto"
    assert (d.backend, d.strategy, d.timeout_min, d.slurm_env) == ("auto", "ddp", 30.0, "auto")


def test_slurm_launcher_defaults():
    """docs/scaling.md "Slurm": the `hydra.launcher.` table: nodes 1, gpus_per_node 8
    (tasks_per_node follows it), timeout_min 4320, partition/account/qos/constraint null,
    cpus_per_task 10, mem_gb null, signal_delay_s 120, additional_parameters {requeue: true}."""
    launcher = compose_config("hydra/launcher=slurm", hydra_config=True).hydra.launcher
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (1, 8, 8)
    assert launcher.timeout_min == 4320 and launcher.signal_delay_s == 120
    assert (launcher.cpus_per_task, launcher.mem_gb) == (10, None)
    assert (launcher.partition, launcher.account, launcher.qos, launcher.constraint) == (None, None, None, None)
    assert dict(launcher.additional_parameters) == {"requeue": True}


def test_torch_floor_is_2_6():
    """docs/security.md Sec. 1: "The floor of the `torch` dependency is 2.6"."""
    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_reqs = [Requirement(d) for d in deps if Requirement(d).name == "torch"]
    assert len(torch_reqs) == 1
    lower = [s for s in torch_reqs[0].specifier if s.operator in (">=", ">")]
    assert [(s.operator, s.version) for s in lower] == [(">=", "2.6")]
    assert "2.5.1" not in torch_reqs[0].specifier and "2.6.0" in torch_reqs[0].specifier


def test_msn_shards_writes_8_shards_at_once_by_default(tmp_path, monkeypatch):
    """docs/formats.md Sec. 9: "`--workers` (default 8) shards are written at once, by
    threads"."""
    import msn.data.shards_cli as shards

    seen = {}

    def fake_write(src, dst, samples_per_shard, overwrite, progress, workers):
        seen.update(samples_per_shard=samples_per_shard, workers=workers)
        return {"num_samples": 0, "classes": [], "shards": []}

    monkeypatch.setattr(shards, "write_shards", fake_write)
    assert shards.main(["write", str(tmp_path / "src"), str(tmp_path / "dst")]) == 0
    assert seen == {"samples_per_shard": 1000, "workers": 8}


def test_onnx_export_is_opset_18(tmp_path):
    """docs/formats.md Sec. 8 (ONNX): "The batch size is dynamic; opset 18"."""
    import onnx

    from msn.export.cli import main as main_export
    from weights_helpers import small_config, write_run

    run = write_run(tmp_path / "run", small_config(32, 32, 1, 2, 8), 32, (3, 4), step=1, epoch=0)
    out = tmp_path / "onnx"
    assert main_export([str(run["path"]), "--format", "onnx", "--output", str(out)]) == 0
    model = onnx.load(str(out / "model.onnx"))
    default_domain = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    assert default_domain == [18]
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.HasField("dim_value")  # dynamic


def test_hf_config_has_zero_dropout_and_no_pooler(tmp_path):
    """docs/formats.md Sec. 3: `config.json` holds "dropout probabilities 0. There is no
    drop-path and no pooler." (and `num_channels: 3`)."""
    from safetensors import safe_open

    from msn.export.cli import main as main_export
    from weights_helpers import small_config, write_run

    run = write_run(tmp_path / "run", small_config(32, 32, 1, 2, 8), 32, (1, 2), step=1, epoch=0)
    out = tmp_path / "hf"
    assert main_export([str(run["path"]), "--format", "hf", "--output", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_dropout_prob"] == 0.0 and config["attention_probs_dropout_prob"] == 0.0
    assert config["num_channels"] == 3
    dropouts = {k: v for k, v in config.items() if "drop" in k}
    assert dropouts and all(v == 0 for v in dropouts.values()), dropouts
    with safe_open(out / "model.safetensors", "pt") as handle:
        assert not [k for k in handle.keys() if "pooler" in k]
