"""Behaviours that README.md and docs/*.md promise, each checked by running the code that
keeps the promise: a test here fails when the page and the code part."""

from __future__ import annotations

import contextlib
import os
import tarfile

import pytest
import torch
from _pytest.outcomes import Skipped  # what a skip raises (the helper's skip path, caught below)
from conftest import RUN_SPECIFIC, assert_same_state, first_batch, jpeg_folder

import conftest
from msn.train import Trainer


# ------------------------------------------------------------- docs/training.md "Key settings": seed
def network_state(trainer) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in trainer.msn_step.network.state_dict().items()}
    state["prototypes"] = trainer.msn_step.prototypes.weight.detach().clone()
    return state


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_seed_sets_initial_weights_data_order_augmentation_and_masks(tiny_config, tmp_path):
    """docs/training.md "Key settings": `seed` (default 0) "seeds model init, data order, augmentation and
    masks": the same seed gives the same four, another seed changes each of them (the synthetic
    images themselves do not depend on the run's seed, so the views differ by augmentation)."""
    from msn.data import build_dataset
    from msn.data.build import build_multiview_data

    def observe(seed: int, name: str) -> dict:
        cfg = tiny_config(output_dir=tmp_path / name, seed=seed)
        trainer = Trainer(cfg)
        trainer.sampler.set_position(0, 0)
        order = [index for _, index in trainer.sampler]
        data, collate = build_multiview_data(build_dataset(cfg.data, train=True), cfg.data, seed)
        views = collate([data[(0, index)] for index in range(4)])  # the same images for every seed
        masks = trainer.msn_step.masks(0, cfg.optim.batch_size, torch.device("cpu"))
        result = {"weights": network_state(trainer), "order": order, "target": views.target.clone(),
                  "anchor": views.anchor.clone(), "focal": views.focal.clone(), "masks": masks.clone()}
        trainer.close_loader()
        return result

    first, again, other = observe(0, "a"), observe(0, "b"), observe(1, "c")
    assert same_tensors(first["weights"], again["weights"])
    assert first["order"] == again["order"]
    for key in ("target", "anchor", "focal", "masks"):
        assert torch.equal(first[key], again[key]), key
    assert not same_tensors(first["weights"], other["weights"])
    assert sorted(first["order"]) == sorted(other["order"]) and first["order"] != other["order"]
    for key in ("target", "anchor", "focal", "masks"):
        assert first[key].shape == other[key].shape and not torch.equal(first[key], other[key]), key


# ------------------------------------------- docs/reference_switches.md: loss.proto_grad_reduce
def test_proto_grad_reduce_sum_and_mean_are_the_same_on_one_process(tiny_config, tmp_path):
    """docs/reference_switches.md (`loss.proto_grad_reduce`) and docs/method.md Sec. 4: the
    prototypes' gradient summed over ranks (the reference) or averaged; "on one process both
    are the same": three steps with each end in bitwise-equal checkpoints."""
    runs = {}
    for reduce in ("sum", "mean"):
        cfg = tiny_config(output_dir=tmp_path / reduce, loss={"num_prototypes": 8, "proto_grad_reduce": reduce},
                          train={"log_every": 2, "progress": False, "max_steps": 3})
        Trainer(cfg).fit()
        runs[reduce] = torch.load(tmp_path / reduce / "checkpoints" / "latest.pt", weights_only=True)
    assert runs["sum"]["config"]["loss"]["proto_grad_reduce"] == "sum"  # the switch reached the run
    assert ("config",) in RUN_SPECIFIC
    assert assert_same_state(runs["sum"], runs["mean"]) > 10
    assert runs["sum"]["step"] == 3


# ------------------------------------------- docs/testing.md "What the tests promise": the helpers
def test_require_dir_fails_under_ci_and_skips_otherwise(tmp_path, monkeypatch):
    """docs/testing.md "What the tests promise": "Tests that need the Fashion-MNIST package or the
    standard ImageNet split files ... skip on a machine without them, but fail under `CI=true`"
    (both go through `conftest.require_dir`)."""
    missing = tmp_path / "absent"
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"data not found at .*absent \(CI=true: required\)"):
        conftest.require_dir(missing, "data")
    monkeypatch.setenv("CI", "TRUE")
    with pytest.raises(pytest.fail.Exception):
        conftest.require_dir(missing, "data")
    for value in ("false", ""):
        monkeypatch.setenv("CI", value)
        with pytest.raises(Skipped, match="data not found at"):
            conftest.require_dir(missing, "data")
    monkeypatch.delenv("CI")
    with pytest.raises(Skipped):
        conftest.require_dir(missing, "data")
    assert conftest.require_dir(tmp_path, "data") == tmp_path  # present: neither
    monkeypatch.setenv("CI", "true")
    assert conftest.require_dir(tmp_path, "data") == tmp_path


