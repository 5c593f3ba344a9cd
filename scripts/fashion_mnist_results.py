"""The Fashion-MNIST showcase, end to end: ``make results`` (or ``python scripts/fashion_mnist_results.py``).

Stages (each a subprocess whose exact command and wall time go into the report; a stage whose
output already exists is skipped, so an interrupted run continues where it stopped; ``--force``
redoes everything):

1. pre-train MSN with ``experiment=fmnist_msn`` on the 60k training images (labels unused);
2. export the target encoder to a transformers ``ViTMSNModel`` folder (``msn-export``);
3. low-shot evaluation of the export and of three baselines (raw pixels, random init,
   supervised from scratch), 1/2/5/10 images per class and 1%, 5 splits, 10k test images;
4. the same evaluation of every epoch checkpoint (accuracy vs pre-training time);
5. the ablations, each a shorter pre-training run of the same recipe with one change;
6. the budget curve: the preset re-run at other epoch counts, each with its own full schedule
   (warm-up, cosine, EMA and weight-decay ramps sized to that run), so the rows show what more
   compute buys and not a checkpoint of one schedule (``--budget-epochs``, default 2 14 26: about
   10, 60 and 120 minutes);
7. figures (``msn.eval.report.plot_methods``, ``msn.plots``) and ``docs/results/fashion_mnist.md``.

``--smoke`` runs the same stages on a tiny budget (256 images, a few steps, 2 splits, 500 test
images) into a scratch folder: the CI test of this pipeline.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from msn import files
from msn.eval import report
from msn.metrics_log import read_metrics
from msn.plots import plot_runs
from msn.tables import markdown_table

ROOT = Path(__file__).resolve().parents[1]

PRESET = "fmnist_msn"
FULL_EVAL = ["shots=[1,2,5,10]", "percent=1", "splits=5"]
SHORT_EVAL = ["shots=[1,5,10]", "splits=5"]
PAIRED_SHOT = "5"  # the ablation table's paired-difference column
#: The ablations' fixed L2 strength: the median lambda that cross-validation picked for the
#: showcase's 5-shot splits. Cross-validating lambda on 5 images per class picked 10 or more on 12
#: of 100 ablation splits (7.9 points lost on average), which swamped the runs' differences.
ABLATION_LAMBDA = 0.01


@dataclass
class Ablation:
    """One ablation: a name, the overrides it changes and what it tests."""

    name: str
    overrides: list[str]
    question: str
    baseline: str = "reference"  #: the ablation its paired difference is taken against


ABLATIONS = [
    Ablation("reference", [], "the preset's recipe at the ablation budget"),
    Ablation("mask_0", ["mask.ratio=0.0"], "no masking: is the masked-anchor objective what helps?"),
    Ablation("mask_0.15", ["mask.ratio=0.15"], "the paper's ViT-S ratio"),
    Ablation("mask_0.5", ["mask.ratio=0.5"], "heavier masking"),
    Ablation("mask_shared", ["mask.shared=true"], "one mask for the whole batch (the reference code) vs one per image"),
    Ablation("sinkhorn_off", ["loss.use_sinkhorn=false"], "targets without Sinkhorn balancing"),
    Ablation("memax_5", ["loss.memax_weight=5.0"], "ME-MAX weight 5 instead of 1"),
    Ablation("focal_10", ["data.views.num_focal=10"], "10 focal views (the paper)"),
    Ablation("focal_0", ["data.views.num_focal=0"], "no focal views"),
    Ablation("patch4_mask0.7", ["model.patch_size=4", "data.views.focal_size=12", "mask.ratio=0.7", "data.views.num_focal=0"],
             "patch 4 (49 tokens), 70% masked, no focal views: finer tokens at about the preset's cost per image"),
    Ablation("lr_floor", ["optim.final_lr=5e-4"], "cosine floor at half the peak learning rate (a 1-epoch run "
             "ends near a quarter of it)"),
    Ablation("pos_sincos", ["model.pos_embed=sincos"], "a fixed 2-D sin-cos position table instead of a learned one"),
    Ablation("crop_0.14", ["data.views.rand_scale=[0.14,1.0]"], "stronger crops: 14-100% of the image instead of 30-100%"),
    Ablation("jitter_off", ["data.views.color_jitter_prob=0.0"],
             "no brightness/contrast jitter (saturation and hue do nothing on grey images)"),
    Ablation("blur_off", ["data.views.blur_prob=0.0"], "no Gaussian blur"),
    Ablation("depth_4", ["model.depth=4"], "4 blocks instead of 6: fewer layers, more images per second"),
    Ablation("width_192", ["model.embed_dim=192"], "192 wide instead of 128 (4 heads of 48): more capacity per image"),
    Ablation("protos_1024", ["loss.num_prototypes=1024"], "1024 prototypes (the paper) instead of 256"),
    Ablation("reference_seed1", ["seed=1"], "the reference with another seed: how much one run differs from the next"),
    Ablation("mask_shared_seed1", ["mask.shared=true", "seed=1"],
             "shared masks again with seed 1: does their lead hold?", baseline="reference_seed1"),
]


@dataclass
class Budget:
    """How much of everything a run does (``full`` or ``smoke``)."""

    name: str
    train: list[str]
    ablation_train: list[str]
    eval_full: list[str]
    eval_short: list[str]
    curve_epochs: list[int]
    eval_extra: list[str] = field(default_factory=list)


def budgets(ablation_epochs: int, curve_epochs: list[int]) -> dict[str, Budget]:
    return {
        "full": Budget("full", [], [f"optim.epochs={ablation_epochs}"], FULL_EVAL, SHORT_EVAL, curve_epochs),
        "smoke": Budget(
            "smoke",
            ["data.subset=256", "optim.epochs=2", "optim.batch_size=64", "train.log_every=1", "train.progress=false",
             "model.depth=2", "head.hidden_dim=64", "head.output_dim=32", "loss.num_prototypes=16"],
            ["optim.epochs=1"],
            ["shots=[1,2]", "percent=1", "splits=2"],
            ["shots=[1]", "splits=2"],
            [1],
            ["test_limit=500", "supervised_steps=2", "supervised_min_epochs=0", "progress=false", "lambd_grid=[0.1,1.0]", "cv_folds=2"],
        ),
    }


class Pipeline:
    """Runs the stages, remembers each command and its wall time."""

    def __init__(self, out: Path, budget: Budget, force: bool, python: str):
        self.out, self.budget, self.force, self.python = out, budget, force, python
        self.commands: list[dict] = []
        self.out.mkdir(parents=True, exist_ok=True)
        self.ledger_path = out / "commands.json"
        self.ledger = json.loads(self.ledger_path.read_text()) if self.ledger_path.is_file() and not force else {}

    def run(self, key: str, args: list[str], done: Path, stage: str) -> None:
        """Run ``args`` unless ``done`` exists; record the command and its wall time under ``key``."""
        shown = " ".join(shlex.quote(a) for a in args)
        if done.exists() and not self.force:
            print(f"[skip] {stage}: {done} exists", flush=True)
        else:
            print(f"[run ] {stage}: {shown}", flush=True)
            env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HYDRA_FULL_ERROR": "1"}
            start = time.perf_counter()
            result = subprocess.run([self.python, *args], cwd=ROOT, env=env)
            if result.returncode != 0:
                raise SystemExit(f"error: stage {stage!r} failed (exit {result.returncode}): {shown}")
            self.ledger[key] = {"command": "python " + shown, "seconds": time.perf_counter() - start, "stage": stage}
            files.write_text(self.ledger_path, json.dumps(self.ledger, indent=2) + "\n")
        self.commands.append({"key": key, "stage": stage, **self.ledger.get(key, {"command": "python " + shown,
                                                                                     "seconds": float("nan")})})

    def rel(self, path: Path) -> str:
        return os.path.relpath(path, ROOT)

    def train(self, key: str, run_dir: Path, overrides: list[str], stage: str) -> None:
        self.run(key, ["train.py", f"experiment={PRESET}", f"output_dir={self.rel(run_dir)}", *self.budget.train,
                       *overrides], run_dir / "checkpoints" / "latest.pt", stage)

    def evaluate(self, key: str, backbone: Path | None, out_dir: Path, extra: list[str], stage: str,
                 lambd: float | None = None) -> dict:
        """Evaluate ``backbone`` (lambda fixed at ``lambd``, or cross-validated) unless ``out_dir`` holds it."""
        fixed = [f"lambd={lambd}"] if lambd is not None else []
        args = ["eval_lowshot.py", f"output_dir={self.rel(out_dir)}", *extra, *fixed, *self.budget.eval_extra]
        if backbone is not None:
            args.insert(1, f"backbone={self.rel(backbone)}")
        self.run(key, args, out_dir / "results.json", stage)
        results = json.loads((out_dir / "results.json").read_text())
        found = results.get("classifier", {}).get("lambda_fixed")
        if found != lambd:  # a folder kept from a run with another lambda would pass as this stage's
            raise SystemExit(f"error: {out_dir / 'results.json'} was scored with lambda {found or 'cross-validated'}, "
                             f"stage {stage!r} asks for {lambd or 'cross-validated'}: delete that folder or pass --force")
        return results


def epoch_minutes(run_dir: Path) -> dict[int, float]:
    """Minutes of training at the end of each epoch (from ``metrics.jsonl``)."""
    minutes: dict[int, float] = {}
    for record in read_metrics(run_dir):
        minutes[int(record["epoch"]) + 1] = record["time_s"] / 60.0
    return minutes


def cell(entry: dict | None, key: str = "mean", std: str = "std") -> str:
    if entry is None:
        return "-"
    return f"{entry[key]:.1f} ± {entry[std]:.1f}"


def paired_difference(entry: dict, reference: dict) -> str:
    """``mean ± std`` over splits of ``entry``'s per-split accuracy minus ``reference``'s (same splits)."""
    if entry.get("train_size") != reference.get("train_size"):
        raise ValueError(f"not the same splits: train sizes {entry.get('train_size')} and {reference.get('train_size')}")
    diffs = [a - b for a, b in zip(entry["accuracy"], reference["accuracy"], strict=True)]
    mean = sum(diffs) / len(diffs)
    std = (sum((d - mean) ** 2 for d in diffs) / max(1, len(diffs) - 1)) ** 0.5
    return f"{mean:+.1f} ± {std:.1f}"


def last_record(run_dir: Path) -> dict:
    return read_metrics(run_dir)[-1]


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, {torch.get_num_threads()} threads"


def plot_growth(growth: list[tuple[int, float, dict]], pixels: dict, path: Path, xlabel: str, title: str) -> Path:
    """Accuracy vs minutes of pre-training, one line per subset size; raw pixels as dashed lines."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.8, 4.6), dpi=120)
    for key in growth[0][2]["shots"]:
        line = ax.errorbar([m for _, m, _ in growth], [r["shots"][key]["mean"] for _, _, r in growth],
                           yerr=[r["shots"][key]["std"] for _, _, r in growth], fmt="o-", capsize=3,
                           label=f"MSN, {key} / class")
        if key in pixels["shots"]:
            ax.axhline(pixels["shots"][key]["mean"], color=line[0].get_color(), linestyle="--", linewidth=1,
                       label=f"raw pixels, {key} / class")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return report.save_figure(fig, path)


