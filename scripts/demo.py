"""``make demo``: pre-train the CPU demo and show, with its own numbers, that it learned.

    .venv/bin/python scripts/demo.py [--output-dir outputs/fmnist_demo] [--splits 3] [OVERRIDE ...]

1. Pre-trains ``experiment=fmnist_demo`` (configs/experiment/fmnist_demo.yaml: 375 steps,
   about 3 minutes on 2 CPU cores; a finished run is not trained again, an interrupted one
   resumes). Extra ``key=value`` arguments go to the pre-training.
2. Evaluates, with the reference low-shot protocol (docs/eval.md) on the 10,000 Fashion-MNIST
   test images and the same ``--splits`` labelled subsets for every row, at 1 and 5 labelled
   images per class: the demo's target encoder, a randomly initialised ViT of the same shape
   (``baseline=random``) and raw pixels (``baseline=pixels``).
   ``--eval KEY=VALUE`` passes a key to the three evaluations.
3. Prints the table and writes it to ``<output-dir>/demo_lowshot.md`` (and the numbers to
   ``demo_lowshot.json``); each evaluation's full ``results.json`` is under
   ``<output-dir>/lowshot/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import msn
from msn import checkpoint, files
from msn.tables import markdown_table

ROOT = Path(__file__).resolve().parents[1]

#: Labelled images per class of the table.
SHOTS = (1, 5)
#: The rows: label, which weights, baseline.
ROWS = (("MSN demo (this run)", "msn", None), ("random-init ViT, same shape", "random", "random"),
        ("raw pixels", "pixels", "pixels"))


def evaluate(weights: Path, out: Path, splits: int, extra: list[str]) -> dict[str, dict]:
    """The three rows' results documents, keyed by row name (``extra``: more evaluation keys)."""
    results = {}
    for _, name, baseline in ROWS:
        overrides = [f"splits={splits}", f"output_dir={out / 'lowshot' / name}", "progress=false", *extra]
        if baseline is not None:
            overrides.append(f"baseline={baseline}")
        results[name] = msn.lowshot(None if baseline == "pixels" else weights, shots=SHOTS, overrides=overrides)
    return results


def table(results: dict[str, dict], minutes: float, step: int) -> tuple[str, dict]:
    """The markdown table, the verdict lines, and the numbers as a dict."""
    cell = lambda entry: f"{entry['mean']:.1f} ± {entry['std']:.1f}"  # noqa: E731
    splits = len(results["msn"]["shots"][str(SHOTS[0])]["accuracy"])
    tested = results["msn"]["data"]["test_images_used"]
    numbers, rows = {}, []
    for label, name, _ in ROWS:
        entries = results[name]["shots"]
        label = f"{label}: {minutes:.1f} min, {step} steps" if name == "msn" else label
        rows.append([label, *(cell(entries[str(k)]) for k in SHOTS)])
        numbers[name] = {str(k): {"mean": entries[str(k)]["mean"], "std": entries[str(k)]["std"]} for k in SHOTS}
    lines = [f"Low-shot top-1 % on {tested:,} Fashion-MNIST test images (logistic regression on frozen "
             f"features, mean ± std over {splits} labelled splits, the same for every row)", "",
             markdown_table(["features", *(f"{k} image{'s' if k > 1 else ''}/class" for k in SHOTS)], rows)]
    five = str(SHOTS[-1])
    over_random = numbers["msn"][five]["mean"] - numbers["random"][five]["mean"]
    over_pixels = numbers["msn"][five]["mean"] - numbers["pixels"][five]["mean"]
    lines += ["", f"At {five} images per class the demo's features are {over_random:+.1f} points over the same "
              f"network at random init: what {step} steps of MSN learned without a label.",
              f"Raw pixels are {'behind' if over_pixels > 0 else 'ahead'} by {abs(over_pixels):.1f} points: "
              f"on 28 px grayscale clothes, pixels are a strong baseline that a few minutes of pre-training "
              f"{'already beat' if over_pixels > 0 else 'do not reach yet'}; the 30-minute showcase "
              f"(make results, docs/results/fashion_mnist.md) goes further."]
    return "\n".join(lines), {"shots": list(SHOTS), "splits": splits, "pretrain_minutes": minutes, "step": step,
                              "rows": numbers, "msn_minus_random_5shot": over_random,
                              "msn_minus_pixels_5shot": over_pixels}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default=str(ROOT / "outputs" / "fmnist_demo"))
    parser.add_argument("--splits", type=int, default=3, help="labelled subsets per shot count")
    parser.add_argument("--eval", action="append", default=[], metavar="KEY=VALUE",
                        help="a key of the evaluations (eval_lowshot.py), e.g. test_limit=1000; repeatable")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the pre-training")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    out = Path(args.output_dir)
    start = time.perf_counter()
    run = msn.pretrain(["experiment=fmnist_demo", f"output_dir={out}", *args.overrides])
    state = checkpoint.load_checkpoint(run["checkpoint"])
    minutes = state.get("extra", {}).get("train_seconds", time.perf_counter() - start) / 60
    results = evaluate(run["checkpoint"], out, args.splits, args.eval)
    text, numbers = table(results, minutes, int(state["step"]))
    files.write_text(out / "demo_lowshot.md", text + "\n")
    files.write_text(out / "demo_lowshot.json", json.dumps(numbers, indent=2) + "\n")
    print("\n" + text + f"\n\n(written to {out / 'demo_lowshot.md'}; {(time.perf_counter() - start) / 60:.1f} min in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