def test_msn_test_deterministic_turns_on_deterministic_algorithms(monkeypatch):
    """docs/testing.md "What the tests promise": "`MSN_TEST_DETERMINISTIC=1 make test` runs the suite
    under `torch.use_deterministic_algorithms`" (conftest's `pytest_configure` hook; without the
    variable it leaves the setting alone)."""
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        monkeypatch.delenv("MSN_TEST_DETERMINISTIC", raising=False)
        conftest.pytest_configure(None)
        assert not torch.are_deterministic_algorithms_enabled()
        monkeypatch.setenv("MSN_TEST_DETERMINISTIC", "1")
        conftest.pytest_configure(None)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before)


# --------------------------------------------------------- docs/formats.md Sec. 9: msn-shards
def test_shards_written_twice_from_the_same_folder_are_the_same_bytes(tmp_path):
    """docs/formats.md Sec. 9: "Member times are 0, so the same folder gives the same bytes"
    (the second write after every source file's time was changed, with another thread count)."""
    from msn.data.shard_writer import write_shards

    src = tmp_path / "src"
    jpeg_folder(src, count=7)
    write_shards(src, tmp_path / "a", samples_per_shard=3, progress=False, workers=1)
    for folder, _, files in os.walk(src):
        for name in files:
            os.utime(os.path.join(folder, name), (1_000_000_000, 1_234_567_890))
    write_shards(src, tmp_path / "b", samples_per_shard=3, progress=False, workers=3)
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == sorted(os.listdir(tmp_path / "b")) and "index.json" in names and len(names) == 4
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    with tarfile.open(tmp_path / "a" / "shard-000000.tar") as tar:
        assert {member.mtime for member in tar.getmembers()} == {0}


def test_a_shard_reader_does_one_pread_per_image_and_never_parses_tar(tmp_path, monkeypatch):
    """docs/formats.md Sec. 9: "A reader gets an image with one `pread(size, offset)`; it never
    parses a tar header" (and the image is the source folder's, decoded the same way)."""
    from msn.data import ShardedImages, read_index, write_shards

    src = tmp_path / "src"
    folder = jpeg_folder(src, count=5)
    write_shards(src, tmp_path / "shards", samples_per_shard=2, progress=False)
    index = read_index(tmp_path / "shards")
    expected = [(size, offset) for entry in index["shards"] for size, offset in zip(entry["sizes"], entry["offsets"])]

    def no_tar(*args, **kwargs):
        raise AssertionError("the reader parsed a tar file")

    monkeypatch.setattr(tarfile, "open", no_tar)
    monkeypatch.setattr(tarfile.TarFile, "__init__", no_tar)
    reads, real_pread = [], os.pread

    def pread(fd, size, offset):
        reads.append((size, offset))
        return real_pread(fd, size, offset)

    monkeypatch.setattr(os, "pread", pread)
    shards = ShardedImages(tmp_path / "shards")
    for i in range(len(folder)):
        before = len(reads)
        image, label = shards[i]
        assert reads[before:] == [expected[i]]
        source_image, source_label = folder[i]
        assert label == source_label and torch.equal(image, source_image)


# ------------------------------------------------------------------- docs/method.md Sec. 1
def test_no_solarisation_in_any_augmentation_mode():
    """docs/method.md Sec. 1: every view gets flip, colour jitter, grayscale, blur and
    normalisation. "No solarisation." (every mode, `per_sample` included, applies the
    parameters msn.data.view_params draws, and the per-image path only the jitter functionals)."""
    import dataclasses

    from msn.config import MSNConfig
    from msn.data.batch_augment import BatchPhotometric, PhotometricParams
    from msn.data.transforms import JITTER_FUNCTIONALS

    views = MSNConfig().data.views
    names = [function.__name__ for function in JITTER_FUNCTIONALS]
    assert names == ["adjust_brightness", "adjust_contrast", "adjust_saturation", "adjust_hue"], names
    fields = [f.name for f in dataclasses.fields(PhotometricParams)]
    assert {"jitter", "gray", "blur", "sigma"} <= set(fields)
    assert fields and not [f for f in fields if "solar" in f.lower()]
    assert not [a for a in vars(BatchPhotometric(views, views.rand_size)) if "solar" in a.lower()]


# ------------------------------------------------------------------------------------ docs/scaling.md
def test_torchrun_variables_take_precedence_over_slurms(monkeypatch):
    """docs/scaling.md "Slurm": "torchrun's variables take precedence over Slurm's" and
    "`dist.slurm_env=never` ignores the Slurm variables altogether"."""
    from msn import distributed

    slurm = {"SLURM_PROCID": "3", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1",
             "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_JOB_ID": "77"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    assert distributed.read_env("never") == distributed.DistEnv(0, 1, 0, "none")
    assert "RANK" not in os.environ
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.read_env("auto") == distributed.DistEnv(1, 2, 1, "torchrun")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key)
    assert distributed.read_env("auto") == distributed.DistEnv(3, 4, 1, "slurm")  # Slurm's, without torchrun's


