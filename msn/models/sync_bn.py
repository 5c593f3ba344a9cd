"""Synchronised batch norm for the projection heads with several processes (``model.sync_bn``).

The reference converts the heads' batch norms to ``torch.nn.SyncBatchNorm`` (docs/method.md
Sec. 3); that one only runs on GPUs, so on other devices :class:`SyncBatchNorm` takes its place.
"""

from __future__ import annotations

import torch
from torch import nn

from msn import distributed


class SyncBatchNorm(nn.BatchNorm1d):
    """Batch norm whose batch statistics cover the batches of all ranks, on any device.

    ``torch.nn.SyncBatchNorm`` only runs on GPUs; this one uses two differentiable
    all-reduces (sums, then squared deviations from the global mean), so it also runs with
    gloo on the CPU. Outside training or with one process it is ``nn.BatchNorm1d``. With
    equal local batches, the gradients averaged by DDP equal the single-process gradients
    of the concatenated batch. Parameters and buffers have ``BatchNorm1d``'s names.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002, D102
        if not (self.training and distributed.is_distributed()):
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0] + list(range(2, input.dim()))
        shape = [1, -1] + [1] * (input.dim() - 2)
        x = input.to(torch.promote_types(input.dtype, torch.float32))
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        sums = distributed.all_reduce_sum(torch.cat([x.sum(dim=dims), count]))
        total = sums[-1].detach()
        mean = sums[:-1] / total
        centred = x - mean.view(shape)
        var = distributed.all_reduce_sum((centred * centred).sum(dim=dims)) / total
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var.detach() * (total / max(float(total) - 1.0, 1.0))
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        return out.to(input.dtype)


def use_sync_batchnorm(module: nn.Module, device_type: str) -> nn.Module:
    """Replace every batch-norm layer of ``module`` by a synchronised one: torch's
    ``SyncBatchNorm`` on CUDA, :class:`SyncBatchNorm` elsewhere. Returns the module."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in list(module.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, (SyncBatchNorm, nn.SyncBatchNorm)):
            sync = SyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats,
                                 device=child.running_mean.device if child.running_mean is not None else None)
            sync.load_state_dict(child.state_dict())
            if child.affine:
                sync.weight.requires_grad_(child.weight.requires_grad)
                sync.bias.requires_grad_(child.bias.requires_grad)
            sync.train(child.training)
            setattr(module, name, sync)
        else:
            use_sync_batchnorm(child, device_type)
    return module
