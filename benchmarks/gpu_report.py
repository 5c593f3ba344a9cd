"""The GPU benchmark page: ``python benchmarks/gpu_report.py`` on a CUDA machine writes
``docs/results/benchmarks_gpu.md`` and ``docs/results/benchmarks_gpu.json``.

It runs the sections of ``benchmarks/bench_train.py`` (through its ``main``) on CUDA in bf16:

* ``step``: ViT-S/16 and ViT-B/16 at 224 px, batch 128 (``--batch``);
* ``levers``: ViT-S/16, in particular the anchor branch at mask 0 and 0.7;
* ``e2e``: loader + step of ViT-S/16 with as many loader workers as the host has cores
  (``--augment device`` on CUDA), through the harness's e2e section; and, as a cross-check,
  the same loop timed here in steady state: a data set large enough that no epoch ends, the
  workers' first burst left out of the timing.

and checks the performance targets: ViT-S/16 step >= 40 % MFU of the measured bf16 matmul
peak, ViT-B/16 >= 50 %, end-to-end >= 90 % of the step-only images/s of ViT-S/16, and the
mask-0.7 anchor branch <= 0.4x the mask-0 one. The peak is measured here on 8192^3 bf16
products (back to back, ten per timing); the harness's own (2048^3, one product per timing)
is recorded too and the larger of the two is the MFU denominator.

``--dry-run`` (automatic without CUDA) runs the same code on the CPU with tiny sizes and
writes to ``--output-dir`` (default: a new temporary folder), to rehearse the whole path.
Exit status: 0 when every section ran (whether or not the targets are met), 1 otherwise;
the page and the JSON are written in both cases.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

import bench_train  # first: it sets OMP_WAIT_POLICY before torch starts OpenMP
import torch

from msn.tables import records_table
from train_harness.data import write_jpeg_folder
from train_harness.runner import StepRunner, bench_config
from train_harness.timing import sync

ROOT = Path(__file__).resolve().parents[1]

#: Sizes of the real run and of the CPU rehearsal. ``small`` plays ViT-S/16 (step, levers,
#: e2e), ``base`` ViT-B/16 (step); ``base_batch`` is the batch of ``base`` when it is
#: ``fmnist_demo`` (the harness's ``--small-batch``).
FULL = {"small": "vit_small_16@224", "base": "vit_base_16@224", "batch": 128, "base_batch": 128,
        "warmup": 3, "repeats": 10, "e2e_repeats": 3, "e2e_steps": 16, "steady_steps": 48, "peak_size": 8192}
DRY = {"small": "vit_tiny_16@224", "base": "fmnist_demo", "batch": 2, "base_batch": 16,
       "warmup": 1, "repeats": 1, "e2e_repeats": 1, "e2e_steps": 2, "steady_steps": 3, "peak_size": 1024}

#: The targets: MFU of the ViT-S/16 and ViT-B/16 steps, end-to-end share of the step alone, anchor ratio.
MFU_SMALL, MFU_BASE, E2E_SHARE, ANCHOR_RATIO = 0.40, 0.50, 0.90, 0.40

DEFAULT_PAGE = ROOT / "docs" / "results" / "benchmarks_gpu.md"


# ---------------------------------------------------------------------------- machine
def host_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, inner: int = 10, repeats: int = 5) -> float:
    """FLOP/s of ``inner`` back-to-back ``size``^3 products (median of ``repeats`` timings)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=out)
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=out)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 * inner / statistics.median(times)


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda,
                            "python": platform.python_version(), "host_cores": host_cores(),
                            "cpu": platform.processor() or platform.machine()}
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        try:
            query = ["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"]
            info["driver"] = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return info