def monitor_rows(run_dir: Path) -> list[dict]:
    """The records of ``run_dir`` that hold the live monitor's values (docs/eval.md "Live monitor")."""
    return [r for r in read_metrics(run_dir) if "monitor/knn_top1" in r]


def monitor_keys(rows: list[dict]) -> list[str]:
    """The monitor's accuracy keys, in :func:`msn.plots.monitor_keys` order."""
    from msn.plots import monitor_keys as ordered

    return list(ordered(rows))


def plot_monitor(rows: list[dict], path: Path) -> Path:
    """The live monitor's accuracies against the step (and minutes) of the main run."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.8, 4.2), dpi=120)
    for key in monitor_keys(rows):
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], "o-", markersize=3,
                label=key.removeprefix("monitor/").replace("knn_top1", "k-NN (k=20)").replace("shot", " / class"))
    ax.set_xlabel("step")
    ax.set_ylabel("held-out top-1 (%)")
    ax.set_title("Fashion-MNIST: live monitor of the target encoder during pre-training", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return report.save_figure(fig, path)


def header_section(pipe: Pipeline, cfg: dict, msn_results: dict) -> list[str]:
    """Title, provenance and the protocol in one paragraph."""
    return [
        "# MSN on Fashion-MNIST: low-shot results",
        "",
        f"Generated by `make results` (`scripts/fashion_mnist_results.py`, budget `{pipe.budget.name}`) on "
        f"{datetime.date.today().isoformat()}; {machine()}. Every number and figure below comes from that command.",
        "",
        f"Pre-training uses {'the first ' + str(cfg['data']['subset']) if cfg['data'].get('subset') else 'all the'} "
        f"training images without labels; the labelled subsets are drawn from "
        f"the {msn_results['data']['train_images']:,} training images (seeded, nested, "
        f"{msn_results['subsets']['splits']} splits); accuracy is top-1 on "
        f"{msn_results['data']['test_images_used']:,} test images, mean ± std "
        "over splits. Frozen features follow the reference protocol: the target encoder's CLS token before the "
        "final LayerNorm, rows centred and L2-normalised, L2 logistic regression with lambda cross-validated on the "
        "labelled subset (fixed at 0.1 for 1 image per class, where no cross-validation is possible). "
        "The supervised row trains the same ViT from scratch on each labelled subset "
        "(`baseline=supervised`, `msn/eval/supervised.py`) and reports its own predictions.",
        "",
    ]


def lowshot_section(methods: list[tuple[str, dict]], figure: str) -> list[str]:
    """The logistic-regression and k-NN tables of every method, and how often MSN leads."""
    msn_results = methods[0][1]
    shot_keys, pct_keys = list(msn_results["shots"]), list(msn_results["percent"])

    def table(header_of_percent, mean: str, std: str) -> str:
        header = ["method", *(f"{k} / class" for k in shot_keys), *(header_of_percent(p) for p in pct_keys)]
        return markdown_table(header, ([label, *(cell(results["shots"].get(k), mean, std) for k in shot_keys),
                                        *(cell(results["percent"].get(p), mean, std) for p in pct_keys)]
                                       for label, results in methods))

    beats = []
    for label, results in methods[1:]:
        wins = [k for k in shot_keys if msn_results["shots"][k]["mean"] > results["shots"][k]["mean"]]
        wins += [f"{p}%" for p in pct_keys if msn_results["percent"][p]["mean"] > results["percent"][p]["mean"]]
        beats.append(f"{label}: MSN is higher at {len(wins)} of {len(shot_keys) + len(pct_keys)} subset sizes"
                     + (f" ({', '.join(wins)})" if wins else ""))
    return ["## Low-shot accuracy (%)", "",
            table(lambda p: f"{p}% ({msn_results['percent'][p]['images_per_class']:.0f} / class)", "mean", "std"),
            "", "k-NN (k = 20, cosine, temperature 0.07) on the same features:", "",
            table(lambda p: f"{p}%", "knn_mean", "knn_std"),
            "", "Against each baseline (logistic-regression means): " + "; ".join(beats) + ".", "",
            f"![low-shot accuracy vs labels]({figure})", ""]


def pretraining_section(pipe: Pipeline, cfg: dict, msn_results: dict, record: dict, main_run: Path, figure: str) -> list[str]:
    """The preset's recipe, the run's cost and its last logged step."""
    m, o, v = cfg["model"], cfg["optim"], cfg["data"]["views"]
    arch = msn_results["backbone"]
    return [
        "## The pre-training run",
        "",
        f"Preset `experiment={PRESET}` (ViT {arch['embed_dim']} wide, {arch['depth']} blocks, patch {m['patch_size']}; "
        f"{v['rand_size']} px rand views, {v['num_focal']} focal views of {v['focal_size']} px; mask ratio "
        f"{cfg['mask']['ratio']}; batch {o['batch_size']}; {o['epochs']} epochs; lr {o['lr']}; "
        f"{cfg['loss']['num_prototypes']} prototypes; Sinkhorn {'on' if cfg['loss']['use_sinkhorn'] else 'off'}; "
        f"ME-MAX weight {cfg['loss']['memax_weight']}). Resolved config: `{pipe.rel(main_run / 'config.yaml')}`.",
        "",
        f"Training took {record['time_s'] / 60:.1f} min for {record['step']} steps "
        f"({record['img_per_s']:.0f} images/s at the end). Last logged step: loss {record['loss']:.3f} "
        f"(CE {record['ce']:.3f}, ME-MAX {record['memax']:.3f}), np {record['np']:.1f} distinct target prototypes "
        f"per batch, max_t {record['max_t']:.3f}.",
        "",
        f"![training curves]({figure})",
        "",
    ]


def monitor_section(cfg: dict, rows: list[dict], record: dict, figure: str) -> list[str]:
    """The live monitor's settings, cost and every evaluation it made."""
    keys = monitor_keys(rows)
    seconds = sum(r["monitor/seconds"] for r in rows)
    table = markdown_table(["step", "minutes", *(k.removeprefix("monitor/") for k in keys)],
                           ([str(r["step"]), f"{r['time_s'] / 60:.1f}", *(f"{r[k]:.1f}" for k in keys)] for r in rows))
    return ["### Live monitor", "",
            f"The preset's live monitor (docs/eval.md \"Live monitor\"): every {cfg['monitor']['every']} steps "
            f"and at the end, the target encoder scored on {cfg['monitor']['test_images']} held-out training "
            f"images from a pool of {cfg['monitor']['train_images']} labelled ones (k-NN, and logistic "
            f"regression at a fixed lambda averaged over {cfg['monitor']['splits']} subsets). "
            f"Its {len(rows)} evaluations took {seconds:.1f} s in all, "
            f"{100 * seconds / record['time_s']:.2f}% of the run.", "",
            table, "", f"![live monitor]({figure})", ""]


