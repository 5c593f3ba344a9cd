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


def mask_generator(seed: int, step: int, row: int = -1) -> torch.Generator:
    """The generator of ``step``'s masks: seeded without the rank, so that every rank draws
    the same masks (the reference seeds every rank identically). ``row``: the image's place in
    the global batch (per-image masks); -1 for the one shared subset."""
    return torch.Generator().manual_seed((seed * 7_919 + step * 104_729 + (row + 1) * 15_485_863 + 17) % (2**63 - 1))


class AnchorMasks:
    """Every anchor mask of a run, drawn in one place (paper Sec. 3, "Input Masking").

    The masks of step ``s`` depend on ``(seed, s)`` only: not on loader workers, not on where a
    run was resumed, and not on the number of processes. A per-image mask is drawn from a
    generator of its row in the global batch, so rank ``r`` of ``world_size`` draws only the
    rows of its contiguous share (the sampler's split) and N processes use exactly the masks of
    one process on the concatenated batch, at the cost of the local batch alone.

    Args:
        num_patches: patch tokens N of an anchor view.
        ratio: fraction of patch tokens dropped (0: no mask, ``None`` is returned).
        shared: one subset for the whole batch (the reference's) instead of one per image.
        seed: run seed.
        global_batch: images per step over all processes.
        rank: this process's index; ``world_size`` the number of processes.
    """

    def __init__(self, num_patches: int, ratio: float, shared: bool, seed: int, global_batch: int,
                 rank: int = 0, world_size: int = 1):
        self.kept = num_kept_patches(num_patches, ratio)  # validates the ratio
        self.num_patches, self.ratio, self.shared, self.seed = num_patches, ratio, shared, seed
        self.first_row = rank * (global_batch // world_size)

    def __call__(self, step: int, batch_size: int, device: torch.device | str | None = None,
                 rows: torch.Tensor | None = None) -> torch.Tensor | None:
        """Keep indices [batch_size, 1 + K] of this rank's anchors at ``step`` (CLS first).

        ``rows``: the places in this rank's share of the global batch of the images present,
        when unreadable ones were dropped (:attr:`msn.data.MultiViewBatch.rows`); default
        ``0..batch_size-1``. Each image then keeps its own row's mask, on any number of ranks.
        """
        if self.ratio == 0:
            return None
        if self.shared:
            return sample_keep_indices(batch_size, self.num_patches, self.ratio, shared=True,
                                       generator=mask_generator(self.seed, step), device=device)
        places = range(batch_size) if rows is None else [int(row) for row in rows]
        if len(places) != batch_size:
            raise ValueError(f"{len(places)} rows for a batch of {batch_size} anchors")
        subsets = [torch.randperm(self.num_patches, generator=mask_generator(self.seed, step, self.first_row + place))[: self.kept]
                   for place in places]
        chosen = torch.stack(subsets).sort(dim=1).values + 1
        return torch.cat([torch.zeros(batch_size, 1, dtype=torch.long), chosen], dim=1).to(device)
