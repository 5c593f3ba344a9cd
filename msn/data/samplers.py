"""The pre-training samplers (docs/method.md Sec. 1; docs/formats.md Sec. 9): which ``(epoch,
index)`` keys each rank reads, as pure functions of ``(seed, epoch, rank, world_size)``.

* :class:`ResumableSampler` (``data.shard_order=global``, every data set): a seeded
  permutation of the whole data set per epoch, each global batch cut between the ranks.
* :class:`ShardLocalSampler` (``data.shard_order=local``, ``data=shards``): each rank reads
  its own run of shards per epoch.

Both restart mid-epoch (``set_position(epoch, batch)``) at the exact sample.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from msn.data.seeds import sample_seed


class EpochSampler(Sampler):
    """What both samplers share: ``size // global_batch`` full global batches per epoch (the
    remainder is dropped), ``global_batch // world_size`` samples of each on every rank, and
    the position (epoch and batch) the next iteration starts from."""

    def __init__(self, size: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1):
        if size < global_batch:
            raise ValueError(f"data set of {size} images is smaller than one global batch ({global_batch})")
        self.size, self.global_batch, self.seed = size, global_batch, seed
        self.rank, self.world_size = rank, world_size
        self.local_batch = global_batch // world_size
        self.batches_per_epoch = size // global_batch
        self.epoch, self.start_batch = 0, 0

    def set_position(self, epoch: int, batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, batch

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.local_batch


class ResumableSampler(EpochSampler):
    """Yields ``(epoch, index)`` keys of this rank's share of each global batch.

    Every epoch is a permutation seeded by ``(seed, epoch)``, cut into ``len // global_batch``
    full global batches (the remainder is dropped); rank ``r`` takes the ``r``-th contiguous
    slice of each. ``set_position(epoch, batch)`` restarts mid-epoch.
    """

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        for batch in range(self.start_batch, self.batches_per_epoch):
            first = batch * self.global_batch + self.rank * self.local_batch
            for index in order[first:first + self.local_batch]:
                yield self.epoch, index


class ShardLocalSampler(EpochSampler):
    """``data.shard_order=local``: each rank reads its own run of shards (the interface of
    :class:`ResumableSampler`).

    Each epoch the shards are permuted, seeded by ``(seed, epoch)`` (the same on every rank),
    and laid end to end; that stream is cut into ``world_size`` consecutive pieces of
    ``batches_per_epoch * local_batch`` samples (``batches_per_epoch = size // global_batch``,
    the remainder, fewer than one global batch, is dropped from the stream's end). Rank ``r``
    takes piece ``r`` and shuffles it by a permutation seeded by ``(seed, epoch, rank)``. So
    every rank yields the same number of batches whatever the shard sizes, and reads about
    ``num_shards / world_size`` shards: a shard at a cut is split between the two ranks
    beside it (disjoint samples), so a rank opens at most ``ceil(num_shards / world_size) + 1``.
    The order is a pure function of ``(seed, epoch, rank, world_size)``.

    Args:
        shard_sizes: samples per shard; shard ``s`` holds the consecutive indices after
            those of shards ``0..s-1``.
    """

    def __init__(self, shard_sizes: Sequence[int], global_batch: int, seed: int, rank: int = 0, world_size: int = 1):
        self.shard_sizes = [int(size) for size in shard_sizes]
        self.shard_starts = np.concatenate([[0], np.cumsum(self.shard_sizes, dtype=np.int64)]).tolist()
        super().__init__(self.shard_starts[-1], global_batch, seed, rank, world_size)
        self.per_rank = self.batches_per_epoch * self.local_batch

    def shard_order(self, epoch: int) -> list[int]:
        """The epoch's permutation of the shards (the same on every rank)."""
        generator = torch.Generator().manual_seed(sample_seed(self.seed + 5, epoch, 0))
        return torch.randperm(len(self.shard_sizes), generator=generator).tolist()

    def pieces(self, epoch: int, rank: int | None = None) -> list[tuple[int, int, int]]:
        """``(shard, first, stop)`` index ranges that make up ``rank``'s piece of ``epoch``."""
        rank = self.rank if rank is None else rank
        begin, end = rank * self.per_rank, (rank + 1) * self.per_rank
        ranges, position = [], 0
        for shard in self.shard_order(epoch):
            shard_size = self.shard_sizes[shard]
            low, high = max(begin, position), min(end, position + shard_size)
            if low < high:
                start = self.shard_starts[shard] - position
                ranges.append((shard, start + low, start + high))
            position += shard_size
            if position >= end:
                break
        return ranges

    def shards_of(self, epoch: int, rank: int | None = None) -> list[int]:
        """The shards ``rank`` reads in ``epoch``, in stream order."""
        return [shard for shard, _, _ in self.pieces(epoch, rank)]

    def order(self, epoch: int) -> list[int]:
        """This rank's sample indices for ``epoch``, in the order they are yielded."""
        indices = torch.cat([torch.arange(first, stop) for _, first, stop in self.pieces(epoch)])
        generator = torch.Generator().manual_seed(sample_seed(self.seed + 6, epoch, self.rank))
        return indices[torch.randperm(len(indices), generator=generator)].tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self.order(self.epoch)
        for index in order[self.start_batch * self.local_batch:]:
            yield self.epoch, index
