"""Reporting of low-shot results: the ``results.json`` document, the printed table and the PNG chart.

The MSN paper (Assran et al., 2022, Table 1 / Fig. 1; docs/method.md Sec. 8) reports top-1
accuracy on the validation set as mean +- std over three labelled splits, per number of
labelled images per class, plus the single 1% split. Here the std is the sample standard
deviation over splits (``ddof=1``; 0 for a single split). The ``results.json`` schema is
documented in ``docs/eval.md``; :func:`results_document` assembles it.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from msn import files
from msn.eval.baseline_names import PIXELS, RANDOM, SUPERVISED
from msn.eval.config import EvalConfig, eval_config_to_dict
from msn.eval.subsets import format_percent, percent_key
from msn.export.model_card import LOWSHOT_SCHEMA
from msn.tables import markdown_table

log = logging.getLogger(__name__)

#: ``schema`` of results.json; its one home is the model card, which reads these documents
SCHEMA = LOWSHOT_SCHEMA
SCHEMA_VERSION = 1

OBJECTIVE = "mean_i CE(W x_i, y_i) + lambda/(2N) ||W||_F^2 (no intercept; sklearn C = 1/lambda)"


@dataclass
class RunFacts:
    """What one run of :func:`msn.eval.lowshot.run_lowshot` found, for :func:`results_document`.

    Attributes:
        baseline: the :class:`msn.eval.baselines.Backbone` (or baseline) evaluated.
        backbone: the ``backbone`` section (from its ``build_encoder``).
        encoder: the :class:`msn.eval.features.Encoder` of the run.
        feature_dim: columns of the extracted rows.
        device: where features and classifiers ran.
        precision: ``bf16`` or ``fp32``, the encoder's.
        train_images, test_images: sizes of the two splits.
        test_images_used: test rows scored (readable, within ``test_limit``).
        classes: number of classes.
        labelled_images_skipped: unreadable labelled images left out.
        records: per-split records (:func:`msn.eval.baselines.subset_record`) by subset key.
        train_extracted, test_extracted: rows computed by this run (the rest came from the cache).
        train_rows, test_rows: rows asked for.
        cache_dir: the feature cache folder, ``None`` without cache.
        timing: seconds per phase; ``total_s`` is added.
        started: ``time.perf_counter()`` at the start of the run.
    """

    baseline: Any
    backbone: dict[str, Any]
    encoder: Any
    feature_dim: int
    device: Any
    precision: str
    train_images: int
    test_images: int
    test_images_used: int
    classes: int
    labelled_images_skipped: int
    records: dict[str, list[dict[str, Any]]]
    train_extracted: int
    test_extracted: int
    train_rows: int
    test_rows: int
    cache_dir: Any
    timing: dict[str, float]
    started: float


def results_document(cfg: EvalConfig, run: RunFacts) -> dict[str, Any]:
    """The ``results.json`` content of a run (docs/eval.md; docs/method.md Sec. 8)."""
    shots = {str(k): summarise(run.records[str(k)]) for k in cfg.shots}
    percent = {}
    if cfg.percent is not None:
        entry = summarise(run.records[percent_key(cfg.percent)])
        percent[format_percent(cfg.percent)] = {"percent": cfg.percent, **entry}
    wall = time.perf_counter() - run.started
    run.timing["total_s"] = wall
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "backbone": run.backbone,
        "baseline": cfg.baseline,
        "feature": {
            "kind": run.baseline.feature_kind(),
            "blocks": run.baseline.feature_blocks(),
            "dim": int(run.feature_dim),
            "image_size": run.encoder.image_size,
            "transform": repr(run.encoder.transform),
            "normalisation": "per row: subtract the row mean, divide by the L2 norm",
            "device": str(run.device),
            "precision": run.precision,
        },
        "data": {
            "name": cfg.data.name,
            "root": cfg.data.root,
            "train_images": run.train_images,
            "test_images": run.test_images,
            "test_images_used": run.test_images_used,
            "classes": run.classes,
            "labelled_images_skipped": run.labelled_images_skipped,
        },
        "classifier": {
            "type": "multinomial logistic regression, L2 penalty, no intercept",
            "objective": OBJECTIVE,
            "solver": "L-BFGS (strong Wolfe), full batch",
            "lambda_fixed": cfg.lambd,
            "lambda_grid": sorted(cfg.lambd_grid),
            "lambda_fallback": cfg.lambd_fallback,
            "cv_folds": cfg.cv_folds,
            "tol": cfg.tol,
            "max_iter": cfg.max_iter,
            "dtype": cfg.solver_dtype,
        },
        "supervised": run.baseline.recipe(),
        "knn": {"k": cfg.knn_k, "temperature": cfg.knn_temperature, "similarity": "cosine"},
        "subsets": {
            "generated": not cfg.subset_dirs,
            "seed": cfg.seed,
            "splits": len(cfg.subset_dirs) or cfg.splits,
            "folder": str(Path(cfg.output_dir) / "subsets") if not cfg.subset_dirs else None,
            "subset_dirs": list(cfg.subset_dirs),
            "percent_file": cfg.percent_file,
        },
        "shots": shots,
        "percent": percent,
        "features_extracted": {"train": run.train_extracted, "test": run.test_extracted,
                               "train_rows": run.train_rows, "test_rows": run.test_rows,
                               "cache_dir": str(run.cache_dir) if run.cache_dir else None},
        "timing": run.timing,
        "wall_time_s": wall,
        "config": eval_config_to_dict(cfg),
    }


def publish(results: dict[str, Any], out_dir: Path, chart: bool) -> None:
    """Print the table, write ``results.json`` and, when ``chart``, ``lowshot.png`` into ``out_dir``."""
    print(format_table(results), flush=True)
    json_path = write_json(results, out_dir / "results.json")
    if chart:
        log.info("chart: %s", plot(results, out_dir / "lowshot.png"))
    log.info("results: %s", json_path)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``; 0.0 for one value)."""
    values = [float(v) for v in values]
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate the per-split records of one subset size into the ``results.json`` entry."""
    acc = [r["accuracy"] for r in records]
    knn = [r["knn_accuracy"] for r in records]
    mean, std = mean_std(acc)
    knn_mean, knn_std = mean_std(knn)
    per_class = [r["images_per_class"] for r in records]
    return {
        "accuracy": acc,
        "mean": mean,
        "std": std,
        "lambda": [r["lambda"] for r in records],
        "lambda_selection": [r["lambda_selection"] for r in records],
        "knn_accuracy": knn,
        "knn_mean": knn_mean,
        "knn_std": knn_std,
        "train_size": [r["train_size"] for r in records],
        "images_per_class": sum(p["mean"] for p in per_class) / len(per_class),
        "splits": records,
    }


def _fmt(mean: float, std: float) -> str:
    return f"{mean:6.2f} +- {std:4.2f}"


def _lambda_cell(entry: dict[str, Any]) -> str:
    methods = set(entry["lambda_selection"])
    method = methods.pop() if len(methods) == 1 else "mixed"
    return f"{method}: " + ", ".join(f"{v:g}" for v in entry["lambda"])


def format_table(results: dict[str, Any]) -> str:
    """Title lines and a padded markdown table: one row per subset size (k-shot rows, then percent rows)."""
    knn_k = results["knn"]["k"]
    header = ["labelled/class", "splits", "logreg top-1", f"k-NN top-1 (k={knn_k})", "lambda"]
    rows = []
    for key, entry in results["shots"].items():
        rows.append([key, str(len(entry["accuracy"])), _fmt(entry["mean"], entry["std"]),
                     _fmt(entry["knn_mean"], entry["knn_std"]), _lambda_cell(entry)])
    for key, entry in results["percent"].items():
        rows.append([f"{key}% ({entry['images_per_class']:.1f})", str(len(entry["accuracy"])),
                     _fmt(entry["mean"], entry["std"]), _fmt(entry["knn_mean"], entry["knn_std"]),
                     _lambda_cell(entry)])
    title = (
        f"Low-shot top-1 accuracy (%) on {results['data']['name']} "
        f"({results['data']['test_images_used']} test images, mean +- std over splits)\n"
        f"encoder: {describe_encoder(results)}; feature: {results['feature']['kind']} "
        f"(dim {results['feature']['dim']}); wall time {results['wall_time_s']:.1f} s"
    )
    return title + "\n" + markdown_table(header, rows, padded=True)


def describe_encoder(results: dict[str, Any]) -> str:
    """One phrase naming what was evaluated."""
    baseline = results.get("baseline")
    backbone = results.get("backbone") or {}
    path = backbone.get("path")
    if baseline == PIXELS:
        return "raw pixels (baseline)"
    if baseline == RANDOM:
        return f"random init of the architecture of {path} (baseline)"
    if baseline == SUPERVISED:
        return f"supervised from scratch, architecture of {path} (baseline)"
    return f"{path} [{backbone.get('which')}]"


def write_json(results: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``results.json`` (NaN written as ``null``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return files.write_text(path, json.dumps(clean(results), indent=2) + "\n")


def labels_per_class_axis(ax, xs: Sequence[float]) -> None:
    """x axis of the low-shot charts: labelled images per class, log scale, one tick per size."""
    if xs and min(xs) > 0:
        ax.set_xscale("log")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([f"{x:g}" for x in xs])
        ax.minorticks_off()
    ax.set_xlabel("labelled images per class")


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Tight layout, write the PNG (creating its folder), close the figure; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = files.write_with(path, fig.savefig)
    plt.close(fig)
    return path


def plot(results: dict[str, Any], path: str | os.PathLike) -> Path:
    """PNG chart: top-1 accuracy vs labelled images per class (log x), mean +- std error bars.

    Logistic regression and k-NN are two series over the k-shot sizes; percent subsets are
    separate markers at their mean number of images per class, labelled with the percentage.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    shots = sorted(results["shots"].values(), key=lambda e: e["images_per_class"])
    percents = sorted(results["percent"].items(), key=lambda item: item[1]["images_per_class"])
    xs = sorted({e["images_per_class"] for e in shots} | {e["images_per_class"] for _, e in percents})
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for name, mean_key, std_key, style, marker in (
        ("logistic regression", "mean", "std", "o-", "*"),
        (f"k-NN (k={results['knn']['k']})", "knn_mean", "knn_std", "s--", "X"),
    ):
        line = ax.errorbar([e["images_per_class"] for e in shots], [e[mean_key] for e in shots],
                           yerr=[e[std_key] for e in shots], fmt=style, capsize=4, label=name)
        color = line[0].get_color()
        for key, entry in percents:
            ax.errorbar([entry["images_per_class"]], [entry[mean_key]], yerr=[entry[std_key]], fmt=marker,
                        color=color, markersize=10, capsize=4, label=f"{name}, {key}% of each class")
            ax.annotate(f"{key}%", (entry["images_per_class"], entry[mean_key]), textcoords="offset points",
                        xytext=(7, -4), fontsize=8, color=color)
    labels_per_class_axis(ax, xs)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"{results['data']['name']}: {describe_encoder(results)}"[:90], fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_methods(runs: Sequence[tuple[str, dict[str, Any]]], path: str | os.PathLike, title: str | None = None,
                 metric: str = "mean") -> Path:
    """PNG chart comparing several evaluations: accuracy vs labelled images per class, one line per run.

    Args:
        runs: ``(label, results)`` pairs, ``results`` being ``results.json`` contents.
        path: the PNG to write.
        title: chart title (default: the data set's name).
        metric: ``mean`` (logistic regression, or the supervised network's own predictions) or
            ``knn_mean``; error bars are the matching std over splits.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    std_key = "std" if metric == "mean" else "knn_std"
    fig, ax = plt.subplots(figsize=(6.8, 4.6), dpi=120)
    ticks: set[float] = set()
    for label, results in runs:
        entries = sorted([*results["shots"].values(), *results["percent"].values()],
                         key=lambda e: e["images_per_class"])
        xs = [e["images_per_class"] for e in entries]
        ticks.update(xs)
        ax.errorbar(xs, [e[metric] for e in entries], yerr=[e[std_key] for e in entries], fmt="o-", capsize=3,
                    label=label, linewidth=1.4, markersize=4)
    labels_per_class_axis(ax, sorted(ticks))
    ax.set_ylabel("top-1 accuracy (%)" + (" (k-NN)" if metric == "knn_mean" else ""))
    if runs:
        ax.set_title(title or f"{runs[0][1]['data']['name']}: low-shot accuracy", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
