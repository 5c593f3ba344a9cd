"""Fine-tune an MSN backbone end to end on a labelled Fashion-MNIST subset (docs/finetune.md).

Two routes, each starting from one of our exports and using only that library's own loaders
(:mod:`msn.eval.finetune.routes`): ``hf`` (transformers) and ``timm``.

For each route the script scores (1) a linear probe of the frozen backbone (the low-shot
protocol of ``msn.eval``: pre-LN CLS features, rows centred + L2-normalised, logistic
regression with lambda cross-validated on the labelled images only), then (2) fine-tunes the
whole network with AdamW (linear warm-up, cosine decay, optional layer-wise LR decay) on the
same labelled images, and scores it on the same test images. It prints a table and writes
``finetune.json`` and ``finetune.md`` to ``--output``.

Examples::

    python scripts/finetune.py --checkpoint outputs/fmnist_msn --output outputs/finetune
    python scripts/finetune.py --hf exports/hf --timm exports/timm --steps 300 --labelled 500 --seed 0
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

import msn.export
from msn.data import FashionMNISTDataset
from msn.eval.finetune.data import Options, fashion_mnist
from msn.eval.finetune.report import results_table, write_report
from msn.eval.finetune.routes import ROUTES, load_hf, load_timm
from msn.eval.finetune.training import run_route


def export_checkpoint(checkpoint: str | Path, output: Path, routes: Sequence[str]) -> dict[str, Path]:
    """Export ``checkpoint`` (anything msn reads) with our export API: ``output/exports/<route>``."""
    folders = {}
    for route in routes:
        folder = output / "exports" / route
        msn.export.export(checkpoint, folder, route, overwrite=True)
        folders[route] = folder
    return folders


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_argument_group("backbone (a checkpoint to export, or the export folders)")
    source.add_argument("--checkpoint", help="a training checkpoint / run folder / anything msn-export reads; "
                                             "exported to OUTPUT/exports/{hf,timm} first")
    source.add_argument("--hf", help="a transformers export folder (msn-export --format hf)")
    source.add_argument("--timm", help="a timm export folder (msn-export --format timm)")
    parser.add_argument("--routes", default="hf,timm", help="comma-separated subset of hf,timm (default: both)")
    parser.add_argument("--output", "-o", default="outputs/finetune", help="report folder (default: outputs/finetune)")
    parser.add_argument("--labelled", type=int, default=500, help="labelled training images, balanced over classes")
    parser.add_argument("--test-limit", type=int, default=None, help="score on the first N test images (default: all 10,000)")
    parser.add_argument("--data-root", default=None, help="Fashion-MNIST folder (default: /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; 1 is fastest for tiny models on a busy CPU)")
    defaults = Options()
    for name, value in asdict(defaults).items():
        if name in ("loss_window", "batch_eval"):
            continue
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value, help=f"default {value}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    if not routes or set(routes) - set(ROUTES):
        raise SystemExit(f"--routes: a comma-separated subset of {','.join(ROUTES)}, got {args.routes!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    output = Path(args.output)
    start = time.perf_counter()
    if args.checkpoint:
        folders = export_checkpoint(args.checkpoint, output, routes)
    else:
        folders = {route: getattr(args, route) for route in routes}
        absent = [route for route, folder in folders.items() if not folder]
        if absent:
            raise SystemExit(f"pass --checkpoint, or --{' and --'.join(absent)} for the routes {','.join(routes)}")
    options = Options(**{name: getattr(args, name) for name in asdict(Options()) if hasattr(args, name)})
    train, test = fashion_mnist(args.labelled, args.test_limit, options.seed, args.data_root)
    rows = []
    for route in routes:
        torch.manual_seed(options.seed)  # the new head's initialisation
        loaded = load_hf(folders[route], labels=FashionMNISTDataset.classes) if route == "hf" else load_timm(folders[route])
        rows.append(run_route(loaded, train, test, options))
    sources = {"checkpoint": args.checkpoint, **{route: str(folder) for route, folder in folders.items()}}
    write_report(rows, options, sources, output, time.perf_counter() - start)
    print(results_table(rows))
    print(f"wrote {output / 'finetune.json'} and {output / 'finetune.md'} ({time.perf_counter() - start:.1f} s)")
    return 0
