"""Collectives used by the loss and the trainer; each reduces to a no-op with one process."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return rank() == 0


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (identity with one process); returns ``tensor``."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


class _AllReduceMean(torch.autograd.Function):
    """Forward: mean over ranks. Backward: identity (see ``all_reduce_mean``)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if not is_distributed():
            return tensor.clone()
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out / dist.get_world_size()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return grad_output


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Differentiable mean over ranks with an identity backward.

    Each rank's term ``f(mean_r x_r)`` has the exact gradient ``f'(.) / W`` with respect to
    its own ``x_r``; DDP then averages gradients over ``W`` ranks, so passing the gradient
    through unchanged makes the averaged gradient equal the gradient of the global term
    (MSN reference, ME-MAX regulariser, paper Sec. 3 eq. 3).
    """
    return _AllReduceMean.apply(tensor)