def accuracy_section(title: str, intro: str, unit: str, points: list[tuple[int, float, dict]], figure: str) -> list[str]:
    """A table of ``(unit, minutes, results)`` points, one column per subset size, and its figure."""
    shots = points[0][2]["shots"]
    table = markdown_table([unit, "minutes", *(f"{k} / class" for k in shots)],
                           ([str(count), f"{minutes:.1f}", *(cell(e) for e in results["shots"].values())]
                            for count, minutes, results in points))
    return [f"### {title}", "", intro, "", table, "", figure, ""]


def ablations_section(pipe: Pipeline, ablations: list[tuple[Ablation, dict, dict]], figure: str) -> list[str]:
    """One row per ablation run, with the paired difference to its baseline run."""
    splits = ablations[0][1]["subsets"]["splits"]
    reference = ablations[0][1]
    paired = PAIRED_SHOT if PAIRED_SHOT in reference["shots"] else next(iter(reference["shots"]))
    scores = {ablation.name: results for ablation, results, _ in ablations}
    rows = []
    for ablation, results, last in ablations:
        change = " ".join(f"`{o}`" for o in ablation.overrides) or "none"
        against = "" if ablation.baseline == ablations[0][0].name else f" (vs {ablation.baseline})"
        rows.append([ablation.name, change, ablation.question, f"{last['time_s'] / 60:.1f}",
                     *(cell(e) for e in results["shots"].values()), f"{last['np']:.1f}", f"{last['max_t']:.3f}",
                     paired_difference(results["shots"][paired], scores[ablation.baseline]["shots"][paired]) + against])
    header = ["run", "change", "question", "minutes", *(f"{k} / class" for k in reference["shots"]),
              "np", "max_t", f"Δ {paired} / class"]
    return ["## Ablations", "",
            f"Each row is one pre-training run of the preset with one change, at the ablation budget "
            f"(`{' '.join(pipe.budget.ablation_train)}`), evaluated with {splits} splits and a fixed "
            f"lambda of {ABLATION_LAMBDA} (cross-validating it on a few images per class adds more noise than "
            "most changes make). Every run is scored on the same splits, so the last column is the paired "
            f"difference at {paired} images per class to the first row (or to the run named in the cell): "
            "the mean and std over splits of (this run - that run).",
            "", markdown_table(header, rows), "", f"![ablation curves]({figure})", ""]


