"""Pre-training data pipeline: seeded, resumable, rank-sharded multi-view batches.

Determinism does not depend on worker count or on where a run was resumed: the epoch's order
is a permutation seeded by ``(seed, epoch)``, and each sample's augmentation is a function of
uniforms keyed by ``(seed + 1, epoch, index)`` (:func:`msn.data.view_params.view_uniforms`),
with every ``data.augment`` (docs/method.md Sec. 1; per image, never
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
        transform: a :class:`~msn.data.transforms.MultiViewTransform`, given the uniforms of
            the item's key (:func:`~msn.data.view_params.view_uniforms` of ``seed + 1``), or
            ``None`` to pass the uint8 image on (``views = [image]``) for
            :class:`msn.data.batch_augment.BatchMultiView`.
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
        if self.transform is None:
            return [image], label, key, replaced
        uniforms = view_uniforms([key], self.seed + 1, self.transform.num_views)[0]
        return self.transform(image, uniforms), label, key, replaced

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
    :func:`augment_on_device` runs it on the training device.
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
        """The batch on ``device``, tensors moved and nothing else (a ``pending`` augmentation
        stays pending: :func:`augment_on_device` runs it); the images (not the labels) also in
        ``dtype`` if given, which a batch of uint8 pixels still to augment refuses."""
        if dtype is not None and self.pending is not None:
            raise ValueError("MultiViewBatch.to: the images are uint8 pixels still to augment; "
                             "call msn.data.augment_on_device(batch, device, dtype)")
        images = [tensor.to(device, non_blocking=True) for tensor in (self.target, self.anchor, self.focal)]
        target, anchor, focal = (tensor.to(dtype) if dtype is not None else tensor for tensor in images)
        return MultiViewBatch(target, anchor, focal, self.labels.to(device, non_blocking=True), self.skipped,
                              self.pending, self.rows)

    @property
    def size(self) -> int:
        return self.target.shape[0]


def augment_on_device(batch: MultiViewBatch, device: torch.device, dtype: torch.dtype | None = None) -> MultiViewBatch:
    """``batch`` on ``device``, ready for the model: its ``pending`` augmentation
    (``data.augment=device``; docs/method.md Sec. 1) run there, the images in ``dtype`` if
    given. The train step calls it on every batch; a batch without ``pending`` is only moved."""
    moved = batch.to(device)
    views = (moved.target, moved.anchor, moved.focal)
    if moved.pending is not None:
        views = moved.pending.apply(*views)
    target, anchor, focal = (view.to(dtype) if dtype is not None else view for view in views)
    return MultiViewBatch(target, anchor, focal, moved.labels, moved.skipped, rows=moved.rows)


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
    good = [sample for sample in samples if not isinstance(sample, Unreadable)]
    if not good:
        raise BadImageError(f"every image of a batch of {len(samples)} was unreadable, {samples[0].source} first; "
                            f"data.on_bad_image=skip needs one readable image per batch")
    views = [sample[0] for sample in good]
    labels = torch.tensor([sample[1] for sample in good])
    dropped = len(samples) - len(good)
    skipped = dropped + sum(bool(sample[3]) for sample in good if len(sample) > 3)  # replaced ones count too
    rows = (torch.tensor([row for row, sample in enumerate(samples) if not isinstance(sample, Unreadable)])
            if dropped else None)
    keys = [sample[2] for sample in good]
    if batch_views is not None:
        images = torch.stack([image_views[0] for image_views in views])
        plan = batch_views.sample(view_uniforms(keys, seed + 1, batch_views.num_views), *images.shape[-2:])
        if defer:
            empty = images.new_zeros(0)
            return MultiViewBatch(images, empty, empty, labels, skipped, DeferredViews(batch_views, plan), rows)
        return MultiViewBatch(*batch_views.render(images, plan), labels, skipped, rows=rows)
    num_focal = len(views[0]) - 2
    target = torch.stack([image_views[0] for image_views in views])
    anchor = torch.stack([image_views[1] for image_views in views])
    if num_focal:
        focal = torch.stack([image_views[2 + view] for view in range(num_focal) for image_views in views])
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
