"""Fine-tune an MSN backbone end to end on a labelled Fashion-MNIST subset (docs/finetune.md).

Two routes, each starting from one of our exports and using only that library's own loaders:

* ``hf``: ``transformers.ViTMSNForImageClassification.from_pretrained(EXPORT, num_labels=10)``
  (a new classifier on the post-LayerNorm CLS token), images through the export's saved image
  processor (``AutoImageProcessor``);
* ``timm``: ``timm.create_model(config["architecture"], pretrained=True, num_classes=10,
  pretrained_cfg_overlay=dict(file=EXPORT/model.safetensors, ...), **config["model_args"])``
  (``import msn.export`` first: it registers ``vit_msn``, the name our exporter records for
  shapes timm lacks), images through ``timm.data.resolve_data_config`` + ``create_transform``.

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
import json
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import msn.export  # noqa: E402,F401 - registers timm's "vit_msn" (shapes timm has no name for)
from msn import files  # noqa: E402
from msn.export.backbone_architecture import check_architecture  # noqa: E402
from msn.data.datasets import FashionMNISTDataset  # noqa: E402
from msn.eval.classifier import accuracy, fit_logistic_regression, normalize_rows, select_lambda  # noqa: E402
from msn.eval.config import EvalConfig  # noqa: E402

ROUTES = ("hf", "timm")
NUM_CLASSES = 10


# --- options and data -----------------------------------------------------------------------------
@dataclass
class Options:
    """Fine-tuning recipe (the CLI flags of the same names).

    Attributes:
        steps: optimiser steps.
        batch_size: labelled images per step (capped at the subset size).
        lr: peak AdamW learning rate (of the top layer when ``layer_decay < 1``).
        weight_decay: AdamW weight decay on weight matrices (biases, norms, CLS and position
            embeddings excluded).
        warmup_fraction: fraction of ``steps`` of linear warm-up from 0, then cosine to 0.
        layer_decay: layer-wise LR decay: block ``i`` of ``depth`` gets ``lr * decay**(depth + 1 - i)``
            (embeddings: layer 0, final norm + classifier: ``depth + 1``); 1.0 turns it off.
        hflip: probability of a horizontal flip of each training image (the only augmentation).
        seed: seeds the classifier head, the batch order and the flips.
        loss_window: steps averaged for the first/last-window loss of the report.
        batch_eval: images per forward pass when scoring.
    """

    steps: int = 300
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1
    layer_decay: float = 0.75
    hflip: float = 0.5
    seed: int = 0
    loss_window: int = 20
    batch_eval: int = 256


@dataclass
class Split:
    """Raw images (uint8 ``[N, 3, H, W]``) and labels of one split."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: list[int] = field(default_factory=list)

    def pil(self) -> list:
        """The images as RGB PIL images (what both libraries' preprocessing expects)."""
        from torchvision.transforms.functional import to_pil_image

        return [to_pil_image(image) for image in self.images]


def balanced_subset(labels: Sequence[int], total: int, seed: int) -> list[int]:
    """``total`` indices, as even over the classes as possible (the first ``total % C`` classes
    get one more), each class's images drawn at random with ``seed``."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if total < len(classes):
        raise ValueError(f"--labelled: at least one image per class ({len(classes)}), got {total}")
    rng = np.random.default_rng(seed)
    chosen = []
    for rank, cls in enumerate(classes):
        count = total // len(classes) + (1 if rank < total % len(classes) else 0)
        members = np.flatnonzero(labels == cls)
        chosen.extend(int(i) for i in rng.permutation(members)[:count])
    return sorted(chosen)


def fashion_mnist(labelled: int, test_limit: int | None, seed: int, root: str | None = None) -> tuple[Split, Split]:
    """A balanced labelled training subset and the first ``test_limit`` test images."""
    train, test = FashionMNISTDataset(root, train=True), FashionMNISTDataset(root, train=False)
    picked = balanced_subset(train.targets, labelled, seed)
    count = len(test) if test_limit is None else min(int(test_limit), len(test))

    def take(dataset, indices):
        images = dataset.images[indices].unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
        labels = torch.tensor([dataset.targets[i] for i in indices])
        return Split(images, labels, list(indices))

    return take(train, picked), take(test, list(range(count)))


# --- the two routes: model, preprocessing, frozen feature -----------------------------------------
@dataclass
class Route:
    """One loaded route: the model with its new head and the library's own pieces."""

    name: str
    model: nn.Module
    preprocess: Callable[[list], torch.Tensor]  # PIL images -> normalised [N, 3, S, S]
    logits: Callable[[torch.Tensor], torch.Tensor]
    frozen_feature: Callable[[torch.Tensor], torch.Tensor]  # pre-LN CLS of the backbone
    layer_of: Callable[[str], int]  # parameter name -> layer index for layer-wise LR decay
    depth: int
    backbone_prefix: str  # parameter names of the backbone (not the new classifier)
    preprocessing: str  # how images were prepared, for the report
    architecture: str


