"""The data of a step do not depend on how many ranks share the global batch.

Each rank's loader is built without processes, as the trainer builds it
(:func:`msn.data.build_multiview_data`, a :class:`msn.data.ResumableSampler` for ``rank`` of
``world_size``, :func:`msn.data.build_train_loader`). The local batches of ranks 0..N-1 put
side by side (row-wise; the focal views are view-major, so view by view) must equal, to the
bit, the one process's batch, for N = 1, 2 and 3 and every ``data.augment``: every crop box,
flip and photometric parameter of an image is drawn from a source keyed by
``(seed, epoch, index)``, never by the local batch. The same holds for the rows that remain
when bad images are dropped, and for the anchor masks (:class:`msn.masking.AnchorMasks`).
"""

from __future__ import annotations

import pytest
import torch

from msn.data import (
    ResumableSampler,
    SyntheticImages,
    augment_on_device,
    build_multiview_data,
    build_train_loader,
    start_epoch,
)
from msn.masking import AnchorMasks

from conftest import jpeg_folder

SEED = 5
GLOBAL_BATCH = 12  # divisible by 1, 2 and 3
VIEWS = {"rand_size": 24, "focal_size": 16, "num_focal": 3}
NUM_FOCAL = VIEWS["num_focal"]
NUM_PATCHES = 9  # of a 24 px anchor at patch 8
#: (augment, data set): the fixed-size data set takes BatchMultiView (every view of the batch
#: at once), the JPEG folder of several sizes the per-image crops + batched photometric path
CASES = [("batched", "fixed"), ("batched", "varying"), ("device", "fixed"), ("device", "varying"),
         ("per_sample", "fixed"), ("per_sample", "varying")]


def _dataset(kind: str, root):
    # one global batch per epoch (per_sample's torchvision pipeline costs ~10 ms an image)
    return SyntheticImages(GLOBAL_BATCH, 4, 28) if kind == "fixed" else jpeg_folder(root, GLOBAL_BATCH, (28, 32))


def _rank_batches(dataset, data_cfg, rank: int, world: int, epochs=(0, 1)) -> list:
    """Every batch of ``epochs`` of one rank, moved to the CPU (where ``device`` augments)."""
    data, collate = build_multiview_data(dataset, data_cfg, seed=SEED)
    sampler = ResumableSampler(len(dataset), GLOBAL_BATCH, SEED, rank, world)
    loader = build_train_loader(data, sampler, 0, collate=collate)
    batches = []
    for epoch in epochs:
        for batch in start_epoch(loader, epoch):
            if data_cfg.augment == "device":
                assert batch.pending is not None and batch.target.dtype == torch.uint8
            batches.append(augment_on_device(batch, torch.device("cpu")))
    return batches


def _join(parts: list) -> dict:
    """The local batches of the ranks of one step, put together as one global batch, with the
    anchor masks each rank draws for its batch (per image, ratio 0.5, step 0)."""
    world = len(parts)
    focal = [p.focal.view(NUM_FOCAL, p.size, *p.focal.shape[1:]) for p in parts]
    masks = [AnchorMasks(NUM_PATCHES, 0.5, False, SEED, GLOBAL_BATCH, rank, world)(0, p.size, rows=p.rows)
             for rank, p in enumerate(parts)]
    return {"target": torch.cat([p.target for p in parts]), "anchor": torch.cat([p.anchor for p in parts]),
            "focal": torch.cat(focal, dim=1).flatten(0, 1), "labels": torch.cat([p.labels for p in parts]),
            "masks": torch.cat(masks), "skipped": sum(p.skipped for p in parts)}


def _global_batches(dataset, data_cfg, world: int, epochs=(0, 1)) -> list[dict]:
    per_rank = [_rank_batches(dataset, data_cfg, rank, world, epochs) for rank in range(world)]
    assert len({len(b) for b in per_rank}) == 1
    return [_join(list(parts)) for parts in zip(*per_rank)]


def _assert_bitwise_equal(a: dict, b: dict, where: str) -> None:
    for name in ("target", "anchor", "focal", "labels", "masks"):
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, f"{where} {name}: dtype/shape"
        assert torch.equal(a[name], b[name]), f"{where} {name}: differs"


