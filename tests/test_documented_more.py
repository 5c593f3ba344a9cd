"""Documented sentences, each checked against the code it describes.

Every test names the page and section whose sentence it keeps true: the export loader's
single reads and format table (docs/architecture.md, docs/formats.md), the choice of lambda,
the solver's threads and the results' statistics (docs/eval.md), ``img_per_s`` (docs/training.md)
and the target head's batch norms (docs/method.md).
"""

from __future__ import annotations

import collections
import json
import shutil
import statistics
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

import msn
import msn.eval.classifier as classifier
import msn.export.export_record
import msn.export.onnx_format
import msn.export.path_probe
import msn.export.weight_files
from msn.export import FORMATS, export, load_backbone
from msn.train import Trainer
from weights_helpers import small_config, write_run

SIZE, HEADS = 32, 4


# ------------------------------------------------------------------ shared weights
@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A training run folder (two distinct random encoders) and its msn / hf / timm exports."""
    root = tmp_path_factory.mktemp("documented_more")
    cfg = small_config(size=SIZE, heads=HEADS)
    run = write_run(root / "run", cfg, SIZE, seeds=(1, 2), step=7, epoch=1)
    folders = {}
    for fmt in ("msn", "hf", "timm"):
        folders[fmt] = root / f"export_{fmt}"
        export(run["path"], folders[fmt], format=fmt)
    return {"root": root, "run": run, "run_dir": root / "run", **folders}


def vit_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_backbone(loaded, expected: torch.nn.Module) -> None:
    ours = loaded.backbone.vit.state_dict()
    theirs = expected.backbone.vit.state_dict()
    assert ours.keys() == theirs.keys()
    for key, tensor in theirs.items():
        assert torch.equal(ours[key], tensor), key


def copy_folder(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination


# ------------------------------------------------------------------ 1. each file read at most once
@pytest.fixture
def reads(monkeypatch):
    """Counts, per path, the torch / safetensors / JSON reads done while loading."""
    counts: collections.Counter[str] = collections.Counter()

    def counting(function, path_of=lambda args, kwargs: args[0]):
        def spy(*args, **kwargs):
            counts[str(Path(path_of(args, kwargs)).resolve())] += 1
            return function(*args, **kwargs)
        return spy

    torch_spy = counting(msn.export.weight_files.load_torch_file)
    monkeypatch.setattr(msn.export.weight_files, "load_torch_file", torch_spy)
    monkeypatch.setattr(safetensors.torch, "load_file", counting(safetensors.torch.load_file))
    json_spy = counting(msn.export.weight_files.read_json)
    for module in (msn.export.weight_files, msn.export.path_probe, msn.export.export_record, msn.export.onnx_format):
        monkeypatch.setattr(module, "read_json", json_spy)
    return counts


@pytest.mark.parametrize("which", ["checkpoint file", "run folder", "msn", "hf", "timm"])
def test_probe_reads_each_file_at_most_once(made, reads, which):
    """docs/architecture.md "One export, through the code", item 2: ``load_backbone`` probes the
    path against ``FORMATS`` in order (``Probe``: each file is read at most once)."""
    path = {"checkpoint file": made["run"]["path"], "run folder": made["run_dir"],
            "msn": made["msn"], "hf": made["hf"], "timm": made["timm"]}[which]
    weights_file = {"checkpoint file": made["run"]["path"], "run folder": made["run"]["path"],
                    "msn": made["msn"] / "weights.safetensors", "hf": made["hf"] / "model.safetensors",
                    "timm": made["timm"] / "model.safetensors"}[which]
    loaded = load_backbone(path)
    assert_backbone(loaded, made["run"]["target"])
    assert reads[str(Path(weights_file).resolve())] == 1, dict(reads)  # the spies saw the read
    assert all(count == 1 for count in reads.values()), dict(reads)


def test_probe_reads_a_bare_weights_file_once(made, reads, tmp_path):
    """docs/architecture.md "One export, through the code", item 2 (``Probe``: each file is read
    at most once), for a bare torch file that every format's sniffer and the marker search see."""
    path = tmp_path / "bare.pt"
    torch.save({"state_dict": vit_state(made["run"]["online"].backbone.vit)}, path)
    loaded = load_backbone(path, num_heads=HEADS)
    assert_backbone(loaded, made["run"]["online"])
    assert dict(reads) == {str(path.resolve()): 1}


