"""The reference switches (docs/reference_switches.md): ``recipe=reference`` for training
(configs/recipe/) and ``protocol=reference`` for the low-shot evaluator
(configs/protocol/) set every key whose default departs from the authors' code to the
authors' value, change nothing else, lose to an explicit ``key=value``, win over the presets,
and do what they say: one training step equals the reconstruction of the authors' update, and
the evaluator uses one fixed lambda without cross-validation."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

import msn
from conftest import ROOT, TINY_OVERRIDES, compose_config
from msn.config import MSNConfig, load_config, to_dict
from msn.config_files import CONFIG_DIR
from msn.eval.config import EvalConfig, eval_config_to_dict, load_eval_config

from reference_recipe import AuthorsStep, FullBlocksForward  # benchmarks/ is on pytest's path (pyproject.toml)
from train_harness import runner as bench

#: Every key of recipe=reference: (the authors' value, our default).
RECIPE = {
    "mask.shared": (True, False),
    "loss.proto_grad_reduce": ("sum", "mean"),
    "data.reduced_decode": (False, True),
    "data.augment": ("per_sample", "batched"),
    "precision": ("fp32", "auto"),
}
#: Every key of protocol=reference: (the authors' value, our default). 0.00025 is the default of
#: `--lambd` in their logistic_eval.py (their README's example passes 0.0025).
PROTOCOL = {
    "lambd": (0.00025, None),
    "precision": ("fp32", "auto"),
}
AUTHORS_LAMBDA = PROTOCOL["lambd"][0]
#: Tolerance of the float64 step comparison (justified in the test that uses it).
ATOL = 1e-8


def flat(values: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed(a: dict, b: dict) -> dict:
    """The keys whose values differ between two flat dicts: ``{key: (a's, b's)}``."""
    assert a.keys() == b.keys()
    return {key: (a[key], b[key]) for key in a if a[key] != b[key]}


def compose_eval(*overrides: str):
    """``configs/eval_lowshot.yaml`` composed by Hydra (as :func:`msn.api.lowshot` does)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("eval_lowshot", overrides=list(overrides))


def train_cfg(tmp_path, *overrides: str) -> dict:
    return flat(to_dict(load_config(compose_config(f"data.root={tmp_path}", *overrides))))


def eval_cfg(tmp_path, *overrides: str) -> dict:
    # output_dir fixed: its default holds the time of composition
    raw = compose_eval("baseline=pixels", f"output_dir={tmp_path / 'eval'}", *overrides)
    return flat(eval_config_to_dict(load_eval_config(raw)))


# ------------------------------------------------------------------ (a) the switches' keys

@pytest.mark.parametrize("group,expected", [("recipe", RECIPE), ("protocol", PROTOCOL)])
def test_switch_files_hold_exactly_the_documented_keys(group, expected):
    """reference.yaml sets these keys and no other; default.yaml sets none; each 'ours' is
    today's schema default (a default changed to the authors' value would make the entry moot)."""
    reference = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / group / "reference.yaml"))
    assert flat(reference) == {key: authors for key, (authors, _) in expected.items()}
    assert OmegaConf.load(CONFIG_DIR / group / "default.yaml") == OmegaConf.create({})
    schema = OmegaConf.structured(MSNConfig if group == "recipe" else EvalConfig)
    for key, (authors, ours) in expected.items():
        assert OmegaConf.select(schema, key) == ours != authors, key


@pytest.mark.parametrize("config,group", [("config.yaml", "recipe"), ("eval_lowshot.yaml", "protocol")])
def test_switches_are_last_in_their_defaults_lists(config, group):
    """Last, after _self_ and every preset group: the switch wins over the file's own values
    and the presets (the command line still wins: Hydra applies it after the defaults list)."""
    defaults = list(OmegaConf.load(CONFIG_DIR / config).defaults)
    assert defaults[-1] == {group: "default"} and "_self_" in defaults