# ---------------------------------------------------------------------------- the harness
class Sections:
    """Runs each part, keeping its result or its error (one failure does not stop the rest)."""

    def __init__(self):
        self.results: dict[str, Any] = {}
        self.errors: dict[str, str] = {}
        self.seconds: dict[str, float] = {}

    def run(self, name: str, fn, *args, **kwargs):
        print(f"\n=== gpu_report: {name} ===", flush=True)
        start = time.perf_counter()
        try:
            self.results[name] = fn(*args, **kwargs)
        except Exception:  # noqa: BLE001 - recorded in the page, the exit status says it
            self.errors[name] = traceback.format_exc(limit=6)
            print(self.errors[name], file=sys.stderr, flush=True)
        self.seconds[name] = round(time.perf_counter() - start, 1)
        return self.results.get(name)


def run_harness(argv: list[str]) -> dict:
    print("bench_train.py " + " ".join(argv), flush=True)
    return bench_train.main(argv)


# ---------------------------------------------------------------------------- e2e, on the device
def jpeg_folder(root: Path, count: int, unique: int = 256) -> Path:
    """An ImageFolder of ``count`` JPEGs: ``unique`` written by the harness, the others hard
    links to them (the same decode work per image; written in a second, not minutes)."""
    unique = min(unique, count)
    write_jpeg_folder(root, unique)
    files = sorted(root.glob("class*/*.jpg"))
    for i in range(unique, count):
        source = files[i % unique]
        link = source.parent / f"copy{i:06d}.jpg"
        try:
            os.link(source, link)
        except OSError:
            shutil.copyfile(source, link)
    return root


def e2e_on_device(model: str, batch: int, steps: int, workers: int, device: torch.device, precision: str,
                  augment: str, workdir: Path) -> dict:
    """Loader + :class:`msn.train.MSNStep` images/s in steady state: the step warmed up on a
    random batch first (and timed alone there: ``share_of_step_only``), then ``2 * workers``
    loader batches (the workers' first burst) before the ``steps`` timed ones; the data set
    has enough images that no epoch ends in between."""
    from msn.data import ResumableSampler, build_multiview_data, build_train_loader, start_epoch
    from msn.data import SyntheticImages, build_dataset

    ramp = 2 * max(workers, 1)
    images = (ramp + steps + 1) * batch
    cfg = bench_config(model, batch, device=str(device), precision=precision,
                       data={"augment": augment, "num_workers": workers})
    if model == "fmnist_demo":
        dataset, data_name = SyntheticImages(images, 10, 28), "28 px images"
    else:
        folder = jpeg_folder(workdir / f"jpegs-{images}", images)
        dataset = build_dataset(replace(cfg.data, name="folder", root=str(folder)))
        data_name = "ImageFolder JPEG 375x500"
    runner = StepRunner(cfg)
    for _ in range(2):
        runner()
    sync(device)
    alone = max(2, min(steps, 8))  # the step alone on its random batch: the ceiling, timed just before
    begin = time.perf_counter()
    for _ in range(alone):
        runner()
    sync(device)
    step_only = alone * batch / (time.perf_counter() - begin)
    data, collate = build_multiview_data(dataset, cfg.data, cfg.seed)
    sampler = ResumableSampler(len(dataset), batch, cfg.seed)
    loader = build_train_loader(data, sampler, workers, pin_memory=device.type == "cuda", collate=collate)
    first = time.perf_counter()
    done, start = 0, None
    for b in start_epoch(loader, 0):
        runner.step_fn(b, runner.step + done)
        done += 1
        if done == ramp:
            sync(device)
            start = time.perf_counter()
        if done == ramp + steps:
            break
    sync(device)
    end = time.perf_counter()
    del loader
    return {"model": model, "data": data_name, "variant": "ours, steady state (gpu_report)", "augment": augment,
            "workers": workers,
            "batch": batch, "timed_steps": steps, "ramp_steps": ramp, "img_per_s": steps * batch / (end - start),
            "with_ramp_img_per_s": (ramp + steps) * batch / (end - first), "step_only_img_per_s": step_only,
            "share_of_step_only": steps * batch / (end - start) / step_only}


def default_augment(device: torch.device) -> str:
    """``device`` on CUDA (the host decodes and crops, the GPU augments), else ``batched``."""
    return "device" if device.type == "cuda" else "batched"