# ------------------------------------------------------------------ 4. the format table's order and markers
def test_format_table_is_tried_in_the_documented_order():
    """docs/formats.md Sec. 7: a path is tried against the entries in the table's order
    (msn-checkpoint, msn, msn-reference-checkpoint, msn-reference-release, hf, timm, onnx)."""
    assert list(FORMATS) == ["msn-checkpoint", "msn", "msn-reference-checkpoint", "msn-reference-release",
                             "hf", "timm", "onnx"]


def test_a_folder_of_two_formats_is_read_as_the_first_in_table_order(made, tmp_path):
    """docs/formats.md Sec. 7: a path is tried against the entries in the table's order, so a
    folder that two formats recognise is read as the earlier one."""
    # msn-checkpoint before msn: a run folder that also holds weights.safetensors
    both = copy_folder(made["run_dir"], tmp_path / "run_and_msn")
    shutil.copy(made["msn"] / "weights.safetensors", both / "weights.safetensors")
    loaded = load_backbone(both, which="online")
    assert loaded.source["format"] == "msn-checkpoint"
    assert_backbone(loaded, made["run"]["online"])

    # msn before hf: an msn export folder that also holds an hf config.json
    both = copy_folder(made["msn"], tmp_path / "msn_and_hf")
    shutil.copy(made["hf"] / "config.json", both / "config.json")
    assert load_backbone(both).source["format"] == "msn"

    # hf before timm: a config.json with model_type vit_msn AND an architecture
    both = copy_folder(made["hf"], tmp_path / "hf_and_timm")
    config = json.loads((both / "config.json").read_text())
    config["architecture"] = json.loads((made["timm"] / "config.json").read_text())["architecture"]
    (both / "config.json").write_text(json.dumps(config))
    assert load_backbone(both).source["format"] == "hf"

    # timm before onnx: a timm folder that also holds model.onnx (onnx would refuse to read)
    both = copy_folder(made["timm"], tmp_path / "timm_and_onnx")
    (both / "model.onnx").write_bytes(b"not read")
    loaded = load_backbone(both)
    assert loaded.source["format"] == "timm"
    assert_backbone(loaded, made["run"]["target"])


def bare_states(made) -> dict[str, tuple[dict[str, torch.Tensor], torch.nn.Module]]:
    """Per marker key: a state dict in that format's names and the network its backbone is."""
    online, target = made["run"]["online"], made["run"]["target"]
    hf = safetensors.torch.load_file(str(made["hf"] / "model.safetensors"))
    return {
        "backbone.vit.cls_token": (vit_state(online), online),  # an MSNNetwork state dict
        "backbone.cls_token": (safetensors.torch.load_file(str(made["msn"] / "weights.safetensors")), target),
        "embeddings.cls_token": (hf, target),
        "vit.embeddings.cls_token": ({"vit." + k: v for k, v in hf.items()}, target),
        "cls_token": (vit_state(online.backbone.vit), online),
    }


MARKER_FORMAT = {"backbone.vit.cls_token": "msn-checkpoint", "backbone.cls_token": "msn",
                 "embeddings.cls_token": "hf", "vit.embeddings.cls_token": "hf", "cls_token": "timm"}
#: (file kind, wrapper key or None, key prefix)
WRAPPINGS = [("safetensors", None, ""), ("pt", None, ""), ("pt", "state_dict", ""), ("pt", "model", ""),
             ("pt", None, "module."), ("pt", None, "_orig_mod."), ("pt", "state_dict", "module."),
             ("pt", "model", "_orig_mod.")]


