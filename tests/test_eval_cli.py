"""End-to-end ``eval_lowshot.py`` on synthetic images with a tiny checkpoint of ours."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import msn.config
from msn.checkpoint import save_training_checkpoint
from msn.config_files import CONFIG_DIR
from msn.eval.config import load_eval_config
from msn.eval.lowshot import run_lowshot
from msn.models import build_network

from cli_in_process import run_in_process
def synthetic(**overrides) -> dict:
    """``configs/data/synthetic.yaml`` (what ``data=synthetic`` selects) with overrides."""
    return {**OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "data" / "synthetic.yaml")), **overrides}


FAST = ["lambd_grid=[0.01,1.0]", "cv_folds=2", "progress=false", "data.synthetic_size=48"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny training checkpoint written the way the trainer writes one."""
    cfg = msn.config.load_config({
        "model": {"arch": "vit_mini", "depth": 2, "patch_size": 8},
        "head": {"hidden_dim": 32, "output_dim": 16},
        "loss": {"num_prototypes": 8},
        "data": {"name": "synthetic", "views": {"rand_size": 32, "focal_size": 16}},
    })
    torch.manual_seed(0)
    online = build_network(cfg.model, cfg.head, cfg.data.views.rand_size)
    target = build_network(cfg.model, cfg.head, cfg.data.views.rand_size)
    run_dir = tmp_path_factory.mktemp("run")
    return save_training_checkpoint(
        {"config": msn.config.to_dict(cfg), "encoder": online.state_dict(), "target_encoder": target.state_dict(),
         "prototypes": torch.randn(8, 16), "optimizer": {}, "step": 0, "epoch": 0, "rng": {}},
        run_dir,
    )


def run_cli(*overrides: str) -> subprocess.CompletedProcess:
    """``python eval_lowshot.py overrides...``, run in this process."""
    return run_in_process("eval_lowshot.py", *overrides, env={"HYDRA_FULL_ERROR": "1"})