def is_ours(row: dict) -> bool:
    """A row of our step (the harness also times the authors' recipe, ``variant=authors``)."""
    return row.get("variant", "ours") == "ours"


# ---------------------------------------------------------------------------- checks
def _find(rows: list[dict], **match) -> dict | None:
    for row in rows or []:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def evaluate(sizes: dict, steps: list[dict], levers: list[dict], e2e: list[dict], peak: float,
             precision: str) -> list[dict]:
    """The targets, each ``{target, measured, pass}`` (``pass`` None: not measured)."""
    checks = []

    def add(target: str, value: float | None, ok: bool | None, fmt: str) -> None:
        checks.append({"target": target, "value": value, "measured": "-" if value is None else fmt.format(value),
                       "pass": ok})

    steps = [r for r in steps or [] if is_ours(r)]
    for role, goal in (("small", MFU_SMALL), ("base", MFU_BASE)):
        row = _find(steps, model=sizes[role])
        mfu = None if row is None else row["achieved_gflops"] * 1e9 / peak
        add(f"{sizes[role]} step MFU >= {goal:.0%} of the measured {precision} matmul peak", mfu,
            None if mfu is None else mfu >= goal, "{:.1%}")
    step_row = _find(steps, model=sizes["small"])
    rows = [r for r in e2e or [] if r.get("model") == sizes["small"] and r.get("variant", "ours").startswith("ours")
            and "only" not in r.get("variant", "")]
    for row in rows or [None]:
        if row is not None and row.get("share_of_step_only") is not None:
            share = row["share_of_step_only"]  # against the step alone timed in the same section
        else:
            share = None if row is None or step_row is None else row["img_per_s"] / step_row["img_per_s"]
        how = "" if row is None else (f" ({row.get('variant')}, augment={row.get('augment', '?')}, "
                                      f"{row.get('workers', '?')} workers)")
        add(f"{sizes['small']} end-to-end >= {E2E_SHARE:.0%} of step-only img/s{how}", share,
            None if share is None else share >= E2E_SHARE, "{:.1%}")
    zero = _find(levers, lever="anchor branch (fwd+bwd)", setting="mask 0.0")
    high = _find(levers, lever="anchor branch (fwd+bwd)", setting="mask 0.7")
    ratio = None if zero is None or high is None else high["step_s"] / zero["step_s"]
    add(f"{sizes['small']} anchor branch at mask 0.7 <= {ANCHOR_RATIO}x mask 0", ratio,
        None if ratio is None else ratio <= ANCHOR_RATIO, "{:.2f}x")
    return checks


# ---------------------------------------------------------------------------- the page
def _table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """:func:`msn.tables.records_table` with ``(key, title)`` columns."""
    return records_table(rows, [key for key, _ in columns], [title for _, title in columns])


