"""The model card (``README.md``) of a transformers export (docs/formats.md Sec. 3).

The Hugging Face hub reads the YAML front matter (library, pipeline, tags, license); the body
says what the weights are: the architecture, how they were pre-trained (from the training
config when the source is one of our checkpoints), the step, and the preprocessing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from msn.export.common import LoadedBackbone, describe_backbone

CARD = "README.md"
#: Written when the exporter cannot know the weights' license (the data's terms decide it).
UNKNOWN_LICENSE = "other"


def _recipe(loaded: LoadedBackbone) -> list[str]:
    cfg = loaded.config
    if cfg is None:
        return ["- Pre-training recipe: not recorded in the source (a weights file without our config)."]
    data = cfg.data.name + (f" ({cfg.data.root})" if cfg.data.root and not os.path.isabs(cfg.data.root) else "")
    subset = f", first {cfg.data.subset} images" if cfg.data.subset else ""
    return [
        f"- Data: {data}{subset}, labels unused.",
        f"- Objective: MSN (Assran et al., ECCV 2022), {cfg.loss.num_prototypes} prototypes, "
        f"anchor mask ratio {cfg.mask.ratio}, {cfg.data.views.num_focal} focal views of "
        f"{cfg.data.views.focal_size} px, target/anchor views of {cfg.data.views.rand_size} px.",
        f"- Optimisation: AdamW, global batch {cfg.optim.batch_size}, learning rate {cfg.optim.lr}, "
        f"schedules laid out for {cfg.optim.epochs} epochs.",
    ]


def model_card(loaded: LoadedBackbone, labels: Sequence[str] | None = None) -> str:
    """The card's text."""
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
    if labels:
        body += ["", "## Labels", f"- {len(labels)} classes: " + ", ".join(labels[:20]) + (" ..." if len(labels) > 20 else "")]
    return "\n".join(front + body) + "\n"


def write_model_card(loaded: LoadedBackbone, output: str | os.PathLike, labels: Sequence[str] | None = None) -> Path:
    """Write ``README.md`` into the export folder; returns its path."""
    path = Path(output) / CARD
    path.write_text(model_card(loaded, labels), encoding="utf-8")
    return path
