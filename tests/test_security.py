"""Files a user is handed (weights, exports, run folders) cannot run code, leak a secret,
write outside their place or exhaust memory (docs/security.md). Each test plants the file an
attacker would and checks the marker that must never appear, the link target that must stay
unchanged, or the one-line refusal."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import msn
import msn.checkpoint
from msn.config import ConfigError
from msn.export import export, load_backbone
from msn.export.cli import main as export_main
from msn.train.state import rng_state, set_rng_state

from conftest import TINY_OVERRIDES, run_script
from cli_in_process import run_in_process
from test_safe_load import planted
from weights_helpers import small_config, write_run


def last_line(result) -> str:
    return result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small training checkpoint (two random encoders, prototypes, our config)."""
    out = tmp_path_factory.mktemp("run")
    return write_run(out, small_config(), 32, (1, 2), step=3, epoch=0)


@pytest.fixture(scope="module")
def hf_folder(run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "export"
    export(run["path"], folder, "hf")
    return folder


# ------------------------------------------------------------------ 1. no code from a weights file
@pytest.mark.parametrize("entry", ["msn-export", "msn.load_backbone", "eval_lowshot backbone=", "train init_from=",
                                   "train resume=FILE", "train resume=auto"])
def test_a_weights_file_that_runs_code_is_refused_by_every_entry_point(tmp_path, entry):
    marker = tmp_path / "marker"
    weights = planted(tmp_path / "pretrained.pth.tar", marker)
    out = tmp_path / "out"
    if entry == "msn-export":
        status = export_main([str(weights), "--format", "hf", "--output", str(out)])
        assert status == 2
    elif entry == "msn.load_backbone":
        with pytest.raises(ValueError, match="refused: it needs full unpickling"):
            msn.load_backbone(weights)
    else:
        if entry == "train resume=auto":  # a colleague's run folder, unpacked
            (out / "checkpoints").mkdir(parents=True)
            shutil.copy(weights, out / "checkpoints" / "latest.pt")
        script, override = {
            "eval_lowshot backbone=": ("eval_lowshot.py", [f"backbone={weights}", "data=synthetic"]),
            "train init_from=": ("train.py", [*TINY_OVERRIDES, f"init_from={weights}"]),
            "train resume=FILE": ("train.py", [*TINY_OVERRIDES, f"resume={weights}"]),
            "train resume=auto": ("train.py", list(TINY_OVERRIDES)),
        }[entry]
        result = run_in_process(script, *override, f"output_dir={out}", "train.max_steps=1" if script == "train.py" else "progress=false")
        assert result.returncode == 2, result.stderr[-2000:]
        assert "refused: it needs full unpickling" in last_line(result) and "trust_pickle=true" in last_line(result)
        assert len(last_line(result)) < 400 and "Traceback" not in result.stderr
    assert not marker.exists()


def test_the_trust_switch_reaches_the_loader(tmp_path, run):
    """``trust_pickle`` is the one way to read a full pickle; with it, the same entry point runs it."""
    marker = tmp_path / "marker"
    state = msn.checkpoint.load_checkpoint(run["path"])
    state["extra"] = {"note": __import__("test_safe_load").RunsCode(marker)}
    torch.save(state, tmp_path / "trusted.pt")
    with pytest.raises(ValueError, match="refused"):
        msn.load_backbone(tmp_path / "trusted.pt")
    assert not marker.exists()
    msn.load_backbone(tmp_path / "trusted.pt", trust_pickle=True)
    assert marker.exists()


def test_an_index_may_name_only_files_inside_its_folder(tmp_path, hf_folder):
    marker = tmp_path / "marker"
    folder = tmp_path / "downloaded"
    folder.mkdir()
    shutil.copy(hf_folder / "config.json", folder)
    planted(tmp_path / "elsewhere.bin", marker)
    for name in ("../elsewhere.bin", str(tmp_path / "elsewhere.bin"), "sub/../../elsewhere.bin"):
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"vit.embeddings.cls_token": name}}))
        with pytest.raises(ValueError, match="an index may only name files inside its folder"):
            load_backbone(folder)
    (folder / "inside.bin").symlink_to(tmp_path / "elsewhere.bin")  # a plain name, but a link that leaves
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"vit.embeddings.cls_token": "inside.bin"}}))
    with pytest.raises(ValueError, match="is a link that leaves the folder"):
        load_backbone(folder)
    assert not marker.exists()


