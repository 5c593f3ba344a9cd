"""The fine-tuning report: ``finetune.json`` (options, sources, one row per route) and
``finetune.md`` (the table, the options and each route's preprocessing)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from msn import files
from msn.eval.finetune.data import Options
from msn.tables import markdown_table


def results_table(rows: Sequence[dict]) -> str:
    """One markdown row per route: accuracies, losses and the fine-tuning time."""
    header = ["route", "model", "labelled", "test images", "steps", "linear probe (%)", "fine-tuned (%)",
              "first loss", "last loss", "first/last window mean", "fine-tune time (s)"]
    return markdown_table(header, ([r["route"], r["architecture"], str(r["labelled"]), str(r["test_images"]),
                                    str(r["steps"]), f"{r['linear_probe']:.1f}", f"{r['finetuned']:.1f}",
                                    f"{r['loss_first']:.3f}", f"{r['loss_last']:.3f}",
                                    f"{r['loss_first_window']:.3f} / {r['loss_last_window']:.3f}",
                                    f"{r['finetune_seconds']:.1f}"] for r in rows))


def write_report(rows: Sequence[dict], options: Options, sources: dict, output: Path, seconds: float) -> dict:
    output.mkdir(parents=True, exist_ok=True)
    document = {"options": asdict(options), "sources": sources, "routes": list(rows), "total_seconds": seconds,
                "torch_threads": torch.get_num_threads()}
    files.write_text(output / "finetune.json", json.dumps(document, indent=2) + "\n")
    text = ["# Fine-tuning vs linear probe (scripts/finetune.py)", "", results_table(rows), "",
            f"Options: {json.dumps(asdict(options))}", "", f"Sources: {json.dumps(sources)}", "",
            f"Total time: {seconds:.1f} s on {torch.get_num_threads()} CPU thread(s)", ""]
    text += [f"- {r['route']} preprocessing: {r['preprocessing']}" for r in rows]
    files.write_text(output / "finetune.md", "\n".join(text) + "\n")
    return document
