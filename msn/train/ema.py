"""Target encoder: exponential moving average of the online encoder (paper Sec. 3)."""

from __future__ import annotations

import torch
from torch import nn

from msn.train.sharding import local


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``t = m * t + (1 - m) * s`` over parameters only (buffers such as BN statistics are the
    target's own, as in the reference). Sharded parameters (``dist.strategy=fsdp2``) are
    updated shard by shard, without communication: online and target are sharded alike."""
    target_params = local(target.parameters())
    online_params = local(p.detach() for p in online.parameters())
    if len(target_params) != len(online_params):
        raise ValueError("target and online networks have different parameter lists")
    torch._foreach_lerp_(target_params, online_params, 1.0 - momentum)
