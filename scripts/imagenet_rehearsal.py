"""ImageNet-1k at its real shape, rehearsed on a CPU (docs/results/imagenet_rehearsal.md).

Builds on local disk an ImageFolder shaped like ImageNet-1k: ``train/`` with the class folders
named by the standard low-shot split files' wnids, holding every file those files name (under
exactly those names) plus generated ones up to the chosen size, and ``val/`` with
``--val-per-class`` images per class. The images are small JPEGs whose content depends on the
class (a coloured grid drawn from the class index, a few variants per class, hard-linked under
every name), so above-chance accuracy shows the labels travel through the pipeline intact.

Then it runs the README's commands on it, each in its own process, measuring wall time and peak
resident memory (the process and its loader workers): the folder scan and name lookup, a few
pre-training steps with ``data=imagenet`` on a tiny backbone, a resumed run, and
``eval_lowshot.py`` with the three split folders, shots 1, 2, 5 and ``percent=1`` (each
solver fit and each k-NN timed). Several ``--scale`` values give the growth of every stage; the
document projects each stage to the full 1,281,167 + 50,000 images.

    .venv/bin/python scripts/imagenet_rehearsal.py --scale 26000 --scale 128000 --scale 320000
    .venv/bin/python scripts/imagenet_rehearsal.py --classes 100 --scale 3000 --val-per-class 4 --quick

The split files are found at ``../shared/data/imagenet_subsets`` beside the repository, or
``MSN_IMAGENET_SUBSETS``, or ``--subsets``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]

#: ImageNet-1k's training and validation sizes.
TRAIN_IMAGES = 1_281_167
VAL_IMAGES = 50_000
VAL_PER_CLASS = 50
#: The three folders of the standard split files, one per split.
SPLIT_FOLDERS = ("imagenet_subsets1", "imagenet_subsets2", "imagenet_subsets3")
#: Image variants per class (hard-linked under every name of the class).
VARIANTS = 4
#: Generated image size (height, width): a non-square JPEG, decoded and resized like a photo.
IMAGE_HW = (40, 48)
#: The tiny backbone and views of the rehearsal's pre-training (keys of msn/config.py).
TINY_TRAIN = [
    "model=vit_mini_4", "model.depth=2", "model.embed_dim=64", "model.num_heads=2", "model.patch_size=8",
    "head.hidden_dim=64", "head.output_dim=32", "loss.num_prototypes=64",
    "data.views.rand_size=32", "data.views.focal_size=16", "data.views.num_focal=2",
    "optim.batch_size=32", "optim.epochs=1", "optim.warmup_epochs=0", "mask.ratio=0.5",
    "train.log_every=1", "train.progress=false", "device=cpu",
]
DOC = ROOT / "docs" / "results" / "imagenet_rehearsal.md"


def default_subsets() -> Path:
    """``MSN_IMAGENET_SUBSETS`` or ``../shared/data/imagenet_subsets`` beside the repository."""
    return Path(os.environ.get("MSN_IMAGENET_SUBSETS", ROOT.parent / "shared" / "data" / "imagenet_subsets"))


# ----------------------------------------------------------------------------------- the tree
def split_names(subsets: Path) -> dict[str, list[Path]]:
    """Every ``*.txt`` of the three split folders, by folder name."""
    found = {}
    for folder in SPLIT_FOLDERS:
        path = subsets / folder
        files = sorted(path.glob("*.txt"))
        if not files:
            raise SystemExit(f"error: --subsets: {path} holds no split file (*.txt)")
        found[folder] = files
    return found


def named_by_class(files: dict[str, list[Path]]) -> dict[str, set[str]]:
    """Every file name the split files list, grouped by wnid."""
    from msn.eval.subsets import class_of, read_subset_file

    names: dict[str, set[str]] = {}
    for paths in files.values():
        for path in paths:
            for name in read_subset_file(path):
                names.setdefault(class_of(name), set()).add(name)
    return names


def per_class_sizes(total: int, classes: int, needed: list[int]) -> list[int]:
    """``total`` images spread evenly over ``classes`` (the first ones one more), never fewer
    than a class's named images."""
    base, extra = divmod(total, classes)
    return [max(base + (c < extra), needed[c]) for c in range(classes)]