@pytest.fixture(scope="module")
def cli_run(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    result = run_cli(f"backbone={checkpoint}", "data=synthetic", "shots=[1,2,3]", "splits=2", "percent=25",
                     f"output_dir={out}", f"cache_dir={out / 'cache'}", *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_cli_writes_table_results_json_chart_and_subsets(cli_run, checkpoint):
    out, result = cli_run
    assert "labelled/class" in result.stdout and "k-NN top-1 (k=20)" in result.stdout
    for row in ("| 1 ", "| 2 ", "| 3 ", "| 25% "):
        assert row in result.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["schema"] == "msn-lowshot-results" and results["schema_version"] == 1
    assert results["backbone"]["path"] == str(checkpoint) and results["backbone"]["which"] == "target"
    assert results["baseline"] is None
    assert results["feature"]["kind"] == "cls_pre_ln" and results["feature"]["dim"] == 128
    assert results["data"]["name"] == "synthetic" and results["data"]["classes"] == 4
    assert results["data"]["test_images_used"] == results["data"]["test_images"] == 12
    assert set(results["shots"]) == {"1", "2", "3"}
    for key, entry in results["shots"].items():
        assert len(entry["accuracy"]) == len(entry["lambda"]) == len(entry["knn_accuracy"]) == 2
        assert entry["mean"] == pytest.approx(sum(entry["accuracy"]) / 2)
        assert 0 <= entry["knn_mean"] <= 100 and entry["std"] >= 0 and entry["knn_std"] >= 0
        assert entry["images_per_class"] == int(key)
        assert entry["train_size"] == [4 * int(key)] * 2
        assert all(v in (0.01, 1.0) or m == "fallback" for v, m in zip(entry["lambda"], entry["lambda_selection"]))
    assert results["shots"]["1"]["lambda_selection"] == ["fallback"] * 2
    assert results["shots"]["2"]["lambda_selection"] == ["cv"] * 2
    percent = results["percent"]["25"]
    assert percent["percent"] == 25 and percent["images_per_class"] == 3  # 25% of 12 per class
    assert results["wall_time_s"] > 0 and results["timing"]["total_s"] == results["wall_time_s"]
    assert results["knn"] == {"k": 20, "temperature": 0.07, "similarity": "cosine"}
    assert (out / "lowshot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # generated subsets, reference format, nested
    one = (out / "subsets" / "split0" / "1imgs_class.txt").read_text().split()
    three = (out / "subsets" / "split0" / "3imgs_class.txt").read_text().split()
    assert len(one) == 4 and len(three) == 12 and set(one) < set(three)
    assert results["shots"]["3"]["splits"][0]["file"] == str(out / "subsets" / "split0" / "3imgs_class.txt")


def test_rerun_from_written_subset_files_uses_the_cache_and_agrees(cli_run, checkpoint, tmp_path):
    out, _ = cli_run
    first = json.loads((out / "results.json").read_text())
    cfg = load_eval_config({
        "backbone": str(checkpoint), "data": synthetic(synthetic_size=48),
        "shots": [1, 2, 3], "percent": 25, "subset_dirs": [str(out / "subsets" / f"split{s}") for s in (0, 1)],
        "lambd_grid": [0.01, 1.0], "cv_folds": 2, "output_dir": str(tmp_path), "cache_dir": str(out / "cache"),
        "progress": False, "plot": False,
    })
    second = run_lowshot(cfg)
    assert second["features_extracted"] == {**second["features_extracted"], "train": 0, "test": 0}
    for key in ("1", "2", "3"):
        assert second["shots"][key]["accuracy"] == first["shots"][key]["accuracy"]
        assert second["shots"][key]["lambda"] == first["shots"][key]["lambda"]
    assert second["percent"]["25"]["accuracy"] == first["percent"]["25"]["accuracy"]


@pytest.mark.parametrize("baseline", ["pixels", "random"])
def test_baselines_and_fixed_lambda(baseline, checkpoint, tmp_path):
    cfg = load_eval_config({
        "backbone": str(checkpoint), "baseline": baseline, "data": synthetic(),
        "shots": [2], "splits": 1, "lambd": 0.5, "output_dir": str(tmp_path), "cache": False, "progress": False,
        "plot": False,
    })
    results = run_lowshot(cfg)
    entry = results["shots"]["2"]
    assert entry["lambda"] == [0.5] and entry["lambda_selection"] == ["fixed"]
    assert results["baseline"] == baseline
    if baseline == "pixels":
        assert results["feature"]["kind"] == "pixels" and results["feature"]["dim"] == 3 * 32 * 32
    else:
        assert results["feature"]["kind"] == "cls_pre_ln" and results["backbone"]["random_seed"] == 0


def test_bad_subset_file_is_one_line_error(checkpoint, tmp_path):
    folder = tmp_path / "subsets"
    folder.mkdir()
    (folder / "1imgs_class.txt").write_text("0_synthetic00000\n1_synthetic00001\n2_nope01\n3_nope02\n")
    result = run_cli(f"backbone={checkpoint}", "data=synthetic", "shots=[1]", f"subset_dirs=[{folder}]",
                     f"output_dir={tmp_path / 'out'}", "cache=false", *FAST)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: subsets: 2 of 4 names in ")
    assert "2_nope01, 3_nope02" in lines[0]


def test_config_errors_are_one_line(tmp_path):
    result = run_cli("data=synthetic", "shots=[0,2]", "baseline=pixels", f"output_dir={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: shots: every value must be >= 1, got [0, 2]"]
    config = load_eval_config  # the rest without a subprocess
    with pytest.raises(msn.config.ConfigError, match="^backbone: is required"):
        config({"data": {"name": "synthetic"}, "output_dir": str(tmp_path)})
    with pytest.raises(msn.config.ConfigError, match="^feature: must be one of"):
        config({"data": {"name": "synthetic"}, "baseline": "pixels", "feature": "cls", "output_dir": str(tmp_path)})
    with pytest.raises(msn.config.ConfigError, match="^lambd: must be positive"):
        config({"data": {"name": "synthetic"}, "baseline": "pixels", "lambd": -1, "output_dir": str(tmp_path)})
    with pytest.raises(msn.config.ConfigError, match="^percent_file: needs percent"):
        config({"data": {"name": "synthetic"}, "baseline": "pixels", "percent_file": __file__})
    with pytest.raises(msn.config.ConfigError, match="^shots: class"):
        run_lowshot(config({"data": synthetic(synthetic_size=16), "baseline": "pixels", "shots": [5],
                            "output_dir": str(tmp_path), "cache": False, "progress": False}))


def test_an_override_of_a_key_that_does_not_exist_is_refused_by_hydra(tmp_path):
    """docs/eval.md: an override of a key that does not exist, without ``+``, is refused by
    Hydra itself, exit code 1 (and nothing is evaluated)."""
    result = run_cli("baseline=pixels", "data=synthetic", "nosuchkey=1", f"output_dir={tmp_path / 'out'}")
    assert result.returncode == 1 and "nosuchkey" in result.stderr
    assert not (tmp_path / "out" / "results.json").exists()
