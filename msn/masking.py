"""Token drop for the masked anchor view (paper Sec. 3, "Input Masking").

MSN removes a random subset of patch tokens from the anchor view after the position
embedding is added; the CLS token is always kept and the dropped tokens are removed from
the sequence, so the encoder's cost shrinks with the mask ratio.
"""

from __future__ import annotations

import math

import torch


def num_kept_patches(num_patches: int, mask_ratio: float) -> int:
    """``floor(N * (1 - mask_ratio))`` as in the reference."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {mask_ratio}")
    return int(math.floor(num_patches * (1.0 - mask_ratio)))


def sample_keep_indices(
    batch_size: int,
    num_patches: int,
    mask_ratio: float,
    *,
    shared: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Sequence positions to keep, CLS first.

    Args:
        batch_size: number of images B.
        num_patches: number of patch tokens N (the CLS token is extra, at position 0).
        mask_ratio: fraction of patch tokens to drop.
        shared: one random subset for the whole batch (the reference's behaviour) instead of
            an independent subset per image (our default).
        generator: CPU random generator; the draw happens on the CPU so that it is identical
            on every device.
        device: where the returned indices live.

    Returns:
        Long tensor [B, 1 + floor(N * (1 - mask_ratio))]: column 0 is 0 (CLS), the others are
        the kept patch positions (1..N) in increasing order.
    """
    keep = num_kept_patches(num_patches, mask_ratio)
    if shared:
        chosen = torch.randperm(num_patches, generator=generator)[:keep].expand(batch_size, keep)
    else:
        chosen = torch.rand(batch_size, num_patches, generator=generator).argsort(dim=1)[:, :keep]
    chosen = chosen.sort(dim=1).values + 1
    cls = torch.zeros(batch_size, 1, dtype=torch.long)
    return torch.cat([cls, chosen], dim=1).to(device)


def gather_tokens(tokens: torch.Tensor, keep_indices: torch.Tensor) -> torch.Tensor:
    """Select ``keep_indices`` [B, T'] from ``tokens`` [B, T, D] along the sequence."""
    index = keep_indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
    return torch.gather(tokens, 1, index)
