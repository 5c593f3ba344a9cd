"""Encoder (timm ViT + token drop), projection head and prototypes."""

from __future__ import annotations

import torch
from torch import nn

from msn.models.head import ProjectionHead, Prototypes
from msn.models.sync_bn import SyncBatchNorm, use_sync_batchnorm
from msn.architectures import ARCHITECTURES
from msn.models.vit import MSNViT, build_vit, disable_drop_path, resize_pos_embed, sincos_pos_embed

__all__ = [
    "ARCHITECTURES",
    "MSNNetwork",
    "MSNViT",
    "ProjectionHead",
    "Prototypes",
    "SyncBatchNorm",
    "build_network",
    "build_vit",
    "disable_drop_path",
    "resize_pos_embed",
    "sincos_pos_embed",
    "use_sync_batchnorm",
]


class MSNNetwork(nn.Module):
    """Backbone + projection head: the unit that the target encoder copies and averages.

    Args:
        backbone: an :class:`MSNViT`.
        head: a :class:`ProjectionHead` whose input width is the backbone's.
    """

    def __init__(self, backbone: MSNViT, head: ProjectionHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor, keep_indices: torch.Tensor | None = None) -> torch.Tensor:
        """Projection of the post-LayerNorm CLS token, [B, out_dim]."""
        return self.head(self.backbone(images, keep_indices))


def build_network(model_cfg, head_cfg, img_size: int) -> MSNNetwork:
    """Encoder + head from :class:`msn.config.ModelConfig` / :class:`msn.config.HeadConfig`."""
    backbone = build_vit(
        model_cfg.arch,
        model_cfg.patch_size,
        img_size,
        embed_dim=model_cfg.embed_dim,
        depth=model_cfg.depth,
        num_heads=model_cfg.num_heads,
        mlp_ratio=model_cfg.mlp_ratio,
        attention=model_cfg.attention,
        grad_checkpointing=model_cfg.grad_checkpointing,
        drop_path_rate=model_cfg.drop_path_rate,
        pos_embed=model_cfg.pos_embed,
    )
    head = ProjectionHead(backbone.embed_dim, head_cfg.hidden_dim, head_cfg.output_dim, head_cfg.use_bn)
    return MSNNetwork(backbone, head)
