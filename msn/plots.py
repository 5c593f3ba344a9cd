"""Training curves of a run: ``python -m msn.plots RUN_DIR [RUN_DIR ...]`` (or ``msn-plot``).

Reads each run's ``metrics.jsonl`` and draws loss terms (total, CE, ME-MAX, entropy), the
collapse monitors (``np``, ``max_t``, the target embeddings' effective ``rank``; docs/method.md
Sec. 5), the schedules (lr, wd, EMA momentum) and throughput,
one panel each, and, when the records hold them, the live low-shot monitor's accuracies
(``monitor/knn_top1``, ``monitor/<k>shot``; docs/eval.md "Live monitor") against the step,
into ``<first run>/training_curves.png`` (or ``--output``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from msn.files import write_with
from msn.metrics_log import read_metrics

PANELS = (
    ("loss", ("loss", "ce"), "loss terms"),
    ("memax", ("memax",), "ME-MAX (0 = all prototypes used equally)"),
    ("entropy", ("entropy",), "mean prediction entropy"),
    ("np", ("np",), "distinct target prototypes per batch (np)"),
    ("max_t", ("max_t", "min_max_t", "min_t"), "target probabilities (mean largest, least confident largest, mean smallest)"),
    ("rank", ("rank",), "effective rank of the target embeddings (RankMe)"),
    ("lr", ("lr",), "learning rate"),
    ("wd", ("wd",), "weight decay"),
    ("momentum", ("momentum",), "EMA momentum"),
    ("img_per_s", ("img_per_s",), "images / s"),
)


#: The prefix of the live monitor's record keys; its ``seconds`` is a cost, not a curve.
MONITOR_PREFIX, MONITOR_SECONDS = "monitor/", "monitor/seconds"

LINE_STYLES = ("-", "--", "-.", ":")


def monitor_keys(records: list[dict]) -> tuple[str, ...]:
    """The monitor's accuracy keys found in ``records``: k-NN first, then the k-shot ones by k."""
    found = {k for r in records for k in r if k.startswith(MONITOR_PREFIX) and k != MONITOR_SECONDS}

    def order(key: str):
        shots = key.removeprefix(MONITOR_PREFIX).removesuffix("shot")
        return (0, 0, key) if not shots.isdigit() else (1, int(shots), key)

    return tuple(sorted(found, key=order))


def panels_for(records: list[dict]) -> tuple[tuple[str, tuple[str, ...], str], ...]:
    """:data:`PANELS`, plus one panel of the monitor's accuracies when any record holds them."""
    keys = monitor_keys(records)
    if not keys:
        return PANELS
    return PANELS + (("monitor", keys, "live monitor: held-out top-1 % of the target encoder"),)


def run_styles(count: int, reference: int | None = None) -> list[dict]:
    """A distinct colour and line style per run (``tab20``: 20 colours, then the next line
    style), the ``reference`` run drawn black, thick and on top."""
    import matplotlib

    colours = matplotlib.colormaps["tab20"].colors
    styles = [{"color": colours[i % len(colours)], "linestyle": LINE_STYLES[(i // len(colours) + i % 2) % len(LINE_STYLES)],
               "linewidth": 1.2, "zorder": 2} for i in range(count)]
    if reference is not None:
        styles[reference] = {"color": "black", "linestyle": "-", "linewidth": 2.4, "zorder": 3}
    return styles


def _key_style(style: dict, key: int, keys: int, runs: int) -> dict:
    """The style of a run's ``key``-th curve in a panel of several keys: the run's colour
    (or, for a single run, a colour per key) and a line style per key."""
    if keys == 1:
        return style
    import matplotlib

    colour = style["color"] if runs > 1 else matplotlib.colormaps["tab10"].colors[key]
    return {**style, "color": colour, "linestyle": LINE_STYLES[key % len(LINE_STYLES)]}


def plot_runs(run_dirs: list[str | Path], output: str | Path | None = None, labels: list[str] | None = None,
              reference: str | None = None) -> Path:
    """Draw the training curves of one or more runs into a PNG; returns its path.

    Args:
        run_dirs: run directories (each with ``metrics.jsonl``).
        output: the PNG (default: ``<first run>/training_curves.png``).
        labels: legend labels, one per run (default: the directory names).
        reference: the label of the run to emphasise (the others are compared with it).

    Raises:
        FileNotFoundError: a directory without ``metrics.jsonl``.
        ValueError: a run with fewer than two logged points (a curve needs two) or an unknown
            ``reference``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [Path(r) for r in run_dirs]
    records = {}
    for run in runs:
        if not (run / "metrics.jsonl").is_file():
            raise FileNotFoundError(f"{run}: no metrics.jsonl (is this a run directory?)")
        records[run] = read_metrics(run)
        if len(records[run]) < 2:
            raise ValueError(f"{run}: {len(records[run])} logged point(s) in metrics.jsonl; a curve needs two "
                             f"(train longer or lower train.log_every)")
    labels = labels or [r.name for r in runs]
    if reference is not None and reference not in labels:
        raise ValueError(f"--reference: {reference!r} is not one of the labels {labels}")
    styles = run_styles(len(runs), labels.index(reference) if reference is not None else None)
    panels = panels_for([r for run in runs for r in records[run]])
    columns = 3
    rows = (len(panels) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    for axis, (panel, keys, title) in zip(axes.flat, panels):
        for run, label, style in zip(runs, labels, styles):
            steps = [r["step"] for r in records[run]]
            for k, key in enumerate(keys):
                values = [r.get(key) for r in records[run]]
                if all(v is None for v in values):
                    continue
                name = label if len(keys) == 1 else f"{label} {key}"
                look = _key_style(style, k, len(keys), len(runs))
                if panel == "monitor":  # evaluated at some steps only: join those points
                    points = [(s, v) for s, v in zip(steps, values) if v is not None]
                    axis.plot(*zip(*points), marker="o", markersize=3, label=name.replace(MONITOR_PREFIX, ""), **look)
                    continue
                axis.plot(steps, [float("nan") if v is None else v for v in values], label=name, **look)
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("step", fontsize=8)
        axis.tick_params(labelsize=7)
        axis.grid(alpha=0.3)
        if len(runs) > 1 or len(keys) > 1:
            axis.legend(fontsize=6)
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    fig.tight_layout()
    path = Path(output) if output else runs[0] / "training_curves.png"
    write_with(path, lambda name: fig.savefig(name, dpi=110))
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="msn-plot", description="Draw the training curves of MSN runs.")
    parser.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
    parser.add_argument("--output", "-o", help="PNG path (default: <first run>/training_curves.png)")
    parser.add_argument("--labels", nargs="*", help="legend labels, one per run")
    parser.add_argument("--reference", help="label of the run to draw emphasised")
    args = parser.parse_args(argv)
    try:
        path = plot_runs(args.runs, args.output, args.labels, args.reference)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