def test_the_docs_page_lists_every_key_with_both_values():
    page = (ROOT / "docs" / "reference_switches.md").read_text()
    for key, (authors, ours) in {**RECIPE, **PROTOCOL}.items():
        row = next((line for line in page.splitlines() if line.startswith(f"| `{key}` |")), None)
        assert row is not None, key
        cells = [cell.strip(" `") for cell in row.split("|")[2:4]]
        assert cells == [OmegaConf.to_yaml(OmegaConf.create({"v": value})).strip()[3:]
                         for value in (authors, ours)], key
    for command in ("recipe=reference", "protocol=reference"):
        assert command in page


def test_recipe_reference_sets_the_authors_values_and_nothing_else(tmp_path):
    default = train_cfg(tmp_path)
    assert train_cfg(tmp_path, "recipe=default") == default == train_cfg(tmp_path, "~recipe")
    for key, (_, ours) in RECIPE.items():
        assert default[key] == ours, key
    reference = train_cfg(tmp_path, "recipe=reference")
    assert changed(default, reference) == {key: (ours, authors) for key, (authors, ours) in RECIPE.items()}


def test_protocol_reference_sets_the_authors_values_and_nothing_else(tmp_path):
    default = eval_cfg(tmp_path)
    assert eval_cfg(tmp_path, "protocol=default") == default == eval_cfg(tmp_path, "~protocol")
    for key, (_, ours) in PROTOCOL.items():
        assert default[key] == ours, key
    reference = eval_cfg(tmp_path, "protocol=reference")
    assert changed(default, reference) == {key: (ours, authors) for key, (authors, ours) in PROTOCOL.items()}
    # the authors' evaluator: already ours by default, so not in the switch
    assert reference["feature"] == "cls_pre_ln" and reference["backbone_which"] == "target"


# --------------------------------------------- (b) command line > recipe > presets (order)

def test_explicit_overrides_beat_the_switches(tmp_path):
    cfg = train_cfg(tmp_path, "recipe=reference", "mask.shared=false", "precision=bf16")
    assert cfg["mask.shared"] is False and cfg["precision"] == "bf16"
    assert cfg["loss.proto_grad_reduce"] == "sum" and cfg["data.reduced_decode"] is False
    assert cfg == train_cfg(tmp_path, "mask.shared=false", "precision=bf16", "recipe=reference")  # order on the line
    cfg = eval_cfg(tmp_path, "protocol=reference", "lambd=0.075")
    assert cfg["lambd"] == 0.075 and cfg["precision"] == "fp32"


def test_recipe_composes_with_an_experiment_preset(tmp_path):
    demo = train_cfg(tmp_path, "experiment=fmnist_demo")
    both = train_cfg(tmp_path, "recipe=reference", "experiment=fmnist_demo")
    assert both == train_cfg(tmp_path, "experiment=fmnist_demo", "recipe=reference")
    assert changed(demo, both) == {key: (ours, authors) for key, (authors, ours) in RECIPE.items()}
    assert both["name"] == "fmnist_demo" and both["data.name"] == "fashion_mnist"  # the preset is used...
    assert changed(train_cfg(tmp_path), demo)  # ...and sets keys of its own (model, views, schedule), kept above
    cfg = train_cfg(tmp_path, "recipe=reference", "experiment=fmnist_demo", "mask.shared=false")
    assert changed(both, cfg) == {"mask.shared": (True, False)}


