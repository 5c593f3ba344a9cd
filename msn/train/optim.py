"""AdamW with the reference's parameter groups (docs/method.md Sec. 6)."""

from __future__ import annotations

import torch
from torch import nn

WD_EXCLUDE = "wd_exclude"


def parameter_groups(network: nn.Module, prototypes: nn.Parameter, decay_pos_embed: bool = True) -> list[dict]:
    """Three groups: decayed weights; biases, norm/BN parameters and 1-D tensors (no WD);
    prototypes (no WD).

    Args:
        network: the online encoder + head.
        prototypes: the prototype parameter (skipped when frozen).
        decay_pos_embed: the reference decays ``cls_token`` and ``pos_embed`` (3-D tensors);
            ``False`` moves them to the no-decay group.
    """
    decay, no_decay = [], []
    for name, param in network.named_parameters():
        if not param.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        excluded = param.ndim <= 1 or leaf == "bias"
        if not decay_pos_embed and leaf in ("cls_token", "pos_embed"):
            excluded = True
        (no_decay if excluded else decay).append(param)
    groups = [
        {"params": decay, "name": "decay"},
        {"params": no_decay, "name": "no_decay", "weight_decay": 0.0, WD_EXCLUDE: True},
    ]
    if prototypes.requires_grad:
        groups.append({"params": [prototypes], "name": "prototypes", "weight_decay": 0.0, WD_EXCLUDE: True})
    return groups


def build_optimizer(groups: list[dict], betas=(0.9, 0.999), eps: float = 1e-8, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over ``groups``; LR and WD are set every step by the trainer."""
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(betas), eps=eps, **kwargs)


def set_lr_and_wd(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Set the step's LR on every group and its WD on the groups that are decayed."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        if not group.get(WD_EXCLUDE, False):
            group["weight_decay"] = weight_decay