def load_hf(export_dir: str | Path, num_labels: int = NUM_CLASSES, labels: Sequence[str] | None = None) -> Route:
    """Route A: the transformers export as ``ViTMSNForImageClassification`` with a new classifier."""
    from transformers import AutoImageProcessor, ViTMSNForImageClassification

    extra = {"id2label": dict(enumerate(labels)), "label2id": {v: k for k, v in enumerate(labels)}} if labels else {}
    model, info = ViTMSNForImageClassification.from_pretrained(export_dir, num_labels=num_labels,
                                                               output_loading_info=True, **extra)
    new = sorted(info["missing_keys"])
    if new != ["classifier.bias", "classifier.weight"] or info["unexpected_keys"] or info["mismatched_keys"]:
        raise RuntimeError(f"{export_dir}: the backbone did not load completely: {info}")
    processor = AutoImageProcessor.from_pretrained(export_dir)

    def preprocess(images: list) -> torch.Tensor:
        return processor(images=images, return_tensors="pt")["pixel_values"]

    def frozen_feature(pixels: torch.Tensor) -> torch.Tensor:
        return model.vit(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, 0]

    depth = model.config.num_hidden_layers

    def layer_of(name: str) -> int:
        if name.startswith("vit.embeddings."):
            return 0
        found = re.match(r"vit\.(?:encoder\.layer|layers)\.(\d+)\.", name)  # 4.x names, 5.x names
        return int(found.group(1)) + 1 if found else depth + 1

    def field_of(sizes, key):  # a dict in transformers 4.x, a SizeDict in 5.x
        return sizes.get(key) if isinstance(sizes, dict) else getattr(sizes, key, None)

    crop = f"{field_of(processor.crop_size, 'height')}x{field_of(processor.crop_size, 'width')}"
    steps = [f"{type(processor).__name__}: resize shortest edge to {field_of(processor.size, 'shortest_edge')}",
             f"centre crop {crop}", f"normalise mean {list(processor.image_mean)} std {list(processor.image_std)}"]
    return Route("hf", model, preprocess, lambda x: model(pixel_values=x).logits, frozen_feature, layer_of, depth,
                 "vit.", " -> ".join(steps), "ViTMSNForImageClassification")


def timm_overlay(export_dir: str | Path) -> tuple[dict, dict]:
    """(timm ``config.json`` of the export, the ``pretrained_cfg_overlay`` that points timm at its
    weights file and carries its preprocessing)."""
    export_dir = Path(export_dir)
    config = json.loads((export_dir / "config.json").read_text())
    keep = ("input_size", "fixed_input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std",
            "num_classes", "first_conv", "classifier")
    overlay = {key: config["pretrained_cfg"][key] for key in keep if key in config["pretrained_cfg"]}
    overlay["input_size"] = tuple(overlay["input_size"])
    overlay["file"] = str(export_dir / "model.safetensors")
    return config, overlay


def check_timm_weights(model: nn.Module, weights_file: str | Path) -> None:
    """Every tensor of ``weights_file`` is in ``model`` unchanged, and only the new ``head.*`` is
    not from the file: timm loads non-strictly when ``num_classes`` differs from the file's (0),
    so a file of other names would otherwise load nothing, with only a log line."""
    from safetensors.torch import load_file

    saved, state = load_file(str(weights_file)), model.state_dict()
    missing = sorted(set(state) - set(saved))
    if missing != ["head.bias", "head.weight"] or set(saved) - set(state):
        raise RuntimeError(f"{weights_file}: timm did not load the backbone completely "
                           f"(not from the file: {missing}; not used: {sorted(set(saved) - set(state))})")
    for key, tensor in saved.items():
        if not torch.equal(state[key], tensor):
            raise RuntimeError(f"{weights_file}: {key} differs from the file after loading")