@pytest.fixture
def preset_setting_recipe_keys():
    """An experiment preset (in Hydra's ConfigStore, beside configs/experiment/) that sets
    every key of the recipe to a non-reference value, like a future preset might."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    name = "probe_sets_recipe_keys"
    store.store(group="experiment", name=name, package="_global_", node={
        "name": name, "precision": "bf16", "mask": {"shared": False, "ratio": 0.3},
        "loss": {"proto_grad_reduce": "mean"}, "data": {"reduced_decode": True, "augment": "device"},
    })
    yield name
    store.repo["experiment"].pop(f"{name}.yaml")


def test_recipe_sits_after_the_presets_and_before_the_command_line(tmp_path, preset_setting_recipe_keys):
    """recipe is the last entry of config.yaml's defaults list: recipe=reference wins over a
    preset that sets the same keys, and a key=value on the command line wins over both."""
    preset = f"experiment={preset_setting_recipe_keys}"
    alone = train_cfg(tmp_path, preset)
    assert alone["precision"] == "bf16" and alone["data.augment"] == "device"  # the probe is used
    cfg = train_cfg(tmp_path, preset, "recipe=reference")
    for key, (authors, _) in RECIPE.items():
        assert cfg[key] == authors, key
    assert cfg["name"] == preset_setting_recipe_keys and cfg["mask.ratio"] == 0.3  # the rest of the preset stays
    cfg = train_cfg(tmp_path, preset, "recipe=reference", "precision=fp64", "data.augment=batched")
    assert cfg["precision"] == "fp64" and cfg["data.augment"] == "batched" and cfg["mask.shared"] is True


# ----------------------------------------- (c) one step under recipe=reference = authors'

def test_a_step_under_recipe_reference_is_the_authors_update_with_the_shared_mask(tmp_path):
    """Our step built from a config composed with recipe=reference, and the reconstruction of
    the authors' step (benchmarks/reference_recipe.py: one mask subset per step for the whole
    batch, eager attention, every token through the last block, an EMA loop, PyTorch's default
    AdamW kernel) on the same weights and batch: one update moves every weight, target weight,
    batch-norm statistic and prototype the same way, with 15% of the anchor's tokens dropped.

    Tolerance ATOL = 1e-8 in float64. The two steps compute the same real numbers in another
    order, so they differ by float64 rounding only. It is largest where a gradient is zero in
    exact arithmetic (biases feeding a batch norm or the final LayerNorm): there it is rounding
    noise of a sum over the batch, up to ~1e-15, and Adam's first step, lr * g / (|g| + eps),
    turns a change dg into at most lr * dg / eps = 1e-3 * 1e-15 / 1e-8 = 1e-10 (the tiny config
    warms up in one step, so lr is already the peak 1e-3). Measured: 2e-11 to 2.1e-10 over 40
    weight seeds. A real difference is far larger: per-image masks instead of the shared one move
    some weight 2e-3 away (next test), the EMA target (1 - 0.996) * 2e-3 = 8e-6. 1e-8 sits 50x
    above the worst rounding seen and 800x below the smallest real difference (the repository's
    other float64 step tests use 1e-9 at lr 2e-4: the same bound scaled by the 5x larger lr)."""
    overrides = [*TINY_OVERRIDES, "mask.ratio=0.15", "precision=fp64", f"output_dir={tmp_path}"]
    cfg = load_config(compose_config("recipe=reference", *overrides))
    assert cfg.mask.shared and cfg.precision == "fp64" and cfg.loss.proto_grad_reduce == "sum"
    with torch.random.fork_rng():  # the weights come from the global generator: a fixed draw
        torch.manual_seed(0)
        ours, authors = bench.StepRunner(cfg), bench.StepRunner(cfg, authors=True)
    assert type(ours.step_fn) is not AuthorsStep and ours.step_fn.masks.shared
    assert isinstance(authors.step_fn, AuthorsStep) and isinstance(authors.step_fn.online, FullBlocksForward)
    assert authors.step_fn.masks.shared and not authors.step_fn.network.backbone.vit.blocks[0].attn.fused_attn
    keep = ours.step_fn.masks(0, ours.batch.size)
    assert keep.shape[1] - 1 < ours.step_fn.masks.num_patches  # tokens are dropped at 0.15
    assert (keep == keep[:1]).all()  # one subset for the whole batch
    for name in ("network", "target", "prototypes"):
        getattr(authors.step_fn, name).load_state_dict(getattr(ours.step_fn, name).state_dict())
    authors.batch = ours.batch
    before = {k: v.clone() for k, v in ours.step_fn.network.state_dict().items()}
    batch = ours.batch.to(ours.device, torch.float64)  # what MSNStep.__call__ does first
    outputs = []
    for runner in (ours, authors):  # MSNStep.__call__, keeping the loss output
        outputs.append(runner.step_fn.forward_loss(batch, 0))
        runner.step_fn.update(outputs[-1], 0)
    for field in ("loss", "ce", "memax", "targets"):  # targets: the target views' sharpened assignments
        torch.testing.assert_close(getattr(outputs[0], field), getattr(outputs[1], field), rtol=0, atol=ATOL, msg=field)
    moved = 0
    for name in ("network", "target", "prototypes"):
        mine, theirs = getattr(ours.step_fn, name).state_dict(), getattr(authors.step_fn, name).state_dict()
        assert mine.keys() == theirs.keys()
        for key in mine:
            if mine[key].is_floating_point():
                assert mine[key].dtype == torch.float64, f"{name}.{key}"
            torch.testing.assert_close(mine[key], theirs[key], rtol=0, atol=ATOL, msg=f"{name}.{key}")
            if name == "network" and mine[key].is_floating_point():
                moved += int((mine[key] - before[key]).abs().max() > 1e-6)
    assert moved > 10  # the update really changed the weights


def test_a_step_with_per_image_masks_is_not_the_authors_update(tmp_path):
    """The comparison above can tell: without the recipe's mask.shared, the weights differ."""
    overrides = [*TINY_OVERRIDES, "mask.ratio=0.15", "precision=fp64", f"output_dir={tmp_path}"]
    cfg = load_config(compose_config("recipe=reference", "mask.shared=false", *overrides))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ours, authors = bench.StepRunner(cfg), bench.StepRunner(cfg, authors=True)
    for name in ("network", "target", "prototypes"):
        getattr(authors.step_fn, name).load_state_dict(getattr(ours.step_fn, name).state_dict())
    authors.batch = ours.batch
    ours()
    authors()
    gap = max((p - q).abs().max().item()
              for p, q in zip(ours.step_fn.network.parameters(), authors.step_fn.network.parameters()))
    assert gap > 1000 * ATOL  # measured: 2e-3