def class_image(label: int, variant: int):
    """A ``IMAGE_HW`` RGB image of class ``label``: a 4x4 grid of colours drawn from the class,
    shifted in brightness and position by the variant."""
    import numpy as np

    rng = np.random.default_rng([label, 7])
    grid = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    h, w = IMAGE_HW
    image = np.kron(grid, np.ones((h // 4, w // 4, 1), dtype=np.uint8)).astype(np.int16)
    image = np.roll(image, shift=variant * 2, axis=1) + (variant - VARIANTS // 2) * 6
    noise = np.random.default_rng([label, variant]).integers(-12, 13, size=image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # no hard links on this file system: copy the bytes
        target.write_bytes(source.read_bytes())


def build_tree(root: Path, subsets: Path, classes: int, train_images: int, val_per_class: int,
               progress: bool = True) -> dict[str, Any]:
    """Write the ImageFolder under ``root`` (``train/``, ``val/``) and the split files it is
    evaluated with under ``root/subsets`` (the originals when all 1,000 classes are built,
    otherwise their lines of the kept classes, in file order). Reused when already built with
    the same parameters. Returns the tree's description (sizes, split folders, build seconds)."""
    from PIL import Image
    from tqdm.auto import tqdm

    from msn.eval.subsets import class_of, read_subset_file, write_subset_file

    params = {"classes": classes, "train_images": train_images, "val_per_class": val_per_class,
              "subsets": str(subsets.resolve()), "variants": VARIANTS, "image_hw": list(IMAGE_HW)}
    manifest = root / "manifest.json"
    if manifest.is_file():
        built = json.loads(manifest.read_text())
        if built.get("params") == params:
            return built
    start = time.perf_counter()
    files = split_names(subsets)
    named = named_by_class(files)
    wnids = sorted(named)[:classes]
    if len(wnids) < classes:
        raise SystemExit(f"error: --classes: the split files name {len(named)} classes, fewer than {classes}")
    needed = [len(named[w]) for w in wnids]
    sizes = per_class_sizes(train_images, classes, needed)
    pool = root / "pool"
    pool.mkdir(parents=True, exist_ok=True)
    for label in range(classes):
        for variant in range(VARIANTS):
            Image.fromarray(class_image(label, variant)).save(pool / f"{label}_{variant}.jpg", quality=90)
    total = sum(sizes) + classes * val_per_class
    bar = tqdm(total=total, desc="build tree", unit="file", disable=not progress, mininterval=1.0)
    for split in ("train", "val"):
        for label, wnid in enumerate(wnids):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            if split == "train":
                names = sorted(named[wnid])
                names += [f"{wnid}_g{i}.JPEG" for i in range(sizes[label] - len(names))]
            else:
                names = [f"ILSVRC2012_val_{label * val_per_class + i + 1:08d}.JPEG" for i in range(val_per_class)]
            for name in names:
                target = folder / name
                if not target.exists():
                    _link(pool / f"{label}_{zlib.crc32(name.encode()) % VARIANTS}.jpg", target)
            bar.update(len(names))
    bar.close()
    kept = set(wnids)
    split_dirs = []
    for folder, paths in files.items():
        if classes == len(named):
            split_dirs.append(str(subsets / folder))
            continue
        out = root / "subsets" / folder
        for path in paths:
            write_subset_file(out / path.name, [n for n in read_subset_file(path) if class_of(n) in kept])
        split_dirs.append(str(out))
    built = {"params": params, "train_images": sum(sizes), "val_images": classes * val_per_class,
             "classes": classes, "named_images": sum(needed), "split_dirs": split_dirs,
             "build_s": time.perf_counter() - start}
    manifest.write_text(json.dumps(built, indent=1) + "\n")
    return built


# ------------------------------------------------------------------------------ measurement
def _tree_rss_kib(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants (KiB), from /proc."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            with open(f"/proc/{current}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as children:
                    stack.extend(int(c) for c in children.read().split())
        except (OSError, ValueError):
            continue
    return total


def run_measured(argv: list[str], log_path: Path, env: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """Run ``argv``; its wall seconds, its peak RSS and that of its process tree (MiB), its
    exit status. Output goes to ``log_path``."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "WANDB_MODE": "disabled", "OMP_WAIT_POLICY": "PASSIVE",
           **(env or {})}
    peak = [0]
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], _tree_rss_kib(process.pid))
                done.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        sampler.join()
    wall = time.perf_counter() - start
    return {"wall_s": wall, "rc": process.returncode, "peak_rss_mib": usage.ru_maxrss / 1024,
            "peak_tree_rss_mib": max(peak[0], usage.ru_maxrss) / 1024}


def _check(result: dict[str, Any], what: str, log_path: Path) -> None:
    if result["rc"] != 0:
        tail = log_path.read_text()[-3000:]
        raise SystemExit(f"error: {what} failed with exit status {result['rc']} (log {log_path}):\n{tail}")


def measure_scan(root: str, split_dirs: list[str]) -> None:
    """(child) Scan ``root``'s ``train/`` as ``data=imagenet`` does, list its names, resolve every split
    file's names; print the seconds and RSS of each step as JSON."""
    def rss() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    from msn.config import DataConfig
    from msn.data import build_dataset
    from msn.eval.subsets import NameIndex, read_subset_file

    out = {"import_rss_mib": rss()}
    tick = time.perf_counter()
    dataset = build_dataset(DataConfig(name="imagenet", root=root), train=True)
    out.update(scan_s=time.perf_counter() - tick, images=len(dataset), scan_rss_mib=rss())
    tick = time.perf_counter()
    names = dataset.image_names()
    out.update(names_s=time.perf_counter() - tick)
    tick = time.perf_counter()
    index = NameIndex(names, "the rehearsal's training split")
    resolved = 0
    for folder in split_dirs:
        for path in sorted(Path(folder).glob("*.txt")):
            resolved += len(index.resolve(read_subset_file(path), str(path)))
    out.update(resolve_s=time.perf_counter() - tick, resolved=resolved, peak_rss_mib=rss())
    print("SCAN " + json.dumps(out))


def instrumented_eval(timings_path: str, overrides: list[str]) -> None:
    """(child) ``eval_lowshot.py overrides`` with every solver fit, lambda selection and k-NN
    timed (the evaluator's own functions wrapped, nothing else changed)."""
    from msn.eval import baselines

    records: list[dict[str, Any]] = []

    def timed(name, function):
        def wrapper(*args, **kwargs):
            tick = time.perf_counter()
            result = function(*args, **kwargs)
            entry = {"what": name, "seconds": time.perf_counter() - tick, "rows": int(args[0].shape[0])}
            if name == "fit":
                entry.update(iterations=result.iterations, evaluations=result.evaluations, lambd=result.lambd)
            records.append(entry)
            return result
        return wrapper

    baselines.fit_logistic_regression = timed("fit", baselines.fit_logistic_regression)
    baselines.select_lambda = timed("select_lambda", baselines.select_lambda)
    baselines.knn_predict = timed("knn", baselines.knn_predict)
    from msn.cli import eval_lowshot_main

    sys.argv = [str(ROOT / "eval_lowshot.py"), *overrides]
    try:
        eval_lowshot_main()
    finally:
        Path(timings_path).write_text(json.dumps(records) + "\n")


# ---------------------------------------------------------------------------------- stages
def rehearse(work: Path, subsets: Path, classes: int, train_images: int, val_per_class: int, steps: int,
             progress: bool, lambd: Optional[float] = None) -> dict[str, Any]:
    """Build one tree and run every stage on it; the measurements of this scale."""
    root = work / f"imagenet_{classes}c_{train_images}"
    tree = build_tree(root, subsets, classes, train_images, val_per_class, progress)
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    python = sys.executable
    stages: dict[str, Any] = {"build_tree": {"wall_s": tree["build_s"]}}

    scan_log = logs / "scan.log"
    scan = run_measured([python, __file__, "--child-scan", str(root), *tree["split_dirs"]], scan_log)
    _check(scan, "the folder scan", scan_log)
    detail = json.loads(next(line[5:] for line in scan_log.read_text().splitlines() if line.startswith("SCAN ")))
    stages["scan"] = {**scan, **detail}

    run_dir = root / "run"
    common = [f"data.root={root}", "data=imagenet", *TINY_TRAIN, f"output_dir={run_dir}"]
    first = max(1, steps // 2)
    for name, max_steps in (("train", first), ("resume", steps)):
        log_path = logs / f"{name}.log"
        result = run_measured([python, str(ROOT / "train.py"), *common, f"train.max_steps={max_steps}"], log_path)
        _check(result, f"pre-training ({name})", log_path)
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                   if line.strip().startswith("{")]
        steps_here = [m for m in metrics if "img_per_s" in m]
        stages[name] = {**result, "last_step": steps_here[-1]["step"] if steps_here else None}
        if name == "train" and steps_here:
            stages[name]["first_step_s"] = steps_here[0]["time_s"]
            later = [m["time_s"] for m in steps_here[1:]]
            stages[name]["step_s"] = (later[-1] - steps_here[0]["time_s"]) / len(later) if later else None
    if stages["resume"]["last_step"] != steps:
        raise SystemExit(f"error: the resumed run ended at step {stages['resume']['last_step']}, not {steps}")

    eval_dir, timings = root / "eval", root / "eval_timings.json"
    overrides = [f"backbone={run_dir}", "data=imagenet", f"data.root={root}",
                 "subset_dirs=[" + ",".join(tree["split_dirs"]) + "]", "shots=[1,2,5]", "percent=1",
                 f"output_dir={eval_dir}", f"cache_dir={root / 'features'}", "cache=false", "plot=false",
                 f"progress={'true' if progress else 'false'}", "device=cpu"] + ([f"lambd={lambd}"] if lambd else [])
    log_path = logs / "eval.log"
    result = run_measured([python, __file__, "--child-eval", str(timings), "--", *overrides], log_path)
    _check(result, "eval_lowshot.py", log_path)
    results = json.loads((eval_dir / "results.json").read_text())
    calls = json.loads(timings.read_text())
    timing = results["timing"]
    labelled = int(results["features_extracted"]["train_rows"])
    stages["eval"] = {**result, "timing": timing,
                      "features_labelled_img_s": labelled / max(timing["features_train_s"], 1e-9),
                      "features_test_img_s": tree["val_images"] / max(timing["features_test_s"], 1e-9),
                      "fits": [c for c in calls if c["what"] == "fit"],
                      "select_lambda": [c for c in calls if c["what"] == "select_lambda"],
                      "knn": [c for c in calls if c["what"] == "knn"]}
    return {"tree": tree, "stages": stages, "labelled_rows": labelled,
            "subsets": _subset_table(results), "classes": classes}


def _subset_table(results: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Per subset key, per split: accuracy, k-NN accuracy, lambda, labelled count, source file."""
    groups = {key: entry["splits"] for key, entry in results["shots"].items()}
    groups.update({f"{key}%": entry["splits"] for key, entry in (results.get("percent") or {}).items()})
    table = {}
    for key, records in groups.items():
        table[key] = [{"split": r["split"], "accuracy": r["accuracy"], "knn_accuracy": r["knn_accuracy"],
                       "lambda": r["lambda"], "lambda_selection": r["lambda_selection"],
                       "train_size": r["train_size"], "file": Path(r["file"]).name if r.get("file") else None,
                       "seconds": r["seconds"]} for r in records]
    return table


# ---------------------------------------------------------------------------------- report
def _growth(points: list[tuple[float, float]]) -> Optional[float]:
    """Exponent b of ``value ~ size^b`` between the smallest and largest scale."""
    (n0, v0), (n1, v1) = points[0], points[-1]
    if n1 <= n0 or v0 <= 0 or v1 <= 0:
        return None
    return math.log(v1 / v0) / math.log(n1 / n0)


def stage_rows(scales: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per stage: value at each scale, growth exponent, projection to the full data set.

    A stage's size is the training images (scan, resolve, start-up of pre-training), or the
    images it reads (evaluation); stages of fixed size (the solver fits, set by the split files)
    are projected unchanged."""
    def row(name, size_of, value_of, unit, full_size):
        points = [(size_of(s), value_of(s)) for s in scales]
        largest_n, largest_v = points[-1]
        projected = largest_v
        if full_size and largest_n:
            (n0, v0) = points[0]
            if len(points) > 1 and largest_n > n0:  # the line through the smallest and largest scale
                slope = max(0.0, (largest_v - v0) / (largest_n - n0))  # a falling value is noise: held
                projected = largest_v + slope * (full_size - largest_n)
            else:  # one scale: proportional (an upper bound for a stage with a fixed cost)
                projected = largest_v * full_size / largest_n
        return {"stage": name, "unit": unit, "values": [v for _, v in points], "sizes": [n for n, _ in points],
                "growth": _growth(points) if len(points) > 1 else None, "projected_full": projected}

    train_n = lambda s: s["tree"]["train_images"]  # noqa: E731
    eval_n = lambda s: s["tree"]["val_images"] + s["labelled_rows"]  # noqa: E731
    full_eval = VAL_IMAGES + (scales[-1]["labelled_rows"] if scales[-1]["classes"] == 1000 else 0)
    st = lambda s, k: s["stages"][k]  # noqa: E731
    rows = [
        row("build tree (links)", train_n, lambda s: st(s, "build_tree")["wall_s"], "s", TRAIN_IMAGES),
        row("scan train/ (build_dataset)", train_n, lambda s: st(s, "scan")["scan_s"], "s", TRAIN_IMAGES),
        row("image_names()", train_n, lambda s: st(s, "scan")["names_s"], "s", TRAIN_IMAGES),
        row("NameIndex + resolve all split files", train_n, lambda s: st(s, "scan")["resolve_s"], "s", TRAIN_IMAGES),
        row("scan: RSS after scan - after imports", train_n,
            lambda s: st(s, "scan")["scan_rss_mib"] - st(s, "scan")["import_rss_mib"], "MiB", TRAIN_IMAGES),
        row("scan: peak RSS", train_n, lambda s: st(s, "scan")["peak_rss_mib"], "MiB", TRAIN_IMAGES),
        row("pre-training: process wall", train_n, lambda s: st(s, "train")["wall_s"], "s", TRAIN_IMAGES),
        row("pre-training: first step (first batch)", train_n, lambda s: st(s, "train")["first_step_s"], "s", None),
        row("pre-training: per later step", train_n, lambda s: st(s, "train")["step_s"] or 0.0, "s", None),
        row("pre-training: peak RSS, main process", train_n, lambda s: st(s, "train")["peak_rss_mib"], "MiB",
            TRAIN_IMAGES),
        row("pre-training: peak RSS, with loader workers", train_n, lambda s: st(s, "train")["peak_tree_rss_mib"],
            "MiB", TRAIN_IMAGES),
        row("resume: process wall", train_n, lambda s: st(s, "resume")["wall_s"], "s", TRAIN_IMAGES),
        row("evaluation: setup (splits, subsets)", train_n, lambda s: st(s, "eval")["timing"]["setup_s"], "s",
            TRAIN_IMAGES),
        row("evaluation: features, labelled (s)", eval_n, lambda s: st(s, "eval")["timing"]["features_train_s"], "s",
            None),
        row("evaluation: features, test (s)", eval_n, lambda s: st(s, "eval")["timing"]["features_test_s"], "s",
            full_eval),
        row("evaluation: features, test (img/s)", eval_n, lambda s: st(s, "eval")["features_test_img_s"], "img/s",
            None),
        row("evaluation: classifiers (all fits + k-NN)", eval_n, lambda s: st(s, "eval")["timing"]["classifiers_s"],
            "s", None),
        row("evaluation: k-NN (all subsets)", eval_n, lambda s: sum(c["seconds"] for c in st(s, "eval")["knn"]), "s",
            full_eval),
        row("evaluation: whole process wall", train_n, lambda s: st(s, "eval")["wall_s"], "s", TRAIN_IMAGES),
        row("evaluation: peak RSS, main process", train_n, lambda s: st(s, "eval")["peak_rss_mib"], "MiB",
            TRAIN_IMAGES),
        row("evaluation: peak RSS, with loader workers", train_n, lambda s: st(s, "eval")["peak_tree_rss_mib"],
            "MiB", TRAIN_IMAGES),
    ]
    return rows


def write_document(scales: list[dict[str, Any]], command: str, work: Path, subsets: Path, path: Path = DOC) -> None:
    """``imagenet_rehearsal.md`` and ``.json`` beside it (the work and split folders shown as
    ``$WORK`` and ``$SUBSETS``)."""
    rows = stage_rows(scales)
    largest = scales[-1]
    payload = {"command": command, "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
               "scales": scales, "stages": rows}
    from msn import files

    text = json.dumps(payload, indent=1, default=str)
    for local, shown in ((str(work), "$WORK"), (str(subsets.resolve()), "$SUBSETS"), (str(subsets), "$SUBSETS")):
        text = text.replace(local, shown)  # no machine path in the document
    files.write_text(path.with_suffix(".json"), text + "\n")
    sizes = " / ".join(f"{s['tree']['train_images']:,}" for s in scales)
    lines = [
        "# ImageNet-1k at its real shape, rehearsed on a CPU",
        "",
        f"Written by `{command}` (scripts/imagenet_rehearsal.py). An ImageFolder with ImageNet-1k's",
        f"shape: {largest['classes']} class folders named by the standard split files' wnids, every file those",
        "files name under its own name, generated JPEGs up to the training size, and validation images;",
        "then the README's commands on it: the scan, pre-training (`data=imagenet`, a tiny backbone,",
        "a few steps, then a resumed run) and `eval_lowshot.py` with `subset_dirs` = the three split",
        "folders, `shots=[1,2,5]` and `percent=1`. Each stage ran in its own process on a shared",
        "2-core machine: times are indicative; the growth exponent b (value ~ images^b between the",
        "smallest and largest scale) is what the rehearsal checks (b <= 1 is at most linear).",
        "",
        f"Training images per scale: {sizes}; validation images: "
        + " / ".join(f"{s['tree']['val_images']:,}" for s in scales)
        + "; labelled images (union of all subsets): " + " / ".join(f"{s['labelled_rows']:,}" for s in scales) + ".",
        "",
        "| stage | unit | " + " | ".join(f"at {s['tree']['train_images']:,}" for s in scales)
        + " | growth b | projected to 1,281,167 + 50,000 |",
        "|---|---|" + "---|" * len(scales) + "---|---|",
    ]
    for r in rows:
        growth = "" if r["growth"] is None else f"{r['growth']:.2f}"
        lines.append(f"| {r['stage']} | {r['unit']} | " + " | ".join(f"{v:,.2f}" for v in r["values"])
                     + f" | {growth} | {r['projected_full']:,.1f} |")
    lines += ["", "Projection: the line through the smallest and largest scale, extended to the full size",
              "(a value that fell between the scales, which only the machine's load can cause, is held at",
              "the largest scale's); with one scale, proportional. Stages whose size does not change with",
              "the training set (the steps, the fits: set by the split files, already real at 1,000",
              "classes) keep the largest scale's value; test-set stages are scaled to 50,000 images.",
              "Only `imagenet_subsets1` holds a `1percent.txt` (the authors ship one 1% split), so 1%",
              "has one split.", "",
              "## Solver fits at the largest scale", "",
              "| call | rows | lambda | iterations | seconds |", "|---|---|---|---|---|"]
    fits = largest["stages"]["eval"]["fits"]
    for fit in fits:
        lines.append(f"| fit | {fit['rows']:,} | {fit['lambd']:g} | {fit['iterations']} | {fit['seconds']:.2f} |")
    for call in largest["stages"]["eval"]["select_lambda"]:
        lines.append(f"| lambda selection (all folds and lambdas) | {call['rows']:,} | | | {call['seconds']:.2f} |")
    lines += ["", "## The low-shot table at the largest scale (the pipeline is wired right: chance is "
              f"{100 / largest['classes']:.2f}%)", "",
              "| subset | split | file | labelled | lambda | logistic regression | k-NN |", "|---|---|---|---|---|---|---|"]
    for key, records in largest["subsets"].items():
        for r in records:
            lines.append(f"| {key} | {r['split']} | {r['file']} | {r['train_size']:,} | {r['lambda']:g} "
                         f"({r['lambda_selection']}) | {r['accuracy']:.1f} | {r['knn_accuracy']:.1f} |")
    files.write_text(path, "\n".join(lines) + "\n")


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child-scan":
        return measure_scan(argv[1], argv[2:])
    if argv and argv[0] == "--child-eval":
        return instrumented_eval(argv[1], argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=lambda v: TRAIN_IMAGES if v == "full" else int(v), action="append",
                        help="training images (repeat for several scales; 'full' = 1,281,167)")
    parser.add_argument("--classes", type=int, default=1000, help="the first N wnids of the split files")
    parser.add_argument("--val-per-class", type=int, default=VAL_PER_CLASS)
    parser.add_argument("--steps", type=int, default=4, help="pre-training steps (half, then resumed to all)")
    parser.add_argument("--subsets", type=Path, default=None, help="folder of imagenet_subsets{1,2,3}")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "msn_imagenet_rehearsal",
                        help="where the trees are built (local disk)")
    parser.add_argument("--output", type=Path, default=DOC, help="the results document (.md; .json beside it)")
    parser.add_argument("--lambd", type=float, default=None,
                        help="evaluate with this fixed lambda (default: the evaluator's cross-validated choice)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--document-only", action="store_true",
                        help="rewrite the document from the last run's measurements (<work>/scales.json)")
    args = parser.parse_args(argv)
    subsets = args.subsets or default_subsets()
    if args.document_only:
        saved = json.loads((args.work / "scales.json").read_text())
        write_document(saved["scales"], saved["command"], args.work, subsets, args.output)
        return None
    if not subsets.is_dir():
        raise SystemExit(f"error: --subsets: {subsets} is not a folder (the standard ImageNet split files)")
    scales = []
    for train_images in sorted(args.scale or [26_000]):
        print(f"== rehearsal: {args.classes} classes, {train_images:,} training images", flush=True)
        scales.append(rehearse(args.work, subsets, args.classes, train_images, args.val_per_class, args.steps,
                               not args.no_progress, args.lambd))
        print(json.dumps({k: v.get("wall_s") for k, v in scales[-1]["stages"].items()}), flush=True)
    command = "python scripts/imagenet_rehearsal.py " + " ".join(
        [f"--scale {n}" for n in sorted(args.scale or [26_000])]
        + ([f"--classes {args.classes}"] if args.classes != 1000 else [])
        + ([f"--val-per-class {args.val_per_class}"] if args.val_per_class != VAL_PER_CLASS else [])
        + ([f"--steps {args.steps}"] if args.steps != 4 else []) + ([f"--lambd {args.lambd:g}"] if args.lambd else []))
    (args.work / "scales.json").write_text(json.dumps({"command": command, "scales": scales}, default=str) + "\n")
    write_document(scales, command, args.work, subsets, args.output)
    print(f"wrote {args.output} and {args.output.with_suffix('.json')}")


if __name__ == "__main__":
    main()