def load_timm(export_dir: str | Path, num_labels: int = NUM_CLASSES) -> Route:
    """Route B: the timm export through ``timm.create_model(..., pretrained=True, num_classes=N)``."""
    import timm
    from timm.data import create_transform, resolve_data_config

    config, overlay = timm_overlay(export_dir)
    args = config.get("model_args", {})
    side = args.get("img_size")
    side = side[0] if isinstance(side, (list, tuple)) and side else side
    check_architecture({"embed_dim": args.get("embed_dim"), "depth": args.get("depth"), "num_heads": args.get("num_heads"),
                        "mlp_ratio": args.get("mlp_ratio"), "patch_size": args.get("patch_size"), "image_size": side},
                       f"{export_dir}/config.json")  # before timm builds it
    model = timm.create_model(config["architecture"], pretrained=True, num_classes=num_labels,
                              pretrained_cfg_overlay=overlay, **config["model_args"])
    check_timm_weights(model, overlay["file"])
    data_config = resolve_data_config(model=model)
    transform = create_transform(**data_config, is_training=False)

    def preprocess(images: list) -> torch.Tensor:
        return torch.stack([transform(image) for image in images])

    def frozen_feature(pixels: torch.Tensor) -> torch.Tensor:
        tokens = model.forward_intermediates(pixels, indices=1, norm=False, output_fmt="NLC",
                                             return_prefix_tokens=True, intermediates_only=True)
        return tokens[0][1][:, 0]

    depth = len(model.blocks)

    def layer_of(name: str) -> int:
        if name.split(".")[0] in ("cls_token", "pos_embed", "patch_embed", "reg_token"):
            return 0
        found = re.match(r"blocks\.(\d+)\.", name)
        return int(found.group(1)) + 1 if found else depth + 1

    described = ", ".join(f"{k} {data_config[k]}" for k in ("input_size", "interpolation", "crop_pct", "mean", "std"))
    return Route("timm", model, preprocess, model, frozen_feature, layer_of, depth, "",
                 f"timm create_transform(resolve_data_config(model)): {described}", config["architecture"])


# --- probe, fine-tuning, scoring ------------------------------------------------------------------
def preprocess_split(route: Route, split: Split, chunk: int = 500) -> torch.Tensor:
    """The split's images through the route's own preprocessing, once."""
    images = split.pil()
    out = [route.preprocess(images[i : i + chunk])
           for i in tqdm(range(0, len(images), chunk), desc=f"{route.name}: preprocess", leave=False)]
    return torch.cat(out).float()