def commands_section(pipe: Pipeline, total_s: float) -> list[str]:
    """Every stage's command and wall time."""
    table = markdown_table(["stage", "seconds", "command"],
                           ([e["stage"], f"{e['seconds']:.0f}", f"`{e['command']}`"] for e in pipe.commands))
    return ["## Commands and wall times", "",
            f"Sum of the stage wall times: {sum(e['seconds'] for e in pipe.commands) / 60:.1f} min "
            f"(this invocation of the script: {total_s / 60:.1f} min; it skips the stages whose outputs exist).",
            "", table, ""]


def write_report(path: Path, pipe: Pipeline, methods: list[tuple[str, dict]], growth: list[tuple[int, float, dict]],
                 curve: list[tuple[int, float, dict]], ablations: list[tuple[Ablation, dict, dict]], main_run: Path, figures: dict[str, Path],
                 notes: Path | None, total_s: float) -> None:
    """``docs/results/fashion_mnist.md``: tables, figures, commands and wall times."""
    import yaml

    fig = lambda p: os.path.relpath(p, path.parent)  # noqa: E731
    cfg = yaml.safe_load((main_run / "config.yaml").read_text())
    record = last_record(main_run)
    msn_results = methods[0][1]
    lines = [*header_section(pipe, cfg, msn_results), *lowshot_section(methods, fig(figures["methods"])),
             *pretraining_section(pipe, cfg, msn_results, record, main_run, fig(figures["curves"]))]
    rows = monitor_rows(main_run)
    if rows:
        lines += monitor_section(cfg, rows, record, fig(figures["monitor"]))
    if growth:
        lines += accuracy_section(
            "Accuracy vs pre-training time",
            "Each epoch checkpoint of the run above, evaluated the same way (so the learning-rate schedule "
            "has not finished before the last row).", "epoch", growth, f"![accuracy vs time]({fig(figures['growth'])})")
    if curve:
        lines += accuracy_section(
            "Accuracy vs budget",
            f"The preset run again at other epoch counts, each with its own full schedule (the "
            f"{cfg['optim']['epochs']}-epoch row is the run above), evaluated like the epoch checkpoints: what more "
            "pre-training time buys.", "epochs", curve, f"![accuracy vs budget]({fig(figures['budget'])})")
    if ablations:
        lines += ablations_section(pipe, ablations, fig(figures["ablation_curves"]))
    if notes is not None and notes.is_file():
        lines += [notes.read_text().strip(), ""]
    lines += commands_section(pipe, total_s)
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_text(path, "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny budget (CI): 256 images, a few steps")
    parser.add_argument("--out", default=None, help="run folder (default outputs/fmnist_results[_smoke])")
    parser.add_argument("--report", default=None, help="markdown report (default docs/results/fashion_mnist.md; "
                                                       "with --smoke: <out>/fashion_mnist.md)")
    parser.add_argument("--figures", default=None, help="figure folder (default: beside the report)")
    parser.add_argument("--ablation-epochs", type=int, default=1, help="pre-training epochs of each ablation run")
    parser.add_argument("--no-ablations", action="store_true")
    parser.add_argument("--no-growth", action="store_true", help="skip evaluating the epoch checkpoints")
    parser.add_argument("--budget-epochs", type=int, nargs="*", default=[2, 14, 26],
                        help="epoch counts of the budget curve's extra runs, each a run with its own schedule (the "
                             "preset's run is one more point; about 4 minutes per epoch on 2 cores, so 14 is the "
                             "1-hour point and 26 the 2-hour one; an empty list: no curve)")
    parser.add_argument("--notes", default=str(ROOT / "docs" / "results" / "fashion_mnist_notes.md"),
                        help="hand-written discussion appended to the report (skipped with --smoke)")
    parser.add_argument("--force", action="store_true", help="redo stages whose outputs exist")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    budget = budgets(args.ablation_epochs, args.budget_epochs)["smoke" if args.smoke else "full"]
    out = Path(args.out or ROOT / "outputs" / ("fmnist_results_smoke" if args.smoke else "fmnist_results")).resolve()
    report_path = Path(args.report) if args.report else (out / "fashion_mnist.md" if args.smoke else
                                                         ROOT / "docs" / "results" / "fashion_mnist.md")
    figures_dir = Path(args.figures) if args.figures else report_path.parent / "fashion_mnist"
    pipe = Pipeline(out, budget, args.force, sys.executable)

    main_run = out / "msn"
    pipe.train("pretrain", main_run, [], "pre-train MSN")
    export_dir = out / "msn_hf"
    pipe.run("export", ["-m", "msn.export", pipe.rel(main_run), "--format", "hf", "--output", pipe.rel(export_dir),
                        "--overwrite"], export_dir / "config.json", "export to transformers")
    methods = [
        ("MSN (this preset)", pipe.evaluate("eval_msn", export_dir, out / "eval_msn", budget.eval_full, "evaluate MSN")),
        ("raw pixels", pipe.evaluate("eval_pixels", None, out / "eval_pixels", ["baseline=pixels", *budget.eval_full],
                                     "baseline: raw pixels")),
        ("random-init ViT", pipe.evaluate("eval_random", export_dir, out / "eval_random",
                                          ["baseline=random", *budget.eval_full], "baseline: random init")),
        ("supervised ViT from scratch", pipe.evaluate("eval_supervised", export_dir, out / "eval_supervised",
                                                      ["baseline=supervised", *budget.eval_full],
                                                      "baseline: supervised from scratch")),
    ]
    growth = []
    if not args.no_growth:
        minutes = epoch_minutes(main_run)
        for ckpt in sorted((main_run / "checkpoints").glob("epoch_*.pt")):
            epoch = int(ckpt.stem.split("_")[1])
            results = pipe.evaluate(f"eval_epoch_{epoch}", ckpt, out / "growth" / f"epoch_{epoch:04d}",
                                    budget.eval_short, f"evaluate epoch {epoch}")
            growth.append((epoch, minutes.get(epoch, float("nan")), results))
    ablations = []
    if not args.no_ablations:
        for ablation in ABLATIONS:
            run_dir = out / "ablations" / ablation.name
            pipe.train(f"ablation_{ablation.name}", run_dir, [*budget.ablation_train, *ablation.overrides],
                       f"ablation {ablation.name}: pre-train")
            results = pipe.evaluate(f"eval_ablation_{ablation.name}", run_dir, out / "ablations" / f"eval_{ablation.name}",
                                    budget.eval_short, f"ablation {ablation.name}: evaluate", lambd=ABLATION_LAMBDA)
            ablations.append((ablation, results, last_record(run_dir)))
    curve = []
    if budget.curve_epochs:  # the main run is a point of the curve: its last epoch checkpoint's scores if evaluated
        main_epochs = int(last_record(main_run)["epoch"]) + 1
        main_scores = (growth[-1][2] if growth and growth[-1][0] == main_epochs else pipe.evaluate(
            "eval_budget_main", main_run, out / "budget" / "eval_main", budget.eval_short,
            f"budget curve: evaluate the {main_epochs}-epoch run"))
        curve.append((main_epochs, last_record(main_run)["time_s"] / 60.0, main_scores))
    for epochs in budget.curve_epochs:
        if epochs == curve[0][0]:  # the preset's own run is already this point
            continue
        run_dir = out / "budget" / f"epochs_{epochs}"
        pipe.train(f"budget_{epochs}", run_dir, [f"optim.epochs={epochs}"], f"budget curve: pre-train {epochs} epochs")
        curve.append((epochs, last_record(run_dir)["time_s"] / 60.0,
                      pipe.evaluate(f"eval_budget_{epochs}", run_dir, out / "budget" / f"eval_epochs_{epochs}",
                                    budget.eval_short, f"budget curve: evaluate {epochs} epochs")))
    curve.sort(key=lambda point: point[0])

    figures = {
        "methods": report.plot_methods(methods, figures_dir / "lowshot_methods.png",
                                       "Fashion-MNIST: low-shot top-1 vs labelled images per class"),
        "curves": plot_runs([main_run], figures_dir / "training_curves.png", ["MSN"]),
    }
    if monitor_rows(main_run):
        figures["monitor"] = plot_monitor(monitor_rows(main_run), figures_dir / "monitor.png")
    if growth:
        figures["growth"] = plot_growth(growth, methods[1][1], figures_dir / "growth.png",
                                        "minutes of pre-training (end of each epoch)",
                                        "Fashion-MNIST: low-shot accuracy of the epoch checkpoints")
    if curve:
        figures["budget"] = plot_growth(curve, methods[1][1], figures_dir / "budget.png",
                                        "minutes of pre-training (separate runs, each its own schedule)",
                                        "Fashion-MNIST: low-shot accuracy vs pre-training budget")
    if ablations:
        figures["ablation_curves"] = plot_runs([out / "ablations" / a.name for a, _, _ in ablations],
                                               figures_dir / "ablation_curves.png", [a.name for a, _, _ in ablations],
                                               reference="reference")
    notes = None if args.smoke else Path(args.notes)
    write_report(report_path, pipe, methods, growth, curve, ablations, main_run, figures, notes,
                 time.perf_counter() - start)
    print(f"report: {report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