def write_page(path: Path, report: dict) -> None:
    m, sizes = report["machine"], report["sizes"]
    title = "GPU benchmarks" if not report["dry_run"] else "GPU benchmarks: CPU rehearsal (tiny sizes, not a result)"
    out = [f"# {title}", ""]
    if not report["complete"]:
        out += ["**Incomplete**: the run stopped before its last section; what follows is what had finished.", ""]
    out += [
           f"Written by `python benchmarks/gpu_report.py` ({report['seconds_total']:.0f} s) on "
           f"{report['date']}. Raw numbers: [{path.with_suffix('.json').name}]({path.with_suffix('.json').name}).", "",
           f"* device: **{m.get('gpu', m['cpu'])}** ({m['device']}{', driver ' + m['driver'] if m.get('driver') else ''}), "
           f"{m['host_cores']} host cores",
           f"* torch {m['torch']} (CUDA {m['cuda']}), timm {m.get('timm', '?')}, Python {m['python']}",
           f"* precision: {report['precision']}{' autocast' if report['precision'] == 'bf16' else ''}; matmul peak measured here on "
           f"{sizes['peak_size']}^3 products: **{report['peak_gflops'] / 1e3:,.1f} TFLOP/s** "
           f"(the harness's own, 2048^3: {report['harness_peak_gflops'] / 1e3:,.1f} TFLOP/s); "
           f"MFU below is against the larger, {report['mfu_peak_gflops'] / 1e3:,.1f} TFLOP/s",
           "", "## Targets", "",
           _table(report["checks"], [("target", "target"), ("measured", "measured"), ("result", "result")]), ""]
    steps = report.get("step") or []
    if steps:
        out += ["## Train step (12 views, fwd + bwd + AdamW + EMA)", "",
                f"Median of {sizes['repeats']} timed steps after {sizes['warmup']} warm-up steps, random pre-augmented batch.", "",
                _table(steps, [("model", "model"), ("variant", "variant"), ("batch", "batch"), ("step_s", "step (s)"), ("img_per_s", "img/s"),
                               ("gflop_per_step", "GFLOP/step"), ("tflops", "achieved TFLOP/s"),
                               ("mfu_measured_peak", "MFU"), ("mfu", "MFU (harness peak)"),
                               ("speedup_vs_authors", "speed-up vs authors"), ("peak_mem_gb", "peak mem (GiB)")]), ""]
    levers = report.get("levers") or []
    if levers:
        out += [f"## Levers, one at a time ({sizes['small']}, batch {sizes['batch']})", "",
                _table(levers, [("lever", "lever"), ("setting", "setting"), ("step_s", "time (s)"),
                                ("img_per_s", "img/s")]), ""]
    e2e = report.get("e2e") or []
    if e2e:
        out += ["## End to end (loader + step)", "",
                "Rows of the harness's e2e section (ours, the authors' recipe, our step alone on one batch; "
                f"median of {sizes['e2e_repeats']} alternated runs of {sizes['e2e_steps']} steps), and the steady-state "
                f"row timed by gpu_report: {sizes['steady_steps']} steps after the step's warm-up and the loader's "
                "first burst (2 batches per worker), on a data set large enough that no epoch ends "
                "(`with ramp` counts the burst).", "",
                _table(e2e, [("model", "model"), ("data", "data"), ("variant", "variant"), ("augment", "augment"),
                             ("workers", "workers"), ("img_per_s", "img/s"), ("share_of_step_only", "share of step only"),
                             ("speedup_vs_authors", "speed-up vs authors"), ("with_ramp_img_per_s", "with ramp")]), ""]
    if report["errors"]:
        out += ["## Failed sections", ""]
        for name, error in report["errors"].items():
            out += [f"`{name}`:", "", "```", error.strip(), "```", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out))


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/gpu_report.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (automatic without CUDA)")
    parser.add_argument("--output-dir", default=None,
                        help="where the page and JSON go (default: docs/results, or a temporary folder with --dry-run)")
    parser.add_argument("--batch", type=int, default=None, help="batch of the 224 px models (128; dry run 2)")
    parser.add_argument("--workers", type=int, default=None, help="loader workers of e2e (default: all host cores)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--e2e-steps", type=int, default=None, help="steps per timed run of the harness's e2e")
    parser.add_argument("--steady-steps", type=int, default=None, help="timed steps of the steady-state e2e")
    parser.add_argument("--sections", default="step,levers,e2e")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    dry = args.dry_run or not torch.cuda.is_available()
    if dry and not args.dry_run:
        print("gpu_report: no CUDA device: rehearsing on the CPU with tiny sizes (--dry-run)", flush=True)
    sizes = dict(DRY if dry else FULL)
    for key in ("batch", "repeats", "warmup", "e2e_steps", "steady_steps"):
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    device = torch.device("cpu") if dry else torch.device("cuda")
    precision = "bf16" if device.type == "cuda" else "fp32"  # the harness's rule
    workers = args.workers if args.workers is not None else host_cores()
    if args.output_dir:
        out_dir = Path(args.output_dir)
    elif dry:
        out_dir = Path(tempfile.mkdtemp(prefix="msn-gpu-report-"))
    else:
        out_dir = DEFAULT_PAGE.parent
    page = out_dir / DEFAULT_PAGE.name
    wanted = set(args.sections.split(","))
    e2e_rows: list[dict] = []

    sections = Sections()
    machine = machine_info(device)
    state = {"peak": 0.0}

    def publish(complete: bool) -> None:
        """Write the page and the JSON from what has run so far (after every section: a run
        stopped by a time limit still leaves its finished sections)."""
        results = sections.results
        harness_peak = next((r["machine"]["matmul_peak_gflops"] * 1e9 for r in results.values()
                             if isinstance(r, dict) and "machine" in r), 0.0)
        mfu_peak = max(state["peak"], harness_peak) or float("nan")
        step_rows = (results.get("step") or {}).get("step", [])
        for row in step_rows:
            row["tflops"] = row["achieved_gflops"] / 1e3
            row["mfu_measured_peak"] = row["achieved_gflops"] * 1e9 / mfu_peak
        lever_rows = (results.get("levers") or {}).get("levers", [])
        report = {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "complete": complete, "dry_run": dry, "machine": machine, "precision": precision, "sizes": sizes,
            "workers": workers, "peak_gflops": state["peak"] / 1e9,
            "harness_peak_gflops": harness_peak / 1e9, "mfu_peak_gflops": mfu_peak / 1e9, "step": step_rows,
            "levers": lever_rows, "e2e": e2e_rows,
            "checks": evaluate(sizes, step_rows, lever_rows, e2e_rows, mfu_peak, precision),
            "errors": sections.errors, "seconds": sections.seconds,
            "seconds_total": time.perf_counter() - started,
        }
        for check in report["checks"]:
            check["result"] = {True: "**pass**", False: "**FAIL**", None: "not measured"}[check["pass"]]
        write_page(page, report)
        page.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))

    state["peak"] = sections.run("peak", matmul_peak, device, torch.bfloat16 if precision == "bf16" else torch.float32,
                                 sizes["peak_size"]) or 0.0
    common = ["--device", str(device), "--warmup", str(sizes["warmup"]), "--repeats", str(sizes["repeats"]),
              "--batch", str(sizes["batch"]), "--small-batch", str(sizes["base_batch"])]
    with tempfile.TemporaryDirectory(prefix="msn-gpu-report-") as tmp:
        work = Path(tmp)
        if "step" in wanted:
            sections.run("step", run_harness, ["--sections", "step", "--models", f"{sizes['small']},{sizes['base']}",
                                               *common, "--output", str(work / "step.json")])
            publish(False)
        if "levers" in wanted:
            sections.run("levers", run_harness, ["--sections", "levers", "--lever-model", sizes["small"], *common,
                                                 "--output", str(work / "levers.json")])
            publish(False)
        if "e2e" in wanted:
            augment = default_augment(device)
            row = sections.run(f"e2e steady state ({augment})", e2e_on_device, sizes["small"], sizes["batch"],
                               sizes["steady_steps"], workers, device, precision, augment, work)
            if row is not None:
                print(records_table([row], list(row)), flush=True)
                e2e_rows.append(row)
            publish(False)
            e2e_common = [*common, "--repeats", str(sizes["e2e_repeats"])]  # the later --repeats wins
            result = sections.run("e2e", run_harness, ["--sections", "e2e", "--e2e-models", sizes["small"], *e2e_common,
                                                       "--workers", str(workers), "--e2e-steps", str(sizes["e2e_steps"]),
                                                       "--augment", augment, "--output", str(work / "e2e.json")])
            e2e_rows[:0] = [r for r in (result or {}).get("e2e", []) if r.get("model") == sizes["small"]]
    publish(True)
    print(f"\n{page.read_text()}\nwrote {page} and {page.with_suffix('.json')}", flush=True)
    return 1 if sections.errors else 0


if __name__ == "__main__":
    sys.exit(main())
