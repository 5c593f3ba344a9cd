"""Smoke test of the benchmark harness benchmarks/bench_train.py and its sections
(benchmarks/train_harness/): correctness of what it runs and reports, not timing. pytest puts
``benchmarks/`` on the path (pyproject.toml), as running a script there does."""

import json

import torch

import bench_train
from train_harness.data import DATA_PIPELINES
from train_harness.runner import PerViewForward, StepRunner, anchor_branch, bench_config
from train_harness.timing import count_flops, speedup


def test_harness_runs_every_section_and_reports(tmp_path, capsys):
    out = tmp_path / "bench.json"
    report = bench_train.main([
        "--sections", "step,levers,data,e2e,profile", "--models", "fmnist_demo", "--lever-model", "fmnist_demo",
        "--e2e-models", "fmnist_demo", "--small-batch", "8", "--repeats", "1", "--warmup", "0", "--e2e-steps", "1",
        "--data-images", "4", "--workers", "0", "--output", str(out),
    ])
    printed = capsys.readouterr().out
    for title in ("## Train step", "## Levers", "## Data pipeline", "## End to end", "## Profile", "## The step's smaller parts"):
        assert title in printed
    saved = json.loads(out.read_text())
    assert saved["machine"]["matmul_peak_gflops"] > 0
    steps = {row["variant"]: row for row in saved["step"]}
    assert steps.keys() == {"ours", "authors"}
    for row in steps.values():
        assert row["gflop_per_step"] > 0 and 0 < row["mfu"] and row["img_per_s"] > 0
    assert steps["ours"]["gflop_per_step"] < steps["authors"]["gflop_per_step"]  # the CLS-only last block
    # one repeat: the ratio is the authors' time over ours, as the table states it
    assert steps["ours"]["speedup_vs_authors"] == steps["authors"]["step_s"] / steps["ours"]["step_s"]
    assert steps["authors"]["speedup_vs_authors"] == 1.0
    levers = {(r["lever"], r["setting"]) for r in report["levers"]}
    assert ("mask ratio", "0.7") in levers and ("views", "one forward per view") in levers
    assert ("attention", "eager") in levers and ("tokens", "zeroed (sequence kept)") in levers
    pipelines = {(r["data"].split()[0], r["pipeline"]) for r in report["data"]}
    for data in ("ImageFolder", "28"):
        assert {(data, name) for name in DATA_PIPELINES.values()} <= pipelines
    assert any("device share" in pipeline for _, pipeline in pipelines)
    assert ("ImageFolder", "JPEG decode only (PIL), no augmentation: the ceiling") in pipelines
    assert all(r["samples_per_s_per_core"] > 0 for r in report["data"])
    assert {r["variant"] for r in report["e2e"]} == {"ours", "authors", "ours, step only"}
    assert {r["part"].split(" [")[0] for r in report["profile"]["parts"]} >= {"EMA of the target", "AdamW step", "attention fwd+bwd"}
    assert report["profile"]["operators"] and all(r["self_ms"] >= 0 for r in report["profile"]["operators"])


def test_speedup_is_the_median_of_paired_ratios():
    """The median of the paired ratios baseline / ours, not a ratio of medians: for the second
    case the paired ratios 3, 0.5, 2.25 have median 2.25, the medians' ratio would be 3 / 2."""
    assert speedup({"ours": [1.0, 2.0, 4.0], "authors": [2.0, 2.0, 2.0]}, "ours", "authors") == 1.0
    assert speedup({"ours": [1.0, 2.0, 4.0], "authors": [3.0, 1.0, 9.0]}, "ours", "authors") == 2.25


