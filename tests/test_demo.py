"""``make demo`` (scripts/demo.py): pre-training, then a low-shot table of the run's own
backbone against a random-init ViT of the same shape and raw pixels, printed and written.
Here on a tiny budget (4 steps, 1 split, 1,000 test images); the numbers are checked
against each evaluation's own results.json, not against fixed values."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import FASHION_MNIST, ROOT, require_dir

pytestmark = pytest.mark.slow


def _demo_module():
    spec = importlib.util.spec_from_file_location("demo_script", ROOT / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_prints_and_writes_its_own_lowshot_table(tmp_path, capsys):
    require_dir(FASHION_MNIST, "the dataset-fashion-mnist package (make setup)")
    demo = _demo_module()
    out = tmp_path / "demo"
    assert demo.main(["--output-dir", str(out), "--splits", "1", "--eval", "test_limit=1000",
                      "train.max_steps=4", "data.subset=1024", "train.progress=false", "monitor.every=2"]) == 0
    printed = capsys.readouterr().out
    written = (out / "demo_lowshot.md").read_text()
    assert written.strip() in printed
    numbers = json.loads((out / "demo_lowshot.json").read_text())
    assert numbers["step"] == 4 and numbers["shots"] == [1, 5] and numbers["splits"] == 1
    for name, label in (("msn", "MSN demo (this run)"), ("random", "random-init ViT"), ("pixels", "raw pixels")):
        results = json.loads((out / "lowshot" / name / "results.json").read_text())
        assert results["data"]["test_images_used"] == 1000
        assert results["baseline"] == (None if name == "msn" else name)
        row = next(line for line in written.splitlines() if line.startswith(f"| {label}"))
        for k in ("1", "5"):
            entry = results["shots"][k]
            assert numbers["rows"][name][k]["mean"] == entry["mean"]
            assert f"{entry['mean']:.1f} ± {entry['std']:.1f}" in row
    gap = numbers["rows"]["msn"]["5"]["mean"] - numbers["rows"]["random"]["5"]["mean"]
    assert numbers["msn_minus_random_5shot"] == pytest.approx(gap)
    assert f"{gap:+.1f} points over the same network at random init" in written
    # the monitor ran in the demo too (preset), and the run's weights are what was evaluated
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert any("monitor/knn_top1" in r for r in records)
    msn_results = json.loads((out / "lowshot" / "msn" / "results.json").read_text())
    assert msn_results["backbone"]["step"] == 4