def test_hub_layouts_still_load(tmp_path, hf_folder):
    """``pytorch_model.bin`` (a torch pickle of tensors) and a sharded safetensors index, both
    inside their folder, load to the same weights as the single-file export."""
    expected = load_backbone(hf_folder).backbone.state_dict()
    tensors = load_file(hf_folder / "model.safetensors")
    for layout in ("bin", "sharded"):
        folder = tmp_path / layout
        folder.mkdir()
        shutil.copy(hf_folder / "config.json", folder)
        if layout == "bin":
            torch.save(tensors, folder / "pytorch_model.bin")
        else:
            names = sorted(tensors)
            half = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
                    "model-00002-of-00002.safetensors": names[len(names) // 2:]}
            for file, keys in half.items():
                save_file({key: tensors[key] for key in keys}, folder / file)
            weight_map = {key: file for file, keys in half.items() for key in keys}
            (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        loaded = load_backbone(folder).backbone.state_dict()
        assert all(torch.equal(loaded[key], value) for key, value in expected.items())


def test_our_checkpoints_are_plain_data_and_resume_bitwise(tmp_path):
    out = tmp_path / "run"
    first = run_in_process("train.py", *TINY_OVERRIDES, "train.max_steps=2", f"output_dir={out}")
    assert first.returncode == 0, first.stderr[-2000:]
    state = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)  # no allow-list, nothing extra
    assert state["version"] == 2 and state["step"] == 2
    # the RNG streams survive the plain form exactly
    before = rng_state(torch.device("cpu"))
    draws = (torch.rand(3), __import__("numpy").random.rand(3), __import__("random").random())
    set_rng_state(before, torch.device("cpu"))
    again = (torch.rand(3), __import__("numpy").random.rand(3), __import__("random").random())
    assert torch.equal(draws[0], again[0]) and (draws[1] == again[1]).all() and draws[2] == again[2]


def test_a_version_1_checkpoint_is_refused_with_how_to_convert_and_converts_when_trusted(tmp_path):
    import numpy as np

    out = tmp_path / "run"
    assert run_in_process("train.py", *TINY_OVERRIDES, "train.max_steps=2", f"output_dir={out}").returncode == 0
    latest = out / "checkpoints" / "latest.pt"
    state = torch.load(latest, weights_only=True)
    name, keys, position, has_gauss, cached = state["rng"]["numpy"]
    old_numpy = (name, keys.numpy().astype(np.uint32), position, has_gauss, cached)
    state["rng"]["numpy"] = old_numpy
    for per_rank in state["rng_per_rank"]:
        per_rank["numpy"] = old_numpy
    state["version"] = 1
    torch.save(state, latest)  # what the previous release wrote: numpy objects in the pickle
    refused = run_in_process("train.py", *TINY_OVERRIDES, "train.max_steps=4", f"output_dir={out}")
    assert refused.returncode == 2
    assert "numpy" in last_line(refused) and "resuming once with trust_pickle=true rewrites them" in last_line(refused)
    converted = run_in_process("train.py", *TINY_OVERRIDES, "train.max_steps=4", "trust_pickle=true", f"output_dir={out}")
    assert converted.returncode == 0, converted.stderr[-2000:]
    assert torch.load(latest, weights_only=True)["version"] == 2


# ------------------------------------------------------------------ 2. writes never follow links
def plant_link(path):
    target = path.parent.parent / f"victim-{path.name}"
    target.write_text("precious\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)
    return target


def test_a_run_folder_with_planted_links(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    victims = [plant_link(out / "config.yaml"), plant_link(out / "metrics.tmp"), plant_link(out / "checkpoints" / "latest.pt")]
    result = run_in_process("train.py", *TINY_OVERRIDES, "train.max_steps=2", "resume=never", f"output_dir={out}")
    assert result.returncode == 2  # resume=never: a folder holding a checkpoint name is someone's run
    (out / "checkpoints" / "latest.pt").unlink()
    result = run_in_process("train.py", *TINY_OVERRIDES, "train.max_steps=2", f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert all(victim.read_text() == "precious\n" for victim in victims)
    assert not (out / "config.yaml").is_symlink() and "max_steps: 2" in (out / "config.yaml").read_text()

    metrics_victim = plant_link(tmp_path / "run2" / "metrics.jsonl")
    refused = run_in_process("train.py", *TINY_OVERRIDES, "train.max_steps=2", f"output_dir={tmp_path / 'run2'}")
    assert refused.returncode == 2 and "is a symbolic link" in last_line(refused)
    assert metrics_victim.read_text() == "precious\n"


@pytest.mark.parametrize("fmt", ["hf", "timm", "msn"])
def test_export_overwrite_replaces_links_and_never_writes_their_targets(tmp_path, run, fmt):
    out = tmp_path / "export"
    victims = [plant_link(out / name) for name in ("README.md", "msn_export.json", "config.json", "model.safetensors",
                                                    "weights.safetensors", "preprocessor_config.json")]
    written = export(run["path"], out, fmt, overwrite=True, lowshot=())
    assert all(victim.read_text() == "precious\n" for victim in victims)
    assert all(not path.is_symlink() for path in written)


def test_evaluation_outputs_and_feature_cache_replace_links(tmp_path, run):
    out = tmp_path / "eval"
    cache = tmp_path / "cache"
    victims = [plant_link(out / "results.json"), plant_link(out / "lowshot.png")]
    msn.lowshot(run["path"], data="synthetic", shots=[1], overrides=[
        f"output_dir={out}", f"cache_dir={cache}", "splits=1", "lambd=0.01", "progress=false", "data.synthetic_size=24"])
    assert all(victim.read_text() == "precious\n" for victim in victims)
    assert json.loads((out / "results.json").read_text())["schema"] == "msn-lowshot-results"
    meta = next(cache.glob("*.json"))
    meta.unlink()
    cache_victim = plant_link(meta)
    msn.lowshot(run["path"], data="synthetic", shots=[1], overrides=[
        f"output_dir={out}", f"cache_dir={cache}", "splits=1", "lambd=0.01", "progress=false", "data.synthetic_size=24"])
    assert cache_victim.read_text() == "precious\n"


# ------------------------------------------------------------------ 3. no secret, no local path in an export
def test_an_untrusted_config_is_data_and_exports_carry_no_local_path(tmp_path, run, monkeypatch):
    secret = "s3cr3t-value-never-written"
    monkeypatch.setenv("MSN_PLANTED_SECRET", secret)
    state = msn.checkpoint.load_checkpoint(run["path"])
    state["config"]["name"] = "${oc.env:MSN_PLANTED_SECRET}"
    state["config"]["logging"]["run_name"] = "a\\${oc.env:MSN_PLANTED_SECRET}"
    state["config"]["output_dir"] = str(tmp_path / "my-home" / "runs")
    state["config"]["data"]["root"] = str(tmp_path / "my-home" / "data")
    downloaded = msn.checkpoint.save_training_checkpoint({k: v for k, v in state.items() if k not in ("format", "version")},
                                                        tmp_path / "downloaded")
    first = export(downloaded, tmp_path / "hf", "hf")
    second = export(tmp_path / "hf", tmp_path / "hf-again", "hf")  # re-export of the export
    texts = [path.read_text() for path in [*first, *second] if path.suffix in (".json", ".md")]
    assert texts and not any(secret in text for text in texts)
    assert not any(str(tmp_path / "my-home") in text for text in texts)
    info = json.loads((tmp_path / "hf-again" / "msn_export.json").read_text())
    assert info["config"]["name"] == "${oc.env:MSN_PLANTED_SECRET}"  # kept as the text it is
    assert "output_dir" not in info["config"] and "root" not in info["config"]["data"]
    assert load_backbone(tmp_path / "hf-again").config.name == "${oc.env:MSN_PLANTED_SECRET}"


def test_a_config_of_the_wrong_shape_in_a_file_is_one_line(tmp_path, run):
    state = msn.checkpoint.load_checkpoint(run["path"])
    state["config"]["optim"]["lr"] = "fast"
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ConfigError) as caught:
        load_backbone(tmp_path / "bad.pt")
    assert str(caught.value).startswith(f"{tmp_path / 'bad.pt'}: config: optim.lr: ") and "\n" not in str(caught.value)


# ------------------------------------------------------------------ 4. architecture bounds
@pytest.mark.parametrize("field,value", [("depth", 400), ("embed_dim", 10**6), ("num_heads", 0), ("mlp_ratio", "x")])
def test_architecture_fields_out_of_range_are_refused_before_anything_is_built(tmp_path, run, monkeypatch, field, value):
    folder = tmp_path / "export"
    export(run["path"], folder, "msn")
    info = json.loads((folder / "msn_export.json").read_text())
    info["architecture"][field] = value
    info["config"] = None  # what a hand-edited export would carry
    (folder / "msn_export.json").write_text(json.dumps(info))

    def must_not_build(*args, **kwargs):
        raise AssertionError("a model was built from an out-of-range architecture")

    monkeypatch.setattr("msn.export.loading.build_backbone", must_not_build)
    with pytest.raises(ValueError, match=f"architecture out of range: {field}="):
        load_backbone(folder)


def test_a_checkpoint_config_out_of_range_is_refused_before_building(tmp_path, run, monkeypatch):
    state = msn.checkpoint.load_checkpoint(run["path"])
    state["config"]["model"]["depth"] = 400
    torch.save(state, tmp_path / "deep.pt")
    monkeypatch.setattr("msn.export.loading.build_network", lambda *a, **k: pytest.fail("built"))
    with pytest.raises(ValueError, match="architecture out of range: depth=400"):
        load_backbone(tmp_path / "deep.pt")


# ------------------------------------------------------------------ 5. the feature cache follows content
def test_weights_swapped_with_the_same_size_and_time_are_not_served_from_the_cache(tmp_path, run):
    path = tmp_path / "weights" / "latest.pt"
    path.parent.mkdir()
    shutil.copy(run["path"], path)
    overrides = [f"output_dir={tmp_path / 'eval'}", f"cache_dir={tmp_path / 'cache'}", "splits=1", "lambd=0.01",
                 "progress=false", "data.synthetic_size=24"]
    first = msn.lowshot(path, data="synthetic", shots=[1], overrides=overrides)
    stat = path.stat()
    state = msn.checkpoint.load_checkpoint(path)
    for tensor in state["target_encoder"].values():
        if tensor.is_floating_point():
            tensor.neg_()  # other weights, the same bytes' count
    msn.checkpoint.atomic_save(state, path)
    assert path.stat().st_size == stat.st_size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # `touch -r`: same size, same time
    second = msn.lowshot(path, data="synthetic", shots=[1], overrides=overrides)
    assert first["features_extracted"]["test"] > 0 and second["features_extracted"]["test"] > 0
    third = msn.lowshot(path, data="synthetic", shots=[1], overrides=overrides)
    assert third["features_extracted"]["test"] == 0  # the cache still serves unchanged weights


@pytest.mark.parametrize("script,name", [("train.py", "train.log"), ("train.py", ".hydra/config.yaml"),
                                         ("eval_lowshot.py", "eval_lowshot.log"), ("eval_lowshot.py", ".hydra/overrides.yaml")])
def test_hydra_never_writes_its_log_or_config_through_a_planted_link(tmp_path, script, name):
    out = tmp_path / "run"
    victim = plant_link(out / name) if "/" not in name else None
    if victim is None:
        (out / ".hydra").mkdir(parents=True)
        victim = tmp_path / "victim"
        victim.write_text("precious\n")
        (out / name).symlink_to(victim)
    overrides = [*TINY_OVERRIDES, "train.max_steps=1"] if script == "train.py" else ["baseline=pixels", "data=synthetic"]
    result = run_in_process(script, *overrides, f"output_dir={out}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {out / name}: is a symbolic link; a run folder's files are never written "
                                                  f"through links (remove it, or choose another output_dir)"]
    assert victim.read_text() == "precious\n"
    clean = run_in_process(script, *overrides, f"output_dir={tmp_path / 'clean'}")  # no link: Hydra's hooks run quietly
    assert clean.returncode == 0 and "Callback" not in clean.stderr, clean.stderr[-2000:]


# ------------------------------------------------------------------ found by an adversarial review
def test_a_head_wider_than_the_bounds_is_refused_before_it_is_built(tmp_path, run, monkeypatch):
    """The head's widths come from tensor shapes: a 300,000-wide ``fc1`` of one column is
    a small file, its ``fc2`` would be 335 GiB."""
    folder = tmp_path / "export"
    export(run["path"], folder, "msn")
    tensors = load_file(folder / "weights.safetensors")
    tensors["head.fc1.weight"] = torch.zeros(300_000, 1, dtype=torch.uint8)
    save_file(tensors, folder / "weights.safetensors")
    monkeypatch.setattr("msn.export.loading.ProjectionHead", lambda *a, **k: pytest.fail("head built"))
    with pytest.raises(ValueError, match="architecture out of range: hidden_dim=300000"):
        load_backbone(folder)


def test_fields_each_in_range_but_too_large_together_are_refused(tmp_path, run, monkeypatch):
    state = msn.checkpoint.load_checkpoint(run["path"])
    state["config"]["model"].update(depth=64, embed_dim=4096, num_heads=64, mlp_ratio=16.0)
    torch.save(state, tmp_path / "huge.pt")
    monkeypatch.setattr("msn.export.loading.build_network", lambda *a, **k: pytest.fail("built"))
    with pytest.raises(ValueError, match=r"architecture out of range: about 38\.\d G parameters"):
        load_backbone(tmp_path / "huge.pt")
    state["config"]["model"].update(depth=2, embed_dim=64, num_heads=4, mlp_ratio=4.0, patch_size=1)
    state["config"]["data"]["views"]["rand_size"] = 2048
    torch.save(state, tmp_path / "tokens.pt")
    with pytest.raises(ValueError, match="4194304 patch tokens per image"):
        load_backbone(tmp_path / "tokens.pt")


def test_an_expanded_tensor_is_refused(tmp_path):
    """A stride-0 view stores one row but claims a million: the file is small, any copy huge."""
    torch.save({"target_encoder": {"cls_token": torch.zeros(1, 64).expand(1_000_000, 64)}}, tmp_path / "x.pt")
    assert (tmp_path / "x.pt").stat().st_size < 10_000
    with pytest.raises(ValueError, match=r"refused: tensor target_encoder.cls_token \(1000000, 64\) claims more elements"):
        load_backbone(tmp_path / "x.pt")


def test_a_path_handed_to_the_api_is_never_an_override_or_interpolation(tmp_path, run, monkeypatch):
    monkeypatch.setenv("MSN_PLANTED_SECRET", "s3cr3t")
    folder = tmp_path / "m_${oc.env:MSN_PLANTED_SECRET}"
    folder.mkdir()
    shutil.copy(run["path"], folder / "latest.pt")
    results = msn.lowshot(folder / "latest.pt", data="synthetic", shots=[1], overrides=[
        f"output_dir={tmp_path / 'eval'}", "cache=false", "splits=1", "lambd=0.01", "progress=false",
        "data.synthetic_size=24"])
    assert results["config"]["backbone"] == str(folder / "latest.pt")
    assert "s3cr3t" not in (tmp_path / "eval" / "results.json").read_text()


def test_a_fifo_or_a_linked_checkpoints_folder_in_a_run_folder_is_one_line(tmp_path):
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "metrics.jsonl")
    blocked = run_script("train.py", *TINY_OVERRIDES, "train.max_steps=1", f"output_dir={fifo}", timeout=120)
    assert blocked.returncode == 2 and last_line(blocked).endswith("metrics.jsonl: is not a regular file (remove it, "
                                                                   "or choose another output_dir)")
    linked = tmp_path / "linked"
    linked.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (linked / "checkpoints").symlink_to(tmp_path / "elsewhere")
    refused = run_in_process("train.py", *TINY_OVERRIDES, "train.max_steps=1", f"output_dir={linked}")
    assert refused.returncode == 2 and "checkpoints: is a symbolic link" in last_line(refused)
    assert not any((tmp_path / "elsewhere").iterdir())


# ------------------------------------------------------------------ the rest of docs/security.md's list
def test_msn_export_takes_the_trust_switch_explicitly(tmp_path, run):
    marker = tmp_path / "marker"
    state = msn.checkpoint.load_checkpoint(run["path"])
    state["extra"] = {"note": __import__("test_safe_load").RunsCode(marker)}
    torch.save(state, tmp_path / "mine.pt")
    assert export_main([str(tmp_path / "mine.pt"), "--format", "msn", "--output", str(tmp_path / "a")]) == 2
    assert not marker.exists()
    assert export_main([str(tmp_path / "mine.pt"), "--format", "msn", "--output", str(tmp_path / "b"),
                        "--trust-pickle"]) == 0
    assert marker.exists() and (tmp_path / "b" / "weights.safetensors").is_file()


def test_every_local_path_key_is_left_out_of_what_is_shared(tmp_path):
    from msn.config import LOCAL_PATH_KEYS, MSNConfig, from_dict, shareable_dict

    values = {**msn.config.to_dict(MSNConfig()), "output_dir": "/home/alice/runs/x", "resume": "/home/alice/x.pt",
              "init_from": "/home/alice/init.pt"}
    values["data"]["root"], values["monitor"]["root"] = "/home/alice/data", "/home/alice/labelled"
    shared = shareable_dict(from_dict(values))
    assert "/home/alice" not in json.dumps(shared)
    assert set(LOCAL_PATH_KEYS) == {"output_dir", "resume", "init_from", "data.root", "monitor.root"}


def test_a_planted_feature_cache_file_is_never_unpickled(tmp_path, run):
    """A ``<cache_dir>/<key>.pt`` someone else prepared: refused like any torch file, then rebuilt."""
    overrides = [f"output_dir={tmp_path / 'eval'}", f"cache_dir={tmp_path / 'cache'}", "splits=1", "lambd=0.01",
                 "progress=false", "data.synthetic_size=24"]
    msn.lowshot(run["path"], data="synthetic", shots=[1], overrides=overrides)
    marker = tmp_path / "marker"
    for cached in (tmp_path / "cache").glob("*.pt"):
        planted(cached, marker)
    again = msn.lowshot(run["path"], data="synthetic", shots=[1], overrides=overrides)
    assert not marker.exists() and again["features_extracted"]["test"] > 0


def test_finetune_checks_a_timm_folders_architecture_before_timm_builds_it(tmp_path, run, monkeypatch):
    from msn.eval.finetune.routes import load_timm

    folder = tmp_path / "timm"
    export(run["path"], folder, "timm")
    config = json.loads((folder / "config.json").read_text())
    config["model_args"]["depth"] = 400
    (folder / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr("timm.create_model", lambda *a, **k: pytest.fail("timm built it"))
    with pytest.raises(ValueError, match="architecture out of range: depth=400"):
        load_timm(folder)


def test_subset_files_replace_a_planted_link(tmp_path):
    from msn.eval.subsets import write_subset_file

    victim = plant_link(tmp_path / "subsets" / "1imgs_class.txt")
    write_subset_file(tmp_path / "subsets" / "1imgs_class.txt", ["a_1.png", "b_2.png"])
    assert victim.read_text() == "precious\n"
    assert (tmp_path / "subsets" / "1imgs_class.txt").read_text() == "a_1.png\nb_2.png\n"
