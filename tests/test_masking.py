"""msn.masking: kept-token counts, CLS kept, per-image vs shared subsets."""

import math

import pytest
import torch

from msn.masking import AnchorMasks, gather_tokens, num_kept_patches, sample_keep_indices


@pytest.mark.parametrize("n,ratio", [(196, 0.15), (196, 0.3), (196, 0.7), (49, 0.5), (49, 0.0), (1024, 0.7)])
def test_keeps_cls_and_floor_of_patches(n, ratio):
    idx = sample_keep_indices(5, n, ratio, generator=torch.Generator().manual_seed(0))
    keep = math.floor(n * (1 - ratio))
    assert idx.shape == (5, 1 + keep)
    assert (idx[:, 0] == 0).all()
    assert ((idx[:, 1:] >= 1) & (idx[:, 1:] <= n)).all()
    for row in idx:
        assert len(set(row.tolist())) == row.numel()  # no duplicates


def test_hand_counts():
    assert num_kept_patches(196, 0.15) == 166
    assert num_kept_patches(196, 0.7) == 58
    assert num_kept_patches(10, 0.25) == 7
    with pytest.raises(ValueError):
        num_kept_patches(10, 1.0)
    with pytest.raises(ValueError):
        num_kept_patches(10, -0.1)


def test_independent_per_image_unless_shared():
    g = torch.Generator().manual_seed(3)
    per_image = sample_keep_indices(8, 196, 0.5, generator=g)
    assert len({tuple(r.tolist()) for r in per_image}) == 8
    shared = sample_keep_indices(8, 196, 0.5, shared=True, generator=g)
    assert len({tuple(r.tolist()) for r in shared}) == 1


def test_seeded_draws_repeat():
    a = sample_keep_indices(4, 49, 0.3, generator=torch.Generator().manual_seed(7))
    b = sample_keep_indices(4, 49, 0.3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_gather_tokens_selects_rows():
    tokens = torch.arange(2 * 5 * 3).view(2, 5, 3)
    idx = torch.tensor([[0, 2, 4], [0, 1, 3]])
    out = gather_tokens(tokens, idx)
    assert torch.equal(out[0], tokens[0, [0, 2, 4]])
    assert torch.equal(out[1], tokens[1, [0, 1, 3]])


def test_anchor_masks_depend_on_seed_and_step_only_and_split_over_ranks():
    masks = AnchorMasks(num_patches=16, ratio=0.5, shared=False, seed=3, global_batch=8)
    a = masks(5, 8)
    assert a.shape == (8, 1 + 8) and (a[:, 0] == 0).all()
    assert torch.equal(a, AnchorMasks(16, 0.5, False, 3, 8)(5, 8))  # a fresh object: the same draw
    assert not torch.equal(a, masks(6, 8)) and not torch.equal(a, AnchorMasks(16, 0.5, False, 4, 8)(5, 8))
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    masks(7, 8)
    assert torch.equal(torch.rand(1), before)  # the global generator is untouched
    # two ranks take the halves of the one-process masks of the global batch
    halves = [AnchorMasks(16, 0.5, False, 3, 8, rank=r, world_size=2)(5, 4) for r in range(2)]
    assert torch.equal(torch.cat(halves), a)
    assert torch.equal(AnchorMasks(16, 0.5, False, 3, 8, rank=1, world_size=2)(5, 3), a[4:7])  # a short batch


def test_anchor_masks_shared_and_none():
    shared = AnchorMasks(16, 0.5, True, 0, 8, rank=1, world_size=2)(2, 4)
    assert (shared == shared[0]).all()
    assert torch.equal(shared, AnchorMasks(16, 0.5, True, 0, 8)(2, 4))  # every rank: the same subset
    assert AnchorMasks(16, 0.0, False, 0, 8)(0, 8) is None
    with pytest.raises(ValueError):
        AnchorMasks(16, 1.0, False, 0, 8)
