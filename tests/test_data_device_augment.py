"""``data.augment=device``: the loader draws every parameter and ships uint8 pixels; the
batched work runs where the batch is moved. On the CPU that is the very same computation as
``data.augment=batched``, so the batches (and a whole training run) must agree to the bit."""

import pytest
import torch

from msn.config import ViewsConfig
from msn.data import ResumableSampler, SyntheticImages, augment_on_device, build_multiview_data, build_train_loader
from msn.data.batch_augment import BatchPhotometric

from conftest import assert_same_state, jpeg_folder

VIEWS = {"rand_size": 32, "focal_size": 16, "num_focal": 3}


def _batches(dataset, data_cfg, workers=0):
    data, collate = build_multiview_data(dataset, data_cfg, seed=3)
    loader = build_train_loader(data, ResumableSampler(len(dataset), 4, seed=3), workers, collate=collate)
    return list(loader)


@pytest.mark.parametrize("kind", ["fixed size (crops on the device too)", "varying size (photometric on the device)"])
def test_device_batches_equal_batched_ones_bitwise(kind, tmp_path, tiny_config):
    data_cfg = tiny_config(data={"views": VIEWS}).data
    dataset = SyntheticImages(12, 4, 40) if kind.startswith("fixed") else jpeg_folder(tmp_path)
    batched = _batches(dataset, data_cfg)
    data_cfg.augment = "device"
    deferred = _batches(dataset, data_cfg, workers=2)  # parameters drawn in worker processes
    assert len(batched) == len(deferred) == 3
    for ready, pending in zip(batched, deferred):
        assert pending.pending is not None and pending.target.dtype == torch.uint8  # no float work on the host
        moved = augment_on_device(pending, torch.device("cpu"))
        assert moved.pending is None and ready.pending is None
        for a, b in ((ready.target, moved.target), (ready.anchor, moved.anchor), (ready.focal, moved.focal)):
            assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
            assert torch.equal(a, b)
        assert torch.equal(ready.labels, moved.labels)
    assert deferred[0].focal.shape[0] == (0 if kind.startswith("fixed") else 3 * 4)


def test_training_with_device_augmentation_equals_batched_bitwise(tiny_config, tmp_path):
    from msn.train import Trainer

    states = []
    for augment in ("batched", "device"):
        trainer = Trainer(tiny_config(tmp_path / augment, data={"augment": augment}, train={"max_steps": 3}))
        trainer.fit()
        states.append(trainer.state_dict())
    for state in states:
        state["config"] = None  # the augment key itself differs
    assert assert_same_state(*states) > 50


def test_mask_selection_equals_index_selection():
    """The GPU's synchronisation-free selection (every op on every image, ``torch.where``)
    gives the index path's values: the same per-image arithmetic, so only the kernels' float
    rounding can differ (a few ulps per op; 1e-5 as in tests/test_data_batch_augment.py)."""
    cfg = ViewsConfig()
    photometric = BatchPhotometric(cfg, 24)
    images = (torch.rand(64, 3, 24, 24, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    params = photometric.sample(64, torch.Generator().manual_seed(2))
    assert 0 < params.jitter.sum() < 64 and 0 < params.gray.sum() < 64 and 0 < params.blur.sum() < 64
    by_index = photometric.apply(images, params, select="index")
    by_mask = photometric.apply(images, params, select="mask")
    torch.testing.assert_close(by_mask, by_index, rtol=0, atol=1e-5)
    # not vacuous: the rows that drew an operation moved, the others are only normalised
    from dataclasses import replace

    off = torch.zeros(64, dtype=torch.bool)
    normalised = photometric.apply(images, replace(params, jitter=off, gray=off, blur=off), select="mask")
    drew = params.jitter | params.gray | params.blur
    moved = (by_mask - normalised).abs().amax(dim=(1, 2, 3)) > 1e-3
    assert torch.equal(moved, drew)


def test_to_only_moves_and_the_step_augments(tiny_config, tmp_path):
    """``MultiViewBatch.to`` moves tensors and nothing else: a ``data.augment=device`` batch
    stays uint8 with its ``pending`` work (and refuses a float ``dtype``);
    :func:`msn.data.augment_on_device`, which the train step calls, runs it."""
    data_cfg = tiny_config(data={"views": VIEWS, "augment": "device"}).data
    batch = _batches(SyntheticImages(12, 4, 40), data_cfg)[0]
    moved = batch.to(torch.device("cpu"))
    assert moved.pending is batch.pending and moved.target.dtype == torch.uint8
    assert torch.equal(moved.target, batch.target) and moved.anchor.numel() == 0
    with pytest.raises(ValueError, match="augment_on_device"):
        batch.to(torch.device("cpu"), torch.float64)
    ready = augment_on_device(batch, torch.device("cpu"), torch.float64)
    assert ready.pending is None and ready.target.dtype == ready.focal.dtype == torch.float64
    assert ready.anchor.shape == (4, 3, 32, 32) and ready.labels.dtype == torch.long
