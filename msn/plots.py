"""Training curves of a run: ``python -m msn.plots RUN_DIR [RUN_DIR ...]`` (or ``msn-plot``).

Reads each run's ``metrics.jsonl`` and draws loss terms (total, CE, ME-MAX, entropy), the
collapse monitors (``np``, ``max_t``), the schedules (lr, wd, EMA momentum) and throughput,
one panel each, into ``<first run>/training_curves.png`` (or ``--output``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from msn.logging import read_metrics

PANELS = (
    ("loss", ("loss", "ce"), "loss terms"),
    ("memax", ("memax",), "ME-MAX (0 = all prototypes used equally)"),
    ("entropy", ("entropy",), "mean prediction entropy"),
    ("np", ("np",), "distinct target prototypes per batch (np)"),
    ("max_t", ("max_t", "min_max_t", "min_t"), "target probabilities (mean largest, least confident largest, mean smallest)"),
    ("lr", ("lr",), "learning rate"),
    ("wd", ("wd",), "weight decay"),
    ("momentum", ("momentum",), "EMA momentum"),
    ("img_per_s", ("img_per_s",), "images / s"),
)


def plot_runs(run_dirs: list[str | Path], output: str | Path | None = None, labels: list[str] | None = None) -> Path:
    """Draw the training curves of one or more runs into a PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [Path(r) for r in run_dirs]
    records = {}
    for run in runs:
        if not (run / "metrics.jsonl").is_file():
            raise FileNotFoundError(f"{run}: no metrics.jsonl (is this a run directory?)")
        records[run] = read_metrics(run)
    labels = labels or [r.name for r in runs]
    columns = 3
    rows = (len(PANELS) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    for axis, (_, keys, title) in zip(axes.flat, PANELS):
        for run, label in zip(runs, labels):
            steps = [r["step"] for r in records[run]]
            for key in keys:
                values = [r.get(key) for r in records[run]]
                if all(v is None for v in values):
                    continue
                name = label if len(keys) == 1 else f"{label} {key}"
                axis.plot(steps, [float("nan") if v is None else v for v in values], label=name, linewidth=1.2)
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("step", fontsize=8)
        axis.tick_params(labelsize=7)
        axis.grid(alpha=0.3)
        if len(runs) > 1 or len(keys) > 1:
            axis.legend(fontsize=6)
    for axis in list(axes.flat)[len(PANELS):]:
        axis.axis("off")
    fig.tight_layout()
    path = Path(output) if output else runs[0] / "training_curves.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="msn-plot", description="Draw the training curves of MSN runs.")
    parser.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
    parser.add_argument("--output", "-o", help="PNG path (default: <first run>/training_curves.png)")
    parser.add_argument("--labels", nargs="*", help="legend labels, one per run")
    args = parser.parse_args(argv)
    try:
        path = plot_runs(args.runs, args.output, args.labels)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
