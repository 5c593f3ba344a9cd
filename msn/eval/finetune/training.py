"""Probe, fine-tune and score one route (docs/finetune.md): a linear probe of the frozen
backbone with the low-shot protocol of :mod:`msn.eval`, then every parameter trained with AdamW
(linear warm-up, cosine decay, optional layer-wise LR decay) on the same labelled images."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from msn.eval.classifier import accuracy, fit_logistic_regression, normalize_rows, select_lambda
from msn.eval.config import EvalConfig
from msn.eval.finetune.data import NUM_CLASSES, Options, Split
from msn.eval.finetune.routes import Route


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