def test_authors_baseline_is_the_same_step_in_exact_arithmetic():
    """The baseline differs from our step only in how it computes (eager attention, the full
    last block, an EMA loop, gradient norms read): with nothing masked, in float64, one update
    moves every weight the same way (1e-9: see the next test's bound)."""
    from reference_recipe import AuthorsStep, FullBlocksForward

    cfg = bench_config("fmnist_demo", 4, ratio=0.0, precision="fp64")
    ours, authors = StepRunner(cfg), StepRunner(cfg, authors=True)
    assert isinstance(authors.step_fn, AuthorsStep) and isinstance(authors.step_fn.online, FullBlocksForward)
    assert not authors.step_fn.network.backbone.vit.blocks[0].attn.fused_attn and authors.step_fn.cfg.mask.shared
    for name in ("network", "target", "prototypes"):
        getattr(authors.step_fn, name).load_state_dict(getattr(ours.step_fn, name).state_dict())
    authors.batch = ours.batch
    ours()
    authors()
    assert len(authors.step_fn.grad_norms) > 10
    for p, q in zip(list(ours.step_fn.network.parameters()) + list(ours.step_fn.target.parameters()),
                    list(authors.step_fn.network.parameters()) + list(authors.step_fn.target.parameters())):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-9)


def test_flops_shrink_with_mask_ratio():
    def flops(ratio):
        runner = StepRunner(bench_config("fmnist_demo", 4, ratio=ratio))
        return count_flops(anchor_branch(runner))

    assert flops(0.7) < 0.45 * flops(0.0)


def test_per_view_step_matches_grouped_loss_without_bn():
    """Per-view and grouped forwards are the same step in exact arithmetic when the head has
    no BN. Compared in float64: fp32 rounding of a gradient that is zero in maths (biases
    feeding a LayerNorm) is amplified by Adam's first step up to +-lr, whatever the tolerance;
    float64 rounding (~1e-16 of magnitudes <= 1) amplified by at most lr / eps = 1e4 stays
    below 1e-11, so 1e-9 bounds it with margin on any CPU and BLAS kernel."""
    cfg = bench_config("fmnist_demo", 4, ratio=0.0, precision="fp64", head={"use_bn": False})
    a, b = StepRunner(cfg), StepRunner(cfg, per_view=True)
    assert isinstance(b.step_fn.online, PerViewForward) and not isinstance(a.step_fn.online, PerViewForward)
    b.step_fn.network.load_state_dict(a.step_fn.network.state_dict())
    b.step_fn.target.load_state_dict(a.step_fn.target.state_dict())
    b.step_fn.prototypes.load_state_dict(a.step_fn.prototypes.state_dict())
    a()
    b()
    moved = 0
    for p, q, p0 in zip(a.step_fn.network.parameters(), b.step_fn.network.parameters(),
                        b.step_fn.target.parameters()):
        assert p.dtype == torch.float64
        torch.testing.assert_close(p, q, rtol=0, atol=1e-9)
        moved += int((p - p0).abs().max() > 1e-6)  # the step really changed the weights
    assert moved > 10


def test_gpu_report_rehearses_on_the_cpu_and_writes_its_page(tmp_path, capsys):
    """benchmarks/gpu_report.py --dry-run (what scripts/gpu_check.sh runs without CUDA): every
    section runs on the CPU with tiny sizes, and the page and its JSON are written, each
    target listed (measured or not)."""
    import gpu_report

    status = gpu_report.main(["--dry-run", "--output-dir", str(tmp_path), "--workers", "1"])
    capsys.readouterr()
    report = json.loads((tmp_path / "benchmarks_gpu.json").read_text())
    assert status == 0 and report["complete"] and report["dry_run"] and not report["errors"], report["errors"]
    assert report["step"] and report["levers"] and report["e2e"]
    assert report["peak_gflops"] > 0 and all(row["mfu_measured_peak"] > 0 for row in report["step"])
    page = (tmp_path / "benchmarks_gpu.md").read_text()
    assert "## Targets" in page
    checks = " ".join(check["target"] for check in report["checks"])
    for target in ("step MFU >= 40%", "step MFU >= 50%", "anchor", "end-to-end"):
        assert target in checks, checks
