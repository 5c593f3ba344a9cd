"""The model card (``README.md``) of a transformers export (docs/formats.md Sec. 3).

The Hugging Face hub reads the YAML front matter (library, pipeline, tags, license); the body
says what the weights are: the architecture, how they were pre-trained (from the training
config when the source is one of our checkpoints), the step, the preprocessing, and the
low-shot results of these weights when an evaluation was run (:func:`find_lowshot_results`:
``results.json`` documents of ``eval_lowshot.py`` in the run's folder, or given explicitly).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from msn.export.backbone_architecture import describe_backbone
from msn.export.weight_types import LoadedBackbone
from msn.files import write_text

CARD = "README.md"
#: The ``schema`` of the low-shot evaluator's ``results.json`` (written by msn/eval/report.py).
LOWSHOT_SCHEMA = "msn-lowshot-results"
#: How deep under a run folder :func:`find_lowshot_results` looks for ``results.json``.
SEARCH_DEPTH = 3
#: Written when the exporter cannot know the weights' license (the data's terms decide it).
UNKNOWN_LICENSE = "other"


def _recipe(loaded: LoadedBackbone) -> list[str]:
    cfg = loaded.config
    if cfg is None:
        return ["- Pre-training recipe: not recorded in the source (a weights file without our config)."]
    data = cfg.data.name  # never its root: a card is shared, the path is this machine's
    subset = f", a subset of {cfg.data.subset} images" if cfg.data.subset else ""
    return [
        f"- Data: {data}{subset}, labels unused.",
        f"- Objective: MSN (Assran et al., ECCV 2022), {cfg.loss.num_prototypes} prototypes, "
        f"anchor mask ratio {cfg.mask.ratio}, {cfg.data.views.num_focal} focal views of "
        f"{cfg.data.views.focal_size} px, target/anchor views of {cfg.data.views.rand_size} px.",
        f"- Optimisation: AdamW, global batch {cfg.optim.batch_size}, learning rate {cfg.optim.lr}, "
        f"schedules laid out for {cfg.optim.epochs} epochs.",
    ]


def read_lowshot_results(path: str | os.PathLike) -> dict[str, Any]:
    """A low-shot ``results.json``.

    Raises:
        ValueError: the file is not one (one line naming it).
    """
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable low-shot results.json ({error})") from None
    if not isinstance(document, dict) or document.get("schema") != LOWSHOT_SCHEMA:
        raise ValueError(f"{path}: not a low-shot results.json (schema is not {LOWSHOT_SCHEMA!r})")
    return document


def _run_folder(path: str | None) -> Path | None:
    """The run folder of a source: ``RUN`` for ``RUN/checkpoints/*.pt``, a folder itself."""
    if not path:
        return None
    path = Path(path)
    if path.is_dir():
        return path
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def find_lowshot_results(loaded: LoadedBackbone) -> list[dict[str, Any]]:
    """The evaluations of exactly these weights found in the source's run folder: low-shot
    ``results.json`` files up to :data:`SEARCH_DEPTH` folders down, of no baseline, the same
    encoder (``which``) and the same optimiser step; sorted by path."""
    run, step = _run_folder(loaded.source.get("path")), loaded.source.get("step")
    if run is None or step is None:
        return []
    found = []
    for depth in range(1, SEARCH_DEPTH + 1):
        for candidate in sorted(run.glob("/".join(["*"] * depth) + "/results.json")):
            try:
                document = read_lowshot_results(candidate)
            except ValueError:
                continue
            backbone = document.get("backbone") or {}
            if (document.get("baseline") is None and backbone.get("step") == step
                    and backbone.get("which", "target") == loaded.source.get("which", "target")):
                found.append(document)
    return found


def _lowshot_section(results: Sequence[dict[str, Any]]) -> list[str]:
    """The card's "Low-shot results" section: one table per evaluation."""
    if not results:
        return []
    lines = ["", "## Low-shot results",
             "Logistic regression on frozen features (and k-NN), top-1 % on the test set, mean +- std "
             "over labelled splits (docs/eval.md of the msn framework):"]
    for document in results:
        data, feature = document.get("data", {}), document.get("feature", {})
        lines += ["", f"{data.get('name')}, {data.get('test_images_used')} test images, feature "
                  f"{feature.get('kind')} ({document.get('created', '')[:10]}):", "",
                  "| labelled images / class | splits | logistic regression | k-NN |", "|---|---|---|---|"]
        entries = list(document.get("shots", {}).items())
        entries += [(f"{percent}%", entry) for percent, entry in document.get("percent", {}).items()]
        for key, entry in entries:
            lines.append(f"| {key} | {len(entry['accuracy'])} | {entry['mean']:.1f} +- {entry['std']:.1f} "
                         f"| {entry['knn_mean']:.1f} +- {entry['knn_std']:.1f} |")
    return lines


def model_card(loaded: LoadedBackbone, labels: Sequence[str] | None = None,
               lowshot: Sequence[dict[str, Any]] | None = None) -> str:
    """The card's text; ``lowshot``: results documents to report (default: those
    :func:`find_lowshot_results` finds)."""
    lowshot = find_lowshot_results(loaded) if lowshot is None else list(lowshot)
    arch = describe_backbone(loaded.backbone)
    source = loaded.source
    step = source.get("step")
    front = ["---", "library_name: transformers",
             f"pipeline_tag: {'image-classification' if labels else 'image-feature-extraction'}",
             "tags:", "- msn", "- vision-transformer", "- self-supervised",
             f"license: {UNKNOWN_LICENSE}  # set the license of your weights and data", "---", ""]
    body = [
        f"# MSN ViT ({arch['embed_dim']} wide, {arch['depth']} blocks, patch {arch['patch_size']})",
        "",
        "A Vision Transformer pre-trained with Masked Siamese Networks, exported by the `msn` "
        "framework for `ViTMSNModel`" + (" / `ViTMSNForImageClassification`" if labels else "") + ".",
        "",
        "## Architecture",
        f"- Width {arch['embed_dim']}, {arch['depth']} blocks, {arch['num_heads']} heads, "
        f"MLP ratio {arch['mlp_ratio']}, patch {arch['patch_size']} px, {arch['image_size']} px inputs.",
        "",
        "## Pre-training",
        f"- Encoder: the {source.get('which', 'target')} encoder"
        + (f" after {step} optimiser steps" if step is not None else "") + ".",
        *_recipe(loaded),
        "",
        "## Use",
        "- Features: the CLS token (`last_hidden_state[:, 0]`); the low-shot protocol of the paper "
        "uses it before the final LayerNorm.",
        f"- Preprocessing (`preprocessor_config.json`): resize the short side to "
        f"{round(arch['image_size'] * 256 / 224)} px, centre crop {arch['image_size']} px, "
        f"normalise with mean {list(loaded.mean)} and std {list(loaded.std)}.",
    ]
    body += _lowshot_section(lowshot)
    if labels:
        body += ["", "## Labels", f"- {len(labels)} classes: " + ", ".join(labels[:20]) + (" ..." if len(labels) > 20 else "")]
    return "\n".join(front + body) + "\n"


def write_model_card(loaded: LoadedBackbone, output: str | os.PathLike, labels: Sequence[str] | None = None,
                     lowshot: Sequence[dict[str, Any]] | None = None) -> Path:
    """Write ``README.md`` into the export folder; returns its path."""
    return write_text(Path(output) / CARD, model_card(loaded, labels, lowshot))