@pytest.mark.parametrize("device,expected", [("cpu", "gloo"), ("cuda", "nccl")])
def test_auto_backend_is_nccl_on_cuda_and_gloo_on_the_cpu(device, expected, monkeypatch):
    """docs/scaling.md "Processes and the global batch": "`train.py` builds the process group
    from their environment (NCCL on CUDA, gloo on the CPU)"; docs/scaling.md: `dist.backend`
    auto. (The process group itself is not created: its creation is replaced by a recorder;
    for `cuda` the device lookup too, so this runs without a GPU.)"""
    from msn import distributed

    created = {}
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kwargs: created.update(kwargs))
    if device == "cuda":
        monkeypatch.setattr(distributed, "resolve_device", lambda name, local_rank: torch.device("cuda", local_rank))
        monkeypatch.setattr(torch.cuda, "set_device", lambda target: created.setdefault("set_device", target))
    env = distributed.init_from_env(device=device, backend="auto", timeout_min=30.0, slurm="never")
    assert env == distributed.DistEnv(0, 2, 1, "torchrun")
    assert created["backend"] == expected and (created["rank"], created["world_size"]) == (0, 2)
    if device == "cuda":
        assert created["set_device"] == torch.device("cuda", 1)  # every process uses cuda:LOCAL_RANK


# ------------------------------------------------------------------- docs/eval.md Live monitor
def test_the_monitor_fits_at_lambd_fallback_without_cross_validation(tiny_config, monkeypatch):
    """docs/eval.md "Live monitor": "logistic regression on `k` images per class of the pool,
    averaged over `monitor.splits` (3) seeded subsets, at the fixed lambda `lambd_fallback`
    (no cross-validation ...)"."""
    import msn.eval.classifier as classifier
    import msn.eval.monitor as monitor
    from msn.data import build_dataset
    from msn.eval.config import EvalConfig
    from msn.models import build_vit

    cfg = tiny_config(monitor={"enabled": True, "train_images": 16, "test_images": 8, "shots": [1, 2], "splits": 3})
    probe = monitor.LowShotProbe(build_dataset(cfg.data, train=True), cfg)
    lambdas, real_fit = [], monitor.fit_logistic_regression

    def fit(features, labels, num_classes, lambd, *args, **kwargs):
        lambdas.append(lambd)
        return real_fit(features, labels, num_classes, lambd, *args, **kwargs)

    def no_cv(*args, **kwargs):
        raise AssertionError("the monitor cross-validated lambda")

    monkeypatch.setattr(monitor, "fit_logistic_regression", fit)
    monkeypatch.setattr(classifier, "select_lambda", no_cv)
    torch.manual_seed(0)
    backbone = build_vit("vit_mini", 8, 32, depth=1, embed_dim=32, num_heads=2).eval()
    values = probe(backbone, torch.device("cpu"), torch.float32, contextlib.nullcontext)
    assert set(values) == {"monitor/knn_top1", "monitor/1shot", "monitor/2shot"}
    assert lambdas == [EvalConfig.lambd_fallback] * (2 * 3)  # 2 shot counts x 3 splits


# ------------------------------------------- docs/export.md "msn-export: the commands": reference -> hf
def test_a_reference_release_file_converts_to_a_transformers_folder(tmp_path):
    """docs/export.md "msn-export: the commands": "the reference's released weights
    convert the same way: `msn-export vits16_800ep.pth.tar --format hf --output ...`": a file of
    the released layout (docs/formats.md Sec. 5: `target_encoder` with `module.` and
    `module.fc.` names, `prototypes`) becomes a folder that `ViTMSNModel.from_pretrained` loads
    with no missing or unexpected key, computing the reference encoder's tokens."""
    from transformers import ViTMSNModel

    import msn.config
    import msn.models
    from msn.export.cli import main as main_export
    from weights_helpers import EXACT_BUT_FP32_SOFTMAX, float64, randomize

    cfg = msn.config.load_config({
        "data": {"name": "synthetic", "views": {"rand_size": 32, "focal_size": 16}},
        "model": {"arch": "vit_tiny", "depth": 2, "embed_dim": 192, "num_heads": 3, "patch_size": 8},
        "head": {"hidden_dim": 48, "output_dim": 24}, "loss": {"num_prototypes": 16}})
    network = randomize(msn.models.build_network(cfg.model, cfg.head, 32), 5, int_fill=3).eval()
    state = {"module." + k: v.clone() for k, v in network.backbone.vit.state_dict().items()}
    state.update({"module.fc." + k: v.clone() for k, v in network.head.state_dict().items()})
    path = tmp_path / "vits16_800ep.pth.tar"
    torch.save({"target_encoder": state, "prototypes": torch.randn(16, 24)}, path)

    out = tmp_path / "vit-msn-small"
    assert main_export([str(path), "--format", "hf", "--output", str(out)]) == 0
    model, info = ViTMSNModel.from_pretrained(out, attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).double()
    with torch.no_grad():
        theirs = model.double().eval()(x).last_hidden_state
        ours, _ = float64(network).backbone.forward_blocks(x)
    torch.testing.assert_close(theirs, ours, **EXACT_BUT_FP32_SOFTMAX)