@pytest.mark.parametrize("marker", list(MARKER_FORMAT))
def test_a_bare_weights_file_belongs_to_the_format_of_its_marker_key(made, tmp_path, marker):
    """docs/formats.md Sec. 6: a bare weights file (``.safetensors`` or a torch file of tensors,
    optionally inside ``{"state_dict": ...}`` / ``{"model": ...}``, every key optionally under
    ``module.`` / ``_orig_mod.``) belongs to the format whose marker key it holds
    (``backbone.vit.cls_token`` msn-checkpoint, ``backbone.cls_token`` msn,
    ``embeddings.cls_token`` / ``vit.embeddings.cls_token`` hf, ``cls_token`` timm) and is read
    as that format with ``variant: "state dict"``."""
    state, network = bare_states(made)[marker]
    assert marker in state
    for kind, wrapper, prefix in WRAPPINGS:
        keyed = {prefix + k: v.clone().contiguous() for k, v in state.items()}
        path = tmp_path / f"{kind}_{wrapper}_{prefix or 'none'}.{'safetensors' if kind == 'safetensors' else 'pt'}"
        if kind == "safetensors":
            safetensors.torch.save_file(keyed, str(path))
        else:
            torch.save({wrapper: keyed} if wrapper else keyed, path)
        loaded = load_backbone(path, num_heads=HEADS)
        what = (marker, kind, wrapper, prefix)
        assert loaded.source["format"] == MARKER_FORMAT[marker], what
        assert "state dict" in loaded.source["variant"], what
        assert_backbone(loaded, network)


# ------------------------------------------------------------------ 2. choosing lambda
def two_class_rows():
    """Two classes of two rows each (2 folds, leave-one-out per class)."""
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1])
    return features, labels


def fake_fit(weights: dict[float, torch.Tensor], calls: list):
    def fit(features, labels, num_classes, lambd, options=None, init=None):
        calls.append(lambd)
        return classifier.LogRegResult(weights[lambd].clone(), lambd, 0.0, 0.0, 1, 1, True)
    return fit


def test_lambda_ties_break_by_lower_cross_entropy_then_larger_lambda(monkeypatch):
    """docs/eval.md "Choosing lambda": the best mean validation accuracy wins, ties broken by
    the lower validation cross-entropy, then the larger lambda."""
    features, labels = two_class_rows()
    options = classifier.SolverOptions(device="cpu")
    eye = torch.eye(2, dtype=torch.float64)

    # every lambda 100% accurate; lambda 1 the most confident: the lowest cross-entropy wins
    calls: list = []
    monkeypatch.setattr(classifier, "fit_logistic_regression", fake_fit({0.1: 1 * eye, 1.0: 5 * eye, 10.0: 2 * eye}, calls))
    choice = classifier.select_lambda(features, labels, 2, [0.1, 1.0, 10.0], folds=5, options=options)
    assert choice.method == "cv" and choice.folds == 2
    assert {v["accuracy"] for v in choice.scores.values()} == {100.0}
    assert choice.lambd == 1.0
    assert choice.scores[1.0]["cross_entropy"] < min(choice.scores[0.1]["cross_entropy"],
                                                     choice.scores[10.0]["cross_entropy"])

    # the same accuracy and the same cross-entropy everywhere: the larger lambda wins
    monkeypatch.setattr(classifier, "fit_logistic_regression", fake_fit({0.1: eye, 1.0: eye, 10.0: eye}, calls))
    choice = classifier.select_lambda(features, labels, 2, [1.0, 10.0, 0.1], folds=2, options=options)
    assert len({v["cross_entropy"] for v in choice.scores.values()}) == 1
    assert choice.lambd == 10.0

    # accuracy comes first: a 50% lambda with the lower cross-entropy loses to a 100% one
    unsure = 0.01 * eye  # right on every row, cross-entropy ~ ln 2
    half = torch.tensor([[10.0, 0.1], [0.0, 0.0]], dtype=torch.float64)  # class 1 rows wrong, barely
    monkeypatch.setattr(classifier, "fit_logistic_regression", fake_fit({0.1: unsure, 1.0: half}, calls))
    choice = classifier.select_lambda(features, labels, 2, [0.1, 1.0], folds=2, options=options)
    assert choice.scores[1.0]["accuracy"] == 50.0 and choice.scores[0.1]["accuracy"] == 100.0
    assert choice.scores[1.0]["cross_entropy"] < choice.scores[0.1]["cross_entropy"]
    assert choice.lambd == 0.1


