"""The key of every per-image random stream of the data pipeline (docs/method.md Sec. 1)."""

from __future__ import annotations


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed unique to ``(seed, epoch, index)``: every augmentation of image ``index``
    in ``epoch`` is drawn from a generator seeded by it (``seed`` plus a small offset per
    stream), never by the batch or the rank the image lands in."""
    return (seed * 0x9E3779B1 + epoch * 0x85EBCA77 + index * 0xC2B2AE3D + 0x27D4EB2F) % (2**63 - 1)
