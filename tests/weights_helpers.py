"""Shared by the export/import tests: random weights and a training checkpoint holding them."""

from __future__ import annotations

import copy

import torch

import msn.checkpoint
import msn.config
import msn.models


#: Two implementations of the same forward (ours, transformers', timm's) are compared in
#: float64: rounding (~1e-16 relative, a few hundred operations deep at these sizes) stays far
#: below 1e-10 on any CPU, while float32 agreement would depend on the BLAS kernels chosen.
EXACT = {"atol": 1e-10, "rtol": 0.0}
#: transformers' eager attention computes its softmax in float32 even in a float64 model; that
#: one rounding (2^-24 relative per probability, over <= 17 tokens and 2 blocks here) moves
#: the O(1) output tokens by ~1e-7 (6.7e-8 measured), independently of the CPU's matmul kernels.
EXACT_BUT_FP32_SOFTMAX = {"atol": 1e-6, "rtol": 0.0}


def float64(module: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of ``module`` (exact: every float32 value is a float64 value)."""
    return copy.deepcopy(module).double()


def randomize(network: torch.nn.Module, seed: int, int_fill: int | None = None) -> torch.nn.Module:
    """Non-trivial values in every floating tensor (LayerNorm affine, biases, position
    embedding, BN running statistics kept positive); integer buffers (BN counters) set to
    ``int_fill`` when given."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in network.state_dict().items():
            if not tensor.is_floating_point():
                if int_fill is not None:
                    tensor.fill_(int_fill)
                continue
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2 + (0.5 if tensor.ndim == 1 else 0.0))
            if name.endswith("running_var"):
                tensor.abs_().add_(0.1)
    return network


def write_run(out, cfg, size: int, seeds: tuple[int, int], step: int, epoch: int, int_fill: int | None = None) -> dict:
    """A training checkpoint in ``out`` with distinct random online and target encoders."""
    online = randomize(msn.models.build_network(cfg.model, cfg.head, size), seeds[0], int_fill)
    target = randomize(msn.models.build_network(cfg.model, cfg.head, size), seeds[1], int_fill)
    path = msn.checkpoint.save_training_checkpoint(
        {"config": msn.config.to_dict(cfg), "step": step, "epoch": epoch, "encoder": online.state_dict(),
         "target_encoder": target.state_dict(), "prototypes": torch.randn(cfg.loss.num_prototypes, cfg.head.output_dim),
         "optimizer": {}, "rng": {}},
        out,
    )
    return {"path": path, "online": online.eval(), "target": target.eval(), "cfg": cfg}


def small_config(size: int = 32, width: int = 64, depth: int = 2, heads: int = 4, patch: int = 8,
                 mean=None, std=None) -> msn.config.MSNConfig:
    """The validated config of a small ViT (64 wide, 2 blocks by default) on synthetic data."""
    views = {"rand_size": size, "focal_size": 16}
    if mean is not None:
        views.update(mean=list(mean), std=list(std))
    return msn.config.load_config({
        "data": {"name": "synthetic", "views": views},
        "model": {"arch": "vit_mini", "depth": depth, "embed_dim": width, "num_heads": heads, "patch_size": patch},
        "head": {"hidden_dim": 64, "output_dim": 32},
        "loss": {"num_prototypes": 16},
    })


def random_images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """``batch`` normal-noise images of ``size`` px, the same for the same seed."""
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
