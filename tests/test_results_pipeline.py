"""``make results`` (scripts/fashion_mnist_results.py) end to end on a tiny budget (``--smoke``).

Pre-training, export, the four evaluated methods, the epoch checkpoints, every ablation, the
figures and the report, on 256 Fashion-MNIST images and 500 test images, so the command cannot rot.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT


def _script_module():
    """scripts/fashion_mnist_results.py loaded from its file (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("fashion_mnist_results", ROOT / "scripts" / "fashion_mnist_results.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


fashion_mnist_results = _script_module()


def run(out, report):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "fashion_mnist_results.py"), "--smoke",
                           "--out", str(out), "--report", str(report)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


def test_smoke_pipeline_writes_the_report_and_resumes(tmp_path):
    out, report = tmp_path / "run", tmp_path / "docs" / "fashion_mnist.md"
    first = run(out, report)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    text = report.read_text()
    for method in ("MSN (this preset)", "raw pixels", "random-init ViT", "supervised ViT from scratch"):
        assert f"| {method} |" in text
    for ablation in fashion_mnist_results.ABLATIONS:
        assert f"| {ablation.name} |" in text
    assert "| 1 / class | 2 / class | 1% (60 / class) |" in text
    assert "### Live monitor" in text and "| step | minutes | knn_top1 | 1shot | 5shot |" in text
    assert "| np | max_t | Δ 1 / class |" in text and "| +0.0 ± 0.0 |" in text  # the reference's paired difference
    for ablation in fashion_mnist_results.ABLATIONS[1:]:  # every row paired split by split with its own baseline
        scores = [json.loads((out / "ablations" / f"eval_{name}" / "results.json").read_text())["shots"]["1"]
                  for name in (ablation.name, ablation.baseline)]
        against = "" if ablation.baseline == "reference" else f" (vs {ablation.baseline})"
        assert f"| {fashion_mnist_results.paired_difference(*scores)}{against} |" in text, ablation.name
    assert "### Accuracy vs budget" in text and "| epochs | minutes | 1 / class |" in text
    for name in ("lowshot_methods", "training_curves", "growth", "budget", "ablation_curves", "monitor"):
        png = report.parent / "fashion_mnist" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"(fashion_mnist/{name}.png)" in text
    ledger = json.loads((out / "commands.json").read_text())
    assert {"pretrain", "export", "eval_msn", "eval_pixels", "eval_random", "eval_supervised",
            "eval_epoch_1", "eval_epoch_2", "budget_1", "eval_budget_1"} <= set(ledger)
    assert (out / "msn_hf" / "config.json").is_file()  # the evaluated backbone is the transformers export
    supervised = json.loads((out / "eval_supervised" / "results.json").read_text())
    assert supervised["baseline"] == "supervised" and supervised["percent"]["1"]["train_size"] == [600, 600]
    ablation = json.loads((out / "ablations" / "eval_reference" / "results.json").read_text())["shots"]["1"]
    assert ablation["lambda"] == [fashion_mnist_results.ABLATION_LAMBDA] * 2 and ablation["lambda_selection"] == ["fixed"] * 2
    # a second invocation finds every stage done and only redraws the report
    second = run(out, report)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "[run ]" not in second.stdout and second.stdout.count("[skip]") == len(ledger)
    assert report.read_text().count("| ablation ") == len(fashion_mnist_results.ABLATIONS) * 2


def test_paired_difference_is_per_split():
    # splits (60, 50) against the reference's (58, 49): differences 2 and 1, mean 1.5, sample std sqrt(0.5)
    assert fashion_mnist_results.paired_difference({"accuracy": [60.0, 50.0]}, {"accuracy": [58.0, 49.0]}) == "+1.5 ± 0.7"
    assert fashion_mnist_results.paired_difference({"accuracy": [40.0]}, {"accuracy": [42.5]}) == "-2.5 ± 0.0"


def test_paired_difference_refuses_other_splits():
    with pytest.raises(ValueError, match="not the same splits"):
        fashion_mnist_results.paired_difference({"accuracy": [60.0], "train_size": [50]},
                                                {"accuracy": [58.0], "train_size": [20]})


def test_a_kept_evaluation_with_another_lambda_is_refused(tmp_path):
    # a results.json left by a cross-validated run must not pass as a fixed-lambda stage's output
    pipe = fashion_mnist_results.Pipeline(tmp_path, fashion_mnist_results.budgets(1, [])["smoke"], False, sys.executable)
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text(json.dumps({"classifier": {"lambda_fixed": None}, "shots": {}}))
    with pytest.raises(SystemExit, match="scored with lambda cross-validated, .* asks for 0.01"):
        pipe.evaluate("eval_x", None, tmp_path / "eval", [], "ablation x: evaluate", lambd=0.01)
    assert pipe.evaluate("eval_y", None, tmp_path / "eval", [], "evaluate y") == {"classifier": {"lambda_fixed": None},
                                                                                 "shots": {}}


def test_an_accuracy_table_of_the_report():
    """One section of the page (the epoch checkpoints' table), against the lines written by hand."""
    entry = lambda mean, std: {"mean": mean, "std": std}  # noqa: E731
    points = [(1, 4.04, {"shots": {"1": entry(50.04, 1.26), "5": entry(61.0, 0.5)}}),
              (2, 8.1, {"shots": {"1": entry(55.55, 0.0), "5": entry(70.25, 2.0)}})]
    assert fashion_mnist_results.accuracy_section("Accuracy vs time", "Intro.", "epoch", points, "![f](f.png)") == [
        "### Accuracy vs time", "", "Intro.", "",
        "| epoch | minutes | 1 / class | 5 / class |\n"
        "|---|---|---|---|\n"
        "| 1 | 4.0 | 50.0 ± 1.3 | 61.0 ± 0.5 |\n"
        "| 2 | 8.1 | 55.5 ± 0.0 | 70.2 ± 2.0 |",
        "", "![f](f.png)", ""]
