"""Pre-training data pipeline: seeded, resumable, rank-sharded multi-view batches.

Determinism does not depend on worker count or on where a run was resumed: the epoch's order
is a permutation seeded by ``(seed, epoch)``, and each sample's augmentation is drawn from a
generator seeded by ``(seed, epoch, index)``, with every ``data.augment`` (per image, never
per batch: nor does it depend on the number of ranks; anchor masks are drawn by the train
step, :class:`msn.masking.AnchorMasks`). The loader never draws from the
global torch generator: its own generator (the workers' base seed) is seeded by
``(seed, epoch, rank)`` in :func:`start_epoch`, so a resumed run's global random stream
continues the uninterrupted run's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from msn.data.batch_augment import DeferredPhotometric, DeferredViews
from msn.data.decode import BadImageError
from msn.data.samplers import EpochSampler
from msn.data.seeds import sample_seed
from msn.data.transforms import MultiViewTransform
from msn.data.view_params import view_uniforms


class MultiViewDataset(Dataset):
    """Wrap an image data set; item ``(epoch, index)`` -> ``(views, label, key, replaced)``.

    Args:
        base: data set of ``(uint8 image or None, label)``.
        transform: a :class:`MultiViewTransform`, or ``None`` to pass the uint8 image on
            (``views = [image]``) for :class:`msn.data.batch_augment.BatchMultiView`.
        seed: run seed.
    """

    def __init__(self, base: Dataset, transform: MultiViewTransform | None, seed: int):
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]):
        """``(views, label, key, replaced)``: an unreadable image is replaced by another image of
        the data set, drawn from ``(seed, epoch, index)`` (:data:`REPLACEMENT_TRIES` candidates),
        augmented with the unreadable one's own key, so that a batch keeps its size and every
        rank its share; :class:`Unreadable` only when every candidate is unreadable too."""
        epoch, index = key
        image, label = self.base[index]
        replaced = image is None
        if replaced:
            image, label = self._replacement(epoch, index)
            if image is None:
                return Unreadable(_source(self.base, index))
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
            views = [image] if self.transform is None else self.transform(image)
        return views, label, key, replaced

    def _replacement(self, epoch: int, index: int):
        """The first readable of :data:`REPLACEMENT_TRIES` images drawn for ``(seed, epoch, index)``."""
        generator = torch.Generator().manual_seed(sample_seed(self.seed + 3, epoch, index) % 2**32)
        for other in torch.randint(len(self.base), (REPLACEMENT_TRIES,), generator=generator).tolist():
            if other != index:
                image, label = self.base[other]
                if image is not None:
                    return image, label
        return None, None


#: Images tried in place of an unreadable one before the batch is left one image short.
REPLACEMENT_TRIES = 8


@dataclass(frozen=True)
class Unreadable:
    """A sample whose image could not be decoded (``data.on_bad_image=skip``): its file."""

    source: str


def _source(base: Dataset, index: int) -> str:
    """The file of item ``index`` (through ``Subset`` wrappers), or its index."""
    while isinstance(base, torch.utils.data.Subset):
        base, index = base.dataset, base.indices[index]
    samples = getattr(base, "samples", None)
    return str(samples[index][0]) if samples is not None else f"image {index}"


@dataclass
class MultiViewBatch:
    """A collated batch: ``target`` [B,3,H,W], ``anchor`` [B,3,H,W], ``focal`` [V*B,3,h,w]
    view-major, ``labels`` [B], ``skipped`` bad images; ``rows``, when images were skipped, the
    places [B] the remaining ones had in the loader's batch (``None``: ``0..B-1``), so that what
    is keyed by an image's place (:class:`msn.masking.AnchorMasks`) stays with the image.

    With ``data.augment=device`` the images are still uint8 and ``pending`` holds the
    augmentation left to run (:class:`~msn.data.batch_augment.DeferredPhotometric` or
    :class:`~msn.data.batch_augment.DeferredViews`, every parameter already drawn);
    :meth:`to` runs it on the training device.
    """

    target: torch.Tensor
    anchor: torch.Tensor
    focal: torch.Tensor
    labels: torch.Tensor
    skipped: int
    pending: Any = None
    rows: torch.Tensor | None = None

    def pin_memory(self) -> "MultiViewBatch":
        return MultiViewBatch(self.target.pin_memory(), self.anchor.pin_memory(), self.focal.pin_memory(),
                              self.labels.pin_memory(), self.skipped, self.pending, self.rows)

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> "MultiViewBatch":
        """On ``device``, augmented there if ``pending``; the images (not the labels) also in
        ``dtype`` if given."""
        views = [t.to(device, non_blocking=True) for t in (self.target, self.anchor, self.focal)]
        if self.pending is not None:
            views = self.pending.apply(*views)
        target, anchor, focal = (t.to(dtype) if dtype is not None else t for t in views)
        return MultiViewBatch(target, anchor, focal, self.labels.to(device, non_blocking=True), self.skipped,
                              rows=self.rows)

    @property
    def size(self) -> int:
        return self.target.shape[0]


def collate_views(samples: list, photometric=None, seed: int = 0, batch_views=None, defer: bool = False) -> MultiViewBatch:
    """Stack samples view-major, dropping unreadable ones (:class:`Unreadable`: no replacement
    could be read either) and counting them with the replaced ones.

    Every random parameter of an image's views is drawn from uniforms keyed by its
    ``(seed + 1, epoch, index)`` (:func:`msn.data.view_params.view_uniforms`), never by the
    batch: a global batch split over any number of ranks, with or without unreadable images
    beside it, gives each image the same views.

    Args:
        samples: items of :class:`MultiViewDataset`.
        photometric: optional ``(rand, focal)`` pair of
            :class:`msn.data.batch_augment.BatchPhotometric` applied to the uint8 crops.
        seed: run seed.
        batch_views: optional :class:`msn.data.batch_augment.BatchMultiView` that makes every
            view of the batch from the raw uint8 images (samples carry ``views = [image]``).
        defer: draw the batched augmentation's parameters here but leave its work to the
            training device (``data.augment=device``): the batch carries uint8 pixels and a
            ``pending`` augmentation, and equals the ``batched`` one once moved.
    """
    good = [s for s in samples if not isinstance(s, Unreadable)]
    if not good:
        raise BadImageError(f"every image of a batch of {len(samples)} was unreadable, {samples[0].source} first; "
                            f"data.on_bad_image=skip needs one readable image per batch")
    labels = torch.tensor([s[1] for s in good])
    skipped = len(samples) - len(good) + sum(bool(s[3]) for s in good if len(s) > 3)  # replaced ones count too
    dropped = len(samples) - len(good)
    rows = torch.tensor([i for i, s in enumerate(samples) if not isinstance(s, Unreadable)]) if dropped else None
    keys = [s[2] for s in good]
    if batch_views is not None:
        images = torch.stack([s[0][0] for s in good])
        plan = batch_views.sample(view_uniforms(keys, seed + 1, batch_views.num_views), *images.shape[-2:])
        if defer:
            empty = images.new_zeros(0)
            return MultiViewBatch(images, empty, empty, labels, skipped, DeferredViews(batch_views, plan), rows)
        return MultiViewBatch(*batch_views.render(images, plan), labels, skipped, rows=rows)
    num_focal = len(good[0][0]) - 2
    target = torch.stack([s[0][0] for s in good])
    anchor = torch.stack([s[0][1] for s in good])
    if num_focal:
        focal = torch.stack([s[0][2 + v] for v in range(num_focal) for s in good])
    else:
        focal = torch.empty(0, *anchor.shape[1:], dtype=anchor.dtype)
    if photometric is None:
        return MultiViewBatch(target, anchor, focal, labels, skipped, rows=rows)
    rand, small = photometric
    pending = DeferredPhotometric.sample(rand, small, view_uniforms(keys, seed + 1, 2 + num_focal))
    if defer:
        return MultiViewBatch(target, anchor, focal, labels, skipped, pending, rows)
    return MultiViewBatch(*pending.apply(target, anchor, focal), labels, skipped, rows=rows)


class MultiViewCollate:
    """Picklable ``collate_fn`` for DataLoader workers (see :func:`collate_views`)."""

    def __init__(self, photometric=None, seed: int = 0, batch_views=None, defer: bool = False):
        self.photometric, self.seed, self.batch_views, self.defer = photometric, seed, batch_views, defer

    def __call__(self, samples: list) -> MultiViewBatch:
        return collate_views(samples, self.photometric, self.seed, self.batch_views, self.defer)


def build_train_loader(dataset: MultiViewDataset, sampler: EpochSampler, num_workers: int,
                       pin_memory: bool = False, persistent_workers: bool = False,
                       collate: MultiViewCollate | None = None) -> DataLoader:
    """A DataLoader over ``sampler`` yielding :class:`MultiViewBatch` of ``sampler.local_batch``."""
    return DataLoader(
        dataset,
        batch_size=sampler.local_batch,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate or MultiViewCollate(),
        pin_memory=pin_memory,
        drop_last=True,
        persistent_workers=persistent_workers and num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        generator=torch.Generator(),  # the base-seed draw of each iteration; see start_epoch
    )


def start_epoch(loader: DataLoader, epoch: int, batch: int = 0) -> DataLoader:
    """Position ``loader`` (over a :class:`~msn.data.samplers.EpochSampler`) at ``batch`` of
    ``epoch`` and seed its own generator by ``(seed, epoch, rank)``; returns the loader, to iterate."""
    sampler: EpochSampler = loader.sampler
    sampler.set_position(epoch, batch)
    loader.generator.manual_seed(sample_seed(sampler.seed + 2, epoch, sampler.rank))
    return loader