# -------------------------------------- (d) protocol=reference: one lambda, no sweep

def test_lowshot_under_protocol_reference_uses_the_fixed_lambda_for_every_shot(tmp_path):
    """A tiny pre-training under recipe=reference (per-sample augmentation, full decode, fp32)
    runs and records the recipe; its evaluation under protocol=reference fits every split of
    every shot count, the 1-shot one included, at the authors' lambda without cross-validation."""
    run = msn.pretrain([*TINY_OVERRIDES, "recipe=reference", "train.max_steps=2", f"output_dir={tmp_path / 'run'}"])
    saved = flat(OmegaConf.to_container(OmegaConf.load(run["output_dir"] / "config.yaml")))
    for key, (authors, _) in RECIPE.items():
        assert saved[key] == authors, key
    out = tmp_path / "eval"
    returned = msn.lowshot(run["checkpoint"], data="synthetic", shots=[1, 2], overrides=[
        "protocol=reference", "splits=2", f"output_dir={out}", "cache=false", "progress=false", "plot=false",
        "data.synthetic_size=48",
    ])
    results = json.loads((out / "results.json").read_text())
    assert results == json.loads(json.dumps(returned))
    assert results["config"]["lambd"] == AUTHORS_LAMBDA and results["config"]["precision"] == "fp32"
    assert results["classifier"]["lambda_fixed"] == AUTHORS_LAMBDA
    assert results["feature"]["kind"] == "cls_pre_ln" and results["backbone"]["which"] == "target"
    assert set(results["shots"]) == {"1", "2"}
    for shot, entry in results["shots"].items():
        assert entry["lambda"] == [AUTHORS_LAMBDA] * 2, shot
        assert entry["lambda_selection"] == ["fixed"] * 2, shot
        for split in entry["splits"]:
            assert split["lambda"] == AUTHORS_LAMBDA and split["lambda_selection"] == "fixed"
            assert split["cv_folds"] == 0 and split["cv_scores"] == []  # no sweep ran
