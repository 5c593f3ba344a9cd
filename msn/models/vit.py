"""The MSN encoder: a timm ``VisionTransformer`` driven by MSN's token-drop forward.

Blocks, attention and norms are timm's; this module only owns the order of operations
(paper Sec. 3 and docs/method.md Sec. 2): patch embedding, CLS token, position embedding
(bicubically resized for other input sizes, e.g. 96 px focal views), token drop, blocks,
final LayerNorm.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models._manipulate import checkpoint_seq
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from msn.architectures import ARCHITECTURES, POS_EMBEDS
from msn.masking import gather_tokens

def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resize a [1, 1+N, D] position embedding to a new patch grid (CLS slot unchanged).

    Bicubic, ``align_corners=False``, no antialias: the interpolation of the MSN reference
    and of transformers' ``interpolate_pos_encoding``.
    """
    num_patches = pos_embed.shape[1] - 1
    side = int(math.isqrt(num_patches))
    if (side, side) == tuple(grid):
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    patch_pos = patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    work = torch.promote_types(patch_pos.dtype, torch.float32)  # bicubic in at least fp32
    patch_pos = F.interpolate(patch_pos.to(work), size=grid, mode="bicubic", align_corners=False)
    patch_pos = patch_pos.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat([cls_pos, patch_pos], dim=1)


