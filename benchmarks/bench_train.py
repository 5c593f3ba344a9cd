"""Benchmark harness: ``python benchmarks/bench_train.py`` prints Markdown tables and writes JSON.

Every timed step is :class:`msn.train.MSNStep`, the object the trainer calls; the baseline is
the authors' step and data path, :mod:`reference_recipe` (eager attention, one shared mask,
full last block, per-parameter EMA loop, gradient norms read every step, per-image PIL
augmentation). Comparisons are ratios of runs taken in turn (:func:`train_harness.timing.alternate`), the median
over alternations: on a shared machine single readings move by 10% and a matmul peak read at
another moment cannot rank two implementations.

1. ``step``: one full MSN training step (all 12 views, forward + backward + AdamW + EMA),
   ours and the authors', images/s, FLOPs (``torch.utils.flop_counter``), MFU against the
   measured fp32 (bf16 on CUDA) matmul peak, peak memory, and the speed-up.
2. ``levers``: one change at a time from our default step: mask ratio, per-view forwards,
   eager attention, zeroed instead of dropped tokens, channels_last, ``torch.compile``; and
   the anchor branch (forward + backward of the masked anchors alone) at each mask ratio.
3. ``data``: 12-view samples/s on ONE core for each ``data.augment`` mode (for ``device``
   the host's share, and the device's share run on the CPU) and the authors' PIL pipeline,
   on generated 375x500 JPEGs and on 28 px images.
4. ``e2e``: loader + step throughput, ours against the authors' recipe, and our step alone
   on a fixed batch (what the loader should keep up with).
5. ``profile``: our step's top operators (``torch.profiler``), and its smaller parts alone:
   EMA, AdamW kernels, clipping, attention kernel at the model's shapes, autocast context.

Each section is a module of :mod:`train_harness` (``benchmarks/train_harness/``); this file is
the command line and the printed tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

# Idle OpenMP threads sleep instead of spinning (loader workers share the cores with the step).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from msn.runtime import resolve_device  # noqa: E402
from msn.tables import records_table  # noqa: E402
from train_harness.data import bench_data  # noqa: E402
from train_harness.e2e import bench_e2e  # noqa: E402
from train_harness.levers import bench_levers  # noqa: E402
from train_harness.profile import bench_profile  # noqa: E402
from train_harness.step import bench_step  # noqa: E402
from train_harness.timing import matmul_peak  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python benchmarks/bench_train.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default="step,levers,data,e2e,profile",
                        help="comma-separated: step,levers,data,e2e,profile")
    parser.add_argument("--models", default="vit_tiny_16@224,vit_small_16@224,fmnist_demo")
    parser.add_argument("--lever-model", default="vit_tiny_16@224")
    parser.add_argument("--e2e-models", default=None, help="models of the e2e section (default: fmnist_demo and the first of --models)")
    parser.add_argument("--batch", type=int, default=8, help="batch for the 224 px models")
    parser.add_argument("--small-batch", type=int, default=128, help="batch for fmnist_demo")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (alternations where two are compared)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--e2e-steps", type=int, default=8, help="steps per timed e2e run")
    parser.add_argument("--data-images", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="loader workers in the e2e section")
    parser.add_argument("--augment", default=None, choices=["batched", "device", "per_sample"],
                        help="our data.augment in the e2e section (default: device on CUDA, batched on a CPU)")
    parser.add_argument("--compile", action="store_true", help="include torch.compile (slow to compile on CPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", default="benchmarks/results.json")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    precision = "bf16" if device.type == "cuda" else "fp32"
    augment = args.augment or ("device" if device.type == "cuda" else "batched")
    sections = set(args.sections.split(","))
    peak = matmul_peak(device, torch.bfloat16 if precision == "bf16" else torch.float32)
    report: dict[str, Any] = {
        "machine": {"device": str(device), "name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "precision": precision, "matmul_peak_gflops": peak / 1e9},
    }
    print(f"# MSN benchmarks ({report['machine']['name']}, {device}, {precision}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; measured matmul peak {peak / 1e9:.1f} GFLOP/s)\n")
    print("Ratios (speedup_vs_authors) are medians over runs of ours and the authors' recipe "
          "(benchmarks/reference_recipe.py) taken in turn; absolute rates move with the machine's load.\n")
    batch_of = lambda m: args.small_batch if m == "fmnist_demo" else args.batch  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="msn-bench-") as tmp:
        work = Path(tmp)
        if "step" in sections:
            rows = []
            for model in args.models.split(","):
                rows += bench_step([model], batch_of(model), device, precision, args.warmup, args.repeats, peak)
            report["step"] = rows
            print("## Train step (12 views, fwd + bwd + AdamW + EMA), ours against the authors'\n")
            print(records_table(rows, ["model", "variant", "batch", "precision", "step_s", "img_per_s", "gflop_per_step",
                                        "achieved_gflops", "mfu", "speedup_vs_authors", "peak_mem_gb"]) + "\n")
        if "levers" in sections:
            model = args.lever_model
            rows = bench_levers(model, batch_of(model), device, precision, args.warmup, args.repeats, args.compile)
            report["levers"] = rows
            print(f"## Levers, one at a time ({model})\n")
            print(records_table(rows, ["lever", "setting", "step_s", "img_per_s"]) + "\n")
        if "data" in sections:
            rows = bench_data(args.small_batch // 4, args.repeats, work, args.data_images)
            report["data"] = rows
            print("## Data pipeline (12-view samples per second on one core)\n")
            print(records_table(rows, ["data", "pipeline", "samples_per_s_per_core", "vs_reference"]) + "\n")
        if "e2e" in sections:
            rows = []
            models = args.e2e_models.split(",") if args.e2e_models else ["fmnist_demo", args.models.split(",")[0]]
            for model in models:
                rows += bench_e2e(model, batch_of(model), args.e2e_steps, args.repeats, work, args.workers, augment,
                                  device, precision)
            report["e2e"] = rows
            print("## End to end (loader + step), ours against the authors' recipe\n")
            print(records_table(rows, ["model", "data", "variant", "augment", "workers", "img_per_s",
                                        "speedup_vs_authors", "share_of_step_only"]) + "\n")
        if "profile" in sections:
            model = args.lever_model
            profiled = bench_profile(model, batch_of(model), device, precision, args.repeats)
            report["profile"] = profiled
            print(f"## Profile of our step ({model}): top operators by self time\n")
            print(records_table(profiled["operators"], ["operator", "self_ms", "calls", "share"]) + "\n")
            print("## The step's smaller parts, alone\n")
            print(records_table(profiled["parts"], ["part", "choice", "ms"]) + "\n")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    main()
