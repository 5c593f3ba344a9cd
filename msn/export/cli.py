"""``msn-export`` / ``python -m msn.export``: write a backbone as transformers, timm or msn files.

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

from msn.export.loading import LoadedBackbone, load_backbone

FORMATS = ("hf", "timm", "msn")


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
) -> list[Path]:
    """Export ``source`` (anything :func:`msn.export.load_backbone` reads) to ``output``.

    Args:
        format: ``hf`` (transformers ViTMSN), ``timm`` or ``msn`` (backbone + head + prototypes).
        which: ``target`` (default) or ``online`` encoder.
        labels: class names; with ``format="hf"`` writes a ``ViTMSNForImageClassification``.
        num_heads: heads of a bare state dict whose width is not in the known table.
        overwrite: allow writing into a non-empty ``output`` folder.

    Returns:
        the written files.
    """
    if format not in FORMATS:
        raise ValueError(f"--format: must be one of {', '.join(FORMATS)}, got {format!r}")
    if labels and format != "hf":
        raise ValueError("--num-labels/--labels: only with --format hf")
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output: {output} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ValueError(f"--output: {output} is not empty (pass --overwrite to write into it)")
    loaded: LoadedBackbone = load_backbone(source, which, num_heads=num_heads)
    if format == "hf":
        from msn.export.hf import export_hf

        return export_hf(loaded, output, labels)
    if format == "timm":
        from msn.export.timm_format import export_timm

        return export_timm(loaded, output)
    from msn.export.native import export_native

    return export_native(loaded, output)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msn-export",
        description="Export an MSN backbone (training checkpoint, reference .pth.tar, transformers/timm "
        "weights) as a transformers ViTMSN folder, a timm folder, or our own msn layout.",
    )
    parser.add_argument("source", help="training checkpoint (.pt), run folder, reference .pth.tar, or an hf/timm/msn folder or weights file")
    parser.add_argument("--output", "-o", required=True, help="output folder (created; must be empty unless --overwrite)")
    parser.add_argument("--format", "-f", choices=FORMATS, default="hf", help="hf (default): transformers ViTMSN; timm; msn: backbone+head+prototypes")
    parser.add_argument("--which", choices=("target", "online"), default="target", help="encoder to export (default: target, the EMA encoder)")
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument("--num-labels", type=int, help="hf only: write ViTMSNForImageClassification with N classes (labels LABEL_0..)")
    labels.add_argument("--labels", help="hf only: file with one class label per line (writes ViTMSNForImageClassification)")
    parser.add_argument("--num-heads", type=int, help="attention heads of a bare state dict of non-standard width")
    parser.add_argument("--overwrite", action="store_true", help="allow a non-empty --output folder")
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
        files = export(args.source, args.output, args.format, args.which, labels, args.num_heads, args.overwrite)
    except (ValueError, KeyError, FileNotFoundError, OSError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"msn-export: error: {message}", file=sys.stderr)
        return 2
    print(f"wrote {args.format} export to {args.output}: {', '.join(sorted(path.name for path in files))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