def init_patch_embed(conv: nn.Conv2d) -> None:
    """The reference's initialisation of every ``Conv2d`` (its DeiT ``_init_weights``):
    Kaiming normal, ``fan_in``, ReLU gain (std ``sqrt(2 / (3 p^2))``, 0.051 for patch 16), zero
    bias. timm leaves the patch embedding at PyTorch's default (uniform, std 0.021, non-zero
    bias); it is the only parameter whose initial distribution would otherwise differ."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class ClassTokenBlock(Block):
    """timm's pre-norm transformer block, plus a ``cls_only`` mode for the last block of an
    encoder whose only output is the CLS token (MSN's representation, paper Sec. 3).

    With ``cls_only``, keys and values are computed for every token but the query, the
    attention output, the projection and the MLP for the CLS token alone: equal to
    ``block(x)[:, :1]`` in exact arithmetic (no other row reaches the CLS output), for 2
    instead of 12 ``D x D`` products per other token. Same parameters and state-dict names as
    timm's ``Block``; the call goes through the module, so wrappers' hooks (FSDP) still run.
    """

    def forward(self, x: torch.Tensor, *args, cls_only: bool = False, **kwargs) -> torch.Tensor:
        if not cls_only or getattr(self.attn, "gate", None) is not None:
            out = super().forward(x, *args, **kwargs)
            return out[:, :1] if cls_only else out
        cls = x[:, :1] + self.drop_path1(self.ls1(self._cls_attention(self.norm1(x))))
        return cls + self.drop_path2(self.ls2(self.mlp(self.norm2(cls))))

    def _cls_attention(self, y: torch.Tensor) -> torch.Tensor:
        """timm's ``Attention`` for the CLS query only: [B, N, D] -> [B, 1, D]."""
        attn = self.attn
        batch, length, _ = y.shape
        width = attn.qkv.out_features // 3
        heads = attn.num_heads
        weight, bias = attn.qkv.weight, attn.qkv.bias
        q = F.linear(y[:, :1], weight[:width], None if bias is None else bias[:width])
        kv = F.linear(y, weight[width:], None if bias is None else bias[width:])
        q = q.reshape(batch, 1, heads, width // heads).transpose(1, 2)
        k, v = kv.reshape(batch, length, 2, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        if attn.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if self.training else 0.0)
        else:
            weights = attn.attn_drop(((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1))
            out = weights @ v
        out = out.transpose(1, 2).reshape(batch, 1, width)
        out = getattr(attn, "norm", nn.Identity())(out)
        return attn.proj_drop(attn.proj(out))


class MSNViT(nn.Module):
    """A timm ``VisionTransformer`` with MSN's token-drop forward.

    Args:
        vit: a timm ViT with a class token, no register tokens, ``num_classes=0``.
    """

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        if vit.cls_token is None or getattr(vit, "num_reg_tokens", 0):
            raise ValueError("MSN needs a timm ViT with a CLS token and no register tokens")
        self.vit = vit
        self.vit.patch_embed.strict_img_size = False

    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    @property
    def patch_size(self) -> int:
        return self.vit.patch_embed.patch_size[0]

    def num_patches(self, image_size: int) -> int:
        """Number of patch tokens of a square ``image_size`` input."""
        return (image_size // self.patch_size) ** 2

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens with CLS prepended and position embedding added: [B, 1+N, D]."""
        height, width = images.shape[-2:]
        patch = self.patch_size
        if height % patch or width % patch:
            raise ValueError(f"image size {height}x{width} is not divisible by the patch size {patch}")
        tokens = self.vit.patch_embed(images)
        cls = self.vit.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1)
        return tokens + resize_pos_embed(self.vit.pos_embed, (height // patch, width // patch))

    def forward_blocks(
        self, images: torch.Tensor, keep_indices: torch.Tensor | None = None, collect_last: int = 0
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the transformer.

        Args:
            images: [B, 3, H, W].
            keep_indices: optional [B, T'] sequence positions to keep (CLS = 0 first), from
                :func:`msn.masking.sample_keep_indices`; the other tokens are removed.
            collect_last: also return the outputs of the last ``collect_last`` blocks
                (before the final LayerNorm).

        Returns:
            (tokens after the final LayerNorm [B, T', D], list of collected block outputs).
        """
        tokens = self.embed(images)
        if keep_indices is not None:
            tokens = gather_tokens(tokens, keep_indices)
        tokens = self.vit.norm_pre(tokens)
        collected: list[torch.Tensor] = []
        if collect_last:
            first = len(self.vit.blocks) - collect_last
            for index, block in enumerate(self.vit.blocks):
                tokens = block(tokens)
                if index >= first:
                    collected.append(tokens)
        elif self.vit.grad_checkpointing and torch.is_grad_enabled():
            tokens = checkpoint_seq(self.vit.blocks, tokens)
        else:
            tokens = self.vit.blocks(tokens)
        return self.vit.norm(tokens), collected

    def forward_cls(
        self, images: torch.Tensor, keep_indices: torch.Tensor | None = None, final_norm: bool = True
    ) -> torch.Tensor:
        """The CLS token of the last block, [B, D]: after the final LayerNorm, or before it with
        ``final_norm=False`` (the low-shot feature ``cls_pre_ln``, docs/eval.md).

        Only the CLS token leaves the last block, so that block runs in
        :meth:`ClassTokenBlock.forward`'s ``cls_only`` mode: the same value as the full block's
        CLS row in exact arithmetic, for about 1/12 fewer FLOPs of the whole encoder, forward
        and backward.
        """
        tokens = self.embed(images)
        if keep_indices is not None:
            tokens = gather_tokens(tokens, keep_indices)
        tokens = self.vit.norm_pre(tokens)
        *blocks, last = self.vit.blocks
        if self.vit.grad_checkpointing and torch.is_grad_enabled():
            tokens = checkpoint_seq(nn.Sequential(*blocks), tokens)
        else:
            for block in blocks:
                tokens = block(tokens)
        cls = last(tokens, cls_only=True)
        return (self.vit.norm(cls) if final_norm else cls)[:, 0]

    def forward(self, images: torch.Tensor, keep_indices: torch.Tensor | None = None) -> torch.Tensor:
        """CLS token after the final LayerNorm, [B, D] (the representation fed to the head):
        :meth:`forward_cls`."""
        return self.forward_cls(images, keep_indices)


def sincos_pos_embed(grid: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """A fixed 2-D sine-cosine position table ``[1, 1 + grid^2, dim]`` (CLS slot zero).

    The patch at row ``y``, column ``x`` (row-major, as the patch sequence) gets
    ``[sin(y w), cos(y w), sin(x w), cos(x w)]``, each part over the ``dim / 4`` frequencies
    ``w_i = temperature^(-i / (dim / 4))``: the 2-D form of the Transformer's sinusoidal code
    (Vaswani et al. 2017, Sec. 3.5), as ViTs trained with fixed positions use it (MoCo v3,
    Chen et al. 2021, Sec. 4).
    """
    if dim % 4:
        raise ValueError(f"model.pos_embed=sincos needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = temperature ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    y, x = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")
    y, x = y.reshape(-1, 1) * omega, x.reshape(-1, 1) * omega
    table = torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table]).unsqueeze(0).float()


def build_vit(
    arch: str,
    patch_size: int,
    img_size: int,
    *,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    mlp_ratio: float = 4.0,
    attention: str = "sdpa",
    grad_checkpointing: bool = False,
    drop_path_rate: float = 0.0,
    pos_embed: str = "learned",
) -> MSNViT:
    """Build a timm ViT for MSN (pre-norm, qkv bias, LayerNorm eps 1e-6; the patch embedding
    initialised like the reference, :func:`init_patch_embed`).

    Args:
        arch: a key of :data:`ARCHITECTURES`.
        patch_size: patch side in pixels.
        img_size: native (target/anchor) input size; the position embedding has one slot
            per patch of this size plus CLS.
        embed_dim, depth, num_heads: optional overrides of the architecture's values.
        mlp_ratio: MLP hidden width over ``embed_dim``.
        attention: ``sdpa`` (fused scaled-dot-product attention) or ``eager``.
        grad_checkpointing: activation checkpointing of the blocks during training.
        drop_path_rate: stochastic depth of the last block (rising linearly from 0 at the
            first, the DeiT rule the reference follows); active in training mode only.
        pos_embed: ``learned`` (the reference) or ``sincos``: :func:`sincos_pos_embed`, kept
            fixed (``requires_grad=False``; exports carry its values as the position table).
    """
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(ARCHITECTURES)}")
    if attention not in ("sdpa", "eager"):
        raise ValueError(f"attention must be 'sdpa' or 'eager', got {attention!r}")
    if pos_embed not in POS_EMBEDS:
        raise ValueError(f"pos_embed must be one of {POS_EMBEDS}, got {pos_embed!r}")
    dims = dict(ARCHITECTURES[arch])
    dims.update({k: v for k, v in dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads).items() if v})
    vit = VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        num_classes=0,
        global_pool="token",
        mlp_ratio=mlp_ratio,
        qkv_bias=True,
        class_token=True,
        drop_rate=0.0,
        drop_path_rate=drop_path_rate,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        block_fn=ClassTokenBlock,
        **dims,
    )
    nn.init.trunc_normal_(vit.cls_token, std=0.02)
    init_patch_embed(vit.patch_embed.proj)
    if pos_embed == "sincos":
        with torch.no_grad():
            vit.pos_embed.copy_(sincos_pos_embed(img_size // patch_size, vit.embed_dim))
        vit.pos_embed.requires_grad_(False)
    for block in vit.blocks:
        block.attn.fused_attn = attention == "sdpa"
    vit.set_grad_checkpointing(grad_checkpointing)
    return MSNViT(vit)


def disable_drop_path(module: nn.Module) -> nn.Module:
    """Switch stochastic depth off in ``module`` (the EMA target, which runs in training mode
    for its batch norms but must see every block); returns it."""
    for layer in module.modules():
        if isinstance(layer, DropPath):
            layer.drop_prob = 0.0
    return module
