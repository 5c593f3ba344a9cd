"""Projection head and prototypes (paper Sec. 3; docs/method.md Secs. 3-4)."""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionHead(nn.Sequential):
    """Linear-BN-GELU-Linear-BN-GELU-Linear, the reference's 3-layer MSN head.

    Sub-module names (``fc1, bn1, fc2, bn2, fc3``) match the reference's ``fc.*`` keys.
    Linear weights are truncated-normal (std 0.02) with zero bias.

    Args:
        in_dim: encoder width D.
        hidden_dim: hidden width (2048 in the paper).
        out_dim: projection width (256 in the paper).
        use_bn: batch norm after each hidden linear layer.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 256, use_bn: bool = True):
        def norm() -> nn.Module:
            return nn.BatchNorm1d(hidden_dim) if use_bn else nn.Identity()

        super().__init__(
            OrderedDict(
                fc1=nn.Linear(in_dim, hidden_dim),
                bn1=norm(),
                gelu1=nn.GELU(),
                fc2=nn.Linear(hidden_dim, hidden_dim),
                bn2=norm(),
                gelu2=nn.GELU(),
                fc3=nn.Linear(hidden_dim, out_dim),
            )
        )
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)


class Prototypes(nn.Module):
    """K learnable prototypes of dimension ``dim``, L2-normalised at every use.

    Initialised uniform in ``[-1/sqrt(dim), 1/sqrt(dim)]`` like the reference.

    Args:
        num_prototypes: K (1024 in the paper).
        dim: projection width.
        frozen: keep the prototypes fixed for the whole run (reference ``freeze_proto``).
    """

    def __init__(self, num_prototypes: int = 1024, dim: int = 256, frozen: bool = False):
        super().__init__()
        bound = 1.0 / math.sqrt(dim)
        self.weight = nn.Parameter(torch.empty(num_prototypes, dim).uniform_(-bound, bound))
        self.weight.requires_grad_(not frozen)

    def forward(self) -> torch.Tensor:
        """The normalised prototypes [K, D]."""
        return F.normalize(self.weight, dim=-1)