@torch.no_grad()
def batched(fn: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([fn(pixels[i : i + batch]) for i in range(0, len(pixels), batch)])


def linear_probe(route: Route, train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                 test_y: torch.Tensor, batch: int = 256) -> dict:
    """Top-1 (%) of logistic regression on the frozen pre-LN CLS features (msn.eval's protocol)."""
    route.model.eval()
    train_f = normalize_rows(batched(route.frozen_feature, train_x, batch).double())
    test_f = normalize_rows(batched(route.frozen_feature, test_x, batch).double())
    choice = select_lambda(train_f, train_y, NUM_CLASSES, EvalConfig().lambd_grid, folds=EvalConfig.cv_folds,
                           fallback=EvalConfig.lambd_fallback)
    result = fit_logistic_regression(train_f, train_y, NUM_CLASSES, choice.lambd)
    return {"accuracy": accuracy(result.predict(test_f), test_y), "lambda": choice.lambd, "lambda_method": choice.method}


def param_groups(route: Route, options: Options) -> list[dict]:
    """AdamW groups: weight decay on weight matrices only; LR scaled per layer when ``layer_decay < 1``."""
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in route.model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim < 2 or any(key in name for key in ("cls_token", "pos_embed", "position_embeddings"))
        layer = route.layer_of(name)
        scale = options.layer_decay ** (route.depth + 1 - layer)
        group = groups.setdefault((layer, no_decay), {"params": [], "lr_scale": scale,
                                                      "weight_decay": 0.0 if no_decay else options.weight_decay})
        group["params"].append(param)
    return list(groups.values())


def lr_factor(step: int, options: Options) -> float:
    """Linear warm-up over ``warmup_fraction * steps``, then cosine decay to 0 (step counts from 0)."""
    warmup = max(1, round(options.warmup_fraction * options.steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, options.steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def finetune(route: Route, train_x: torch.Tensor, train_y: torch.Tensor, options: Options) -> list[float]:
    """Train every parameter of ``route.model`` with cross-entropy; returns the loss of every step."""
    generator = torch.Generator().manual_seed(options.seed)
    groups = param_groups(route, options)
    optimizer = torch.optim.AdamW(groups, lr=options.lr, betas=(0.9, 0.999))
    batch = min(options.batch_size, len(train_x))
    order, position, losses = torch.randperm(len(train_x), generator=generator), 0, []
    route.model.train()
    bar = tqdm(range(options.steps), desc=f"{route.name}: fine-tune", leave=False)
    for step in bar:
        if position + batch > len(order):  # a new epoch: reshuffle
            order, position = torch.randperm(len(train_x), generator=generator), 0
        rows = order[position : position + batch]
        position += batch
        x, y = train_x[rows], train_y[rows]
        flip = torch.rand(len(x), generator=generator) < options.hflip
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        for group in optimizer.param_groups:
            group["lr"] = options.lr * group["lr_scale"] * lr_factor(step, options)
        loss = F.cross_entropy(route.logits(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    route.model.eval()
    return losses


def test_accuracy(route: Route, test_x: torch.Tensor, test_y: torch.Tensor, batch: int = 256) -> float:
    """Top-1 (%) of the model's own predictions."""
    route.model.eval()
    return accuracy(batched(route.logits, test_x, batch).argmax(dim=1), test_y)


def backbone_state(route: Route) -> dict[str, torch.Tensor]:
    """A copy of the backbone's parameters (the new classifier left out)."""
    head = "classifier." if route.name == "hf" else "head."
    return {k: v.detach().clone() for k, v in route.model.named_parameters()
            if k.startswith(route.backbone_prefix) and not k.startswith(head)}


def relative_change(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """``||after - before|| / ||before||`` over all backbone parameters together."""
    diff = sum(float((after[k] - before[k]).pow(2).sum()) for k in before)
    norm = sum(float(before[k].pow(2).sum()) for k in before)
    return math.sqrt(diff / norm)


def window_mean(losses: Sequence[float], window: int, last: bool) -> float:
    window = max(1, min(window, len(losses) // 2 or 1))
    part = losses[-window:] if last else losses[:window]
    return float(np.mean(part))


def run_route(route: Route, train: Split, test: Split, options: Options) -> dict:
    """Probe, fine-tune and score one loaded route; returns its row of the report."""
    start = time.perf_counter()
    train_x, test_x = preprocess_split(route, train), preprocess_split(route, test)
    probe = linear_probe(route, train_x, train.labels, test_x, test.labels, options.batch_eval)
    before = backbone_state(route)
    torch.manual_seed(options.seed)
    tuned_start = time.perf_counter()
    losses = finetune(route, train_x, train.labels, options)
    tune_seconds = time.perf_counter() - tuned_start
    tuned = test_accuracy(route, test_x, test.labels, options.batch_eval)
    return {
        "route": route.name,
        "architecture": route.architecture,
        "labelled": len(train.labels),
        "test_images": len(test.labels),
        "steps": options.steps,
        "linear_probe": probe["accuracy"],
        "probe_lambda": probe["lambda"],
        "probe_lambda_method": probe["lambda_method"],
        "finetuned": tuned,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_first_window": window_mean(losses, options.loss_window, last=False),
        "loss_last_window": window_mean(losses, options.loss_window, last=True),
        "loss_window": max(1, min(options.loss_window, len(losses) // 2 or 1)),
        "backbone_relative_change": relative_change(before, backbone_state(route)),
        "finetune_seconds": tune_seconds,
        "seconds": time.perf_counter() - start,
        "preprocessing": route.preprocessing,
        "losses": losses,
    }


# --- report ---------------------------------------------------------------------------------------
def markdown_table(rows: Sequence[dict]) -> str:
    head = ("| route | model | labelled | test images | steps | linear probe (%) | fine-tuned (%) | "
            "first loss | last loss | first/last window mean | fine-tune time (s) |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['route']} | {r['architecture']} | {r['labelled']} | {r['test_images']} | {r['steps']} | "
                     f"{r['linear_probe']:.1f} | {r['finetuned']:.1f} | {r['loss_first']:.3f} | {r['loss_last']:.3f} | "
                     f"{r['loss_first_window']:.3f} / {r['loss_last_window']:.3f} | {r['finetune_seconds']:.1f} |")
    return "\n".join(lines)


def write_report(rows: Sequence[dict], options: Options, sources: dict, output: Path, seconds: float) -> dict:
    output.mkdir(parents=True, exist_ok=True)
    document = {"options": asdict(options), "sources": sources, "routes": list(rows), "total_seconds": seconds,
                "torch_threads": torch.get_num_threads()}
    files.write_text(output / "finetune.json", json.dumps(document, indent=2) + "\n")
    text = ["# Fine-tuning vs linear probe (scripts/finetune.py)", "", markdown_table(rows), "",
            f"Options: {json.dumps(asdict(options))}", "", f"Sources: {json.dumps(sources)}", "",
            f"Total time: {seconds:.1f} s on {torch.get_num_threads()} CPU thread(s)", ""]
    text += [f"- {r['route']} preprocessing: {r['preprocessing']}" for r in rows]
    files.write_text(output / "finetune.md", "\n".join(text) + "\n")
    return document


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
    print(markdown_table(rows))
    print(f"wrote {output / 'finetune.json'} and {output / 'finetune.md'} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
