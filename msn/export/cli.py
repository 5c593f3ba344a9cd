"""``msn-export`` / ``python -m msn.export``: write a backbone in a writable format of the table.

Examples::

    msn-export outputs/run/checkpoints/latest.pt --format hf --output exports/hf
    msn-export outputs/run --format hf --labels classes.txt --output exports/hf-cls
    msn-export outputs/run --format timm --which online --output exports/timm
    msn-export vits16_800ep.pth.tar --format hf --output exports/vit-msn-small   # reference file

Errors (unreadable or mismatching weights, bad options) are printed as one line, exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from msn.export.formats import FORMATS, writable
from msn.export.hf import HF
from msn.export.model_card import read_lowshot_results, write_model_card
from msn.export.loading import load_backbone


def read_labels(path: str | os.PathLike) -> list[str]:
    """One label per line; blank lines are ignored."""
    with open(path) as stream:
        labels = [line.strip() for line in stream if line.strip()]
    if not labels:
        raise ValueError(f"{path}: no labels (one label per line)")
    return labels


def export(
    source: str | os.PathLike,
    output: str | os.PathLike,
    format: str = "hf",  # noqa: A002 - mirrors the CLI flag
    which: str = "target",
    labels: Sequence[str] | None = None,
    num_heads: int | None = None,
    overwrite: bool = False,
    lowshot: Sequence[str | os.PathLike] = (),
    trust_pickle: bool = False,
) -> list[Path]:
    """Export ``source`` (anything :func:`msn.export.load_backbone` reads) to ``output``.

    Args:
        format: a writable name of :data:`msn.export.formats.FORMATS`: ``hf`` (transformers
            ViTMSN), ``timm`` or ``msn`` (backbone + head + prototypes).
        which: ``target`` (default) or ``online`` encoder.
        labels: class names; with ``format="hf"`` writes a ``ViTMSNForImageClassification``.
        num_heads: heads of a bare state dict whose width is not in the known table.
        overwrite: allow writing into a non-empty ``output`` folder.
        lowshot: ``results.json`` files of low-shot evaluations of these weights, reported in
            the model card (``hf`` only; by default the card reports those found in the run
            folder, :func:`msn.export.model_card.find_lowshot_results`).
        trust_pickle: unpickle a torch ``source`` in full, which can run code it carries; only
            for a file whose source you trust (docs/security.md).

    Returns:
        the written files.
    """
    if format not in writable():
        raise ValueError(f"--format: must be one of {', '.join(writable())}, got {format!r}")
    target = FORMATS[format]
    if labels and not target.takes_labels:
        with_labels = ", ".join(name for name in writable() if FORMATS[name].takes_labels)
        raise ValueError(f"--num-labels/--labels: only with --format {with_labels}")
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output: {output} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ValueError(f"--output: {output} is not empty (pass --overwrite to write into it)")
    if lowshot and format != HF:
        raise ValueError(f"--lowshot: only with --format {HF} (its model card reports them)")
    documents = [read_lowshot_results(path) for path in lowshot]
    loaded = load_backbone(source, which, num_heads=num_heads, trust_pickle=trust_pickle)
    files = target.write(loaded, output, labels) if target.takes_labels else target.write(loaded, output)
    if documents:
        write_model_card(loaded, output, labels, documents)
    return files


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msn-export",
        description=f"Export an MSN backbone from any format ({', '.join(FORMATS)}) to a writable one "
        f"({', '.join(writable())}); docs/formats.md describes them.",
    )
    parser.add_argument("source", help="a weights file, run folder or export folder in any of those formats")
    parser.add_argument("--output", "-o", required=True, help="output folder (created; must be empty unless --overwrite)")
    kinds = "; ".join(f"{name}: {FORMATS[name].summary}" for name in writable())
    parser.add_argument("--format", "-f", choices=writable(), default="hf", help=f"{kinds} (default: hf)")
    parser.add_argument("--which", choices=("target", "online"), default="target", help="encoder to export (default: target, the EMA encoder)")
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument("--num-labels", type=int, help="hf only: write ViTMSNForImageClassification with N classes (labels LABEL_0..)")
    labels.add_argument("--labels", help="hf only: file with one class label per line (writes ViTMSNForImageClassification)")
    parser.add_argument("--num-heads", type=int, help="attention heads of a bare state dict of non-standard width")
    parser.add_argument("--overwrite", action="store_true", help="allow a non-empty --output folder")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="DANGEROUS: unpickle a torch source in full, which runs any code it carries; only for a file "
                             "you trust (default: tensors and plain data only; docs/security.md)")
    parser.add_argument("--lowshot", action="append", default=[], metavar="RESULTS_JSON",
                        help="hf only: a low-shot results.json of these weights for the model card (repeatable; "
                             "default: those found in the run folder)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (0 ok, 2 error)."""
    args = build_parser().parse_args(argv)
    try:
        labels = None
        if args.labels:
            labels = read_labels(args.labels)
        elif args.num_labels is not None:
            if args.num_labels <= 0:
                raise ValueError(f"--num-labels: must be positive, got {args.num_labels}")
            labels = [f"LABEL_{index}" for index in range(args.num_labels)]
        files = export(args.source, args.output, args.format, args.which, labels, args.num_heads, args.overwrite,
                       args.lowshot, args.trust_pickle)
    except (ValueError, KeyError, FileNotFoundError, OSError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"msn-export: error: {message}", file=sys.stderr)
        return 2
    print(f"wrote {args.format} export to {args.output}: {', '.join(sorted(path.name for path in files))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