@pytest.mark.parametrize("augment, kind", CASES, ids=[f"{a}-{k}" for a, k in CASES])
def test_global_batch_is_the_same_bits_on_1_2_and_3_ranks(augment, kind, tiny_config, tmp_path):
    data_cfg = tiny_config(data={"views": VIEWS, "augment": augment}).data
    dataset = _dataset(kind, tmp_path)
    one = _global_batches(dataset, data_cfg, 1)
    assert len(one) == 2 and one[0]["target"].shape == (GLOBAL_BATCH, 3, 24, 24)
    assert one[0]["focal"].shape == (NUM_FOCAL * GLOBAL_BATCH, 3, 16, 16)
    assert one[0]["target"].dtype == torch.float32
    # not vacuous: views differ between images, between the two epochs, and target from anchor
    assert not torch.equal(one[0]["target"], one[1]["target"])
    assert not torch.equal(one[0]["target"], one[0]["anchor"])
    for world in (2, 3):
        for step, (a, b) in enumerate(zip(one, _global_batches(dataset, data_cfg, world))):
            _assert_bitwise_equal(a, b, f"{world} ranks, step {step}:")


class _WithBadImages(torch.utils.data.Dataset):
    """``base`` with the images of ``bad`` unreadable (``(None, label)``, as a broken file reads)."""

    def __init__(self, base, bad):
        self.base, self.bad = base, set(bad)
        self.image_size = getattr(base, "image_size", None)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        image, label = self.base[index]
        return (None if index in self.bad else image), label


@pytest.mark.parametrize("augment, kind", CASES, ids=[f"{a}-{k}" for a, k in CASES])
def test_bad_images_are_replaced_and_change_no_other_row(augment, kind, tiny_config, tmp_path):
    """An unreadable image is replaced by another image of the data set, drawn from its own
    ``(seed, epoch, index)`` and augmented with its own key: the batch keeps its size (so a
    compiled step keeps its graphs and every rank its share), every other row's views, label
    and anchor mask stay as they were, and the replaced rows are the same bits on 1, 2 and 3
    ranks; both are counted as skipped."""
    data_cfg = tiny_config(data={"views": VIEWS, "augment": augment}).data
    dataset = _dataset(kind, tmp_path)
    clean = _global_batches(dataset, data_cfg, 1, epochs=(0,))[0]
    sampler = ResumableSampler(len(dataset), GLOBAL_BATCH, SEED)
    order = [index for _, index in sampler]  # epoch 0, one process: the global rows in order
    bad_rows = (0, 5)  # the first image of the global batch (and of every rank's share) and another
    bad = _WithBadImages(dataset, [order[row] for row in bad_rows])
    kept = torch.tensor([row for row in range(GLOBAL_BATCH) if row not in bad_rows])

    def rows_of(batch, chosen):
        focal = batch["focal"].view(NUM_FOCAL, GLOBAL_BATCH, 3, 16, 16)[:, chosen].flatten(0, 1)
        return {"target": batch["target"][chosen], "anchor": batch["anchor"][chosen], "focal": focal,
                "labels": batch["labels"][chosen], "masks": batch["masks"][chosen]}

    dirty = {world: _global_batches(bad, data_cfg, world, epochs=(0,))[0] for world in (1, 2, 3)}
    for world, batch in dirty.items():
        assert batch["skipped"] == len(bad_rows) and batch["target"].shape == clean["target"].shape
        _assert_bitwise_equal(rows_of(clean, kept), rows_of(batch, kept), f"{world} ranks, rows kept:")
        _assert_bitwise_equal(dirty[1], batch, f"{world} ranks against 1:")
    assert not torch.equal(dirty[1]["target"][0], clean["target"][0])  # row 0 now holds another image


@pytest.mark.parametrize("shared", [False, True], ids=["per-image masks", "mask.shared"])
def test_anchor_masks_are_the_same_on_1_2_and_3_ranks(shared):
    """The masks of a step are keyed by ``(seed, step)`` and the image's row in the global
    batch (rank ``r`` starts at row ``r * global_batch / world_size``, the sampler's split)."""
    num_patches, ratio = 16, 0.5
    for step in (0, 1, 7):
        one = AnchorMasks(num_patches, ratio, shared, SEED, GLOBAL_BATCH)(step, GLOBAL_BATCH)
        assert one.shape == (GLOBAL_BATCH, 1 + 8) and (one[:, 0] == 0).all()
        assert (one[:, 1:].diff(dim=1) > 0).all()  # distinct patches, in order
        assert shared == bool((one == one[0]).all())  # per-image: rows differ
        for world in (2, 3):
            local = GLOBAL_BATCH // world
            parts = [AnchorMasks(num_patches, ratio, shared, SEED, GLOBAL_BATCH, rank, world)(step, local)
                     for rank in range(world)]
            assert torch.equal(torch.cat(parts), one), (step, world)
    # a different step or seed draws other masks
    assert not torch.equal(AnchorMasks(num_patches, ratio, shared, SEED, GLOBAL_BATCH)(1, GLOBAL_BATCH),
                           AnchorMasks(num_patches, ratio, shared, SEED, GLOBAL_BATCH)(2, GLOBAL_BATCH))