def test_lambda_grid_is_solved_from_the_largest_down_each_warm_started(monkeypatch):
    """docs/eval.md "Choosing lambda": the grid is solved from the largest lambda down, each
    fit warm-started from the previous one."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat(3)  # 3 classes x 3 images: 3 folds
    features = classifier.normalize_rows(torch.randn(9, 5, generator=g, dtype=torch.float64) + 2 * torch.nn.functional.one_hot(labels, 5))
    real = classifier.fit_logistic_regression
    calls = []

    def spy(features, labels, num_classes, lambd, options=None, init=None):
        result = real(features, labels, num_classes, lambd, options, init=init)
        calls.append({"lambd": lambd, "init": None if init is None else init.clone(), "weight": result.weight.clone()})
        return result

    monkeypatch.setattr(classifier, "fit_logistic_regression", spy)
    grid = [0.01, 1.0, 0.1, 10.0]
    choice = classifier.select_lambda(features, labels, 3, grid, folds=5,
                                      options=classifier.SolverOptions(device="cpu", max_iter=50))
    assert choice.method == "cv" and choice.folds == 3
    assert len(calls) == 3 * len(grid)
    for fold in range(3):
        sweep = calls[fold * len(grid):(fold + 1) * len(grid)]
        assert [c["lambd"] for c in sweep] == sorted(grid, reverse=True)
        assert sweep[0]["init"] is None  # the largest lambda starts from zero
        for before, after in zip(sweep, sweep[1:]):
            assert torch.equal(after["init"], before["weight"])


# ------------------------------------------------------------------ 3. small solves on one thread
@pytest.mark.parametrize("rows, expect_single", [(499, True), (500, False)])
def test_small_logistic_regressions_run_on_one_thread(monkeypatch, rows, expect_single):
    """docs/eval.md "Solver": small problems (N x D x C < 5e7) run on one thread; the rule in
    the code: CPU solves of N * D * C below ``SINGLE_THREAD_WORK`` = 5e7. Here D = 1000 and
    C = 100, so 499 rows are 4.99e7 (one thread) and 500 rows are 5e7 (threads kept)."""
    assert classifier.SINGLE_THREAD_WORK == 5e7
    seen = []
    real_lbfgs = classifier._lbfgs

    def lbfgs(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_lbfgs(*args, **kwargs)

    monkeypatch.setattr(classifier, "_lbfgs", lbfgs)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(0)
        features = torch.randn(rows, 1000, generator=g, dtype=torch.float64)
        labels = torch.arange(rows) % 100
        result = classifier.fit_logistic_regression(features, labels, 100, 1.0,
                                                    classifier.SolverOptions(device="cpu", max_iter=1))
        assert result.weight.shape == (100, 1000)
        assert seen == [1 if expect_single else 2]
        assert torch.get_num_threads() == 2  # restored afterwards
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------ 5. std over splits, features extracted
def lowshot(tmp_path, name, splits):
    out = tmp_path / name
    results = msn.lowshot(None, data="synthetic", shots=[1, 2], overrides=[
        "baseline=pixels", f"splits={splits}", "cache=false", "progress=false", "plot=false", "lambd=0.01",
        # ten classes seen through 2x2 pixels: hard enough that the splits' accuracies differ
        "data.synthetic_size=100", "data.synthetic_classes=10", "data.synthetic_image_size=16", "pixels_size=2",
        f"output_dir={out}"])
    return results, out


def test_lowshot_std_is_the_sample_std_and_only_labelled_and_test_images_are_extracted(tmp_path):
    """docs/eval.md "Outputs": standard deviations are over splits (sample std, ``ddof=1``; 0 for
    one split). "Features": only the labelled images of all splits and the test split are
    extracted (``features_extracted``)."""
    results, out = lowshot(tmp_path, "three", 3)
    varied = False
    for entry in results["shots"].values():
        assert len(entry["accuracy"]) == 3
        assert entry["std"] == pytest.approx(statistics.stdev(entry["accuracy"]), abs=1e-12)
        assert entry["knn_std"] == pytest.approx(statistics.stdev(entry["knn_accuracy"]), abs=1e-12)
        varied |= len(set(entry["accuracy"])) > 1 or len(set(entry["knn_accuracy"])) > 1
    assert varied  # otherwise ddof could not matter

    labelled = set()
    for file in (out / "subsets").glob("split*/*.txt"):
        labelled |= {line for line in file.read_text().split() if line}
    extracted = results["features_extracted"]
    assert extracted["train"] == extracted["train_rows"] == len(labelled)
    assert extracted["train"] < results["data"]["train_images"]
    assert extracted["test"] == extracted["test_rows"] == results["data"]["test_images"]

    single, _ = lowshot(tmp_path, "one", 1)
    for entry in single["shots"].values():
        assert len(entry["accuracy"]) == 1
        assert entry["std"] == 0.0 and entry["knn_std"] == 0.0


# ------------------------------------------------------------------ 6. img_per_s without the monitor
def test_img_per_s_leaves_out_the_monitor_seconds(tiny_config):
    """docs/training.md "Outputs" (metrics.jsonl ``img_per_s``) and docs/eval.md "Live monitor":
    ``monitor/seconds`` is kept out of ``img_per_s`` and added to ``time_s``. The probe here
    sleeps; no record's images per second may count that sleep, neither the monitored step's
    record nor the next one."""
    sleep = 0.75

    def factory(cfg, dataset):
        def probe(backbone, device, dtype, autocast):
            time.sleep(sleep)
            return {"monitor/slept": 1.0}
        return probe

    cfg = tiny_config(train={"log_every": 1, "max_steps": 3}, monitor={"enabled": True, "every": 2})
    Trainer(cfg, probe=factory).fit()
    records = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert ["monitor/seconds" in r for r in records] == [False, True, True]
    previous = 0.0
    for record in records:
        window = record["window_steps"] * cfg.optim.batch_size / record["img_per_s"]
        monitor = record.get("monitor/seconds", 0.0)
        assert window < sleep, record  # the sleep is in no window
        if monitor:
            assert monitor >= sleep
        assert record["time_s"] - previous == pytest.approx(window + monitor, abs=3e-3)
        previous = record["time_s"]


# ------------------------------------------------------------------ 7. the target head's batch norms
def test_target_head_batch_norms_use_the_target_batch_statistics(tiny_config):
    """docs/method.md Sec. 3: the target head's batch norms use the target batch's statistics
    (no gradient reaches the target)."""
    cfg = tiny_config(train={"max_steps": 1})
    trainer = Trainer(cfg)
    head = trainer.msn_step.target.head
    seen = []

    def check(module, inputs, output):
        x = inputs[0].detach().double()
        mean, var = x.mean(0), x.var(0, unbiased=False)
        expected = (x - mean) / torch.sqrt(var + module.eps) * module.weight.double() + module.bias.double()
        seen.append((module.training, torch.allclose(output.double(), expected, atol=1e-4, rtol=1e-4)))

    bns = [m for m in head.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(bns) == 2
    running = [bn.running_mean.clone() for bn in bns]
    handles = [bn.register_forward_hook(check) for bn in bns]
    try:
        trainer.fit()
    finally:
        for handle in handles:
            handle.remove()
    assert seen == [(True, True), (True, True)]  # one target forward, both norms on batch statistics
    assert all(not torch.equal(bn.running_mean, before) for bn, before in zip(bns, running))
    assert all(p.grad is None and not p.requires_grad for p in trainer.msn_step.target.parameters())
