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


# ---------------------------------------------------------------- AnchorMasks, the path training uses
#
# The statistical tests below assume what the design promises: the masks of distinct (step, row)
# pairs come from distinct seeded generators and behave as independent draws. Each bound is
# Hoeffding's inequality, exact for any sample size (no normal approximation): the mean of T
# independent variables with values in an interval of width R is farther than e from its
# expectation with probability at most 2 exp(-2 T e^2 / R^2). Given a false-failure probability
# d split over m statistics (a union bound), the threshold is e = R sqrt(ln(2 m / d) / (2 T)).
# The draws are seeded, so each test gives the same verdict at every run; the probability is that
# of choosing a seed for which a correct implementation fails. Every test here: d < 1e-6.

FALSE_FAILURE = 1e-6


def hoeffding(draws: int, statistics: int, width: float = 1.0, failure: float = FALSE_FAILURE) -> float:
    """Largest deviation of a mean of ``draws`` independent values in an interval of ``width``
    that any of ``statistics`` such means shows with probability below ``failure`` in all."""
    return width * math.sqrt(math.log(2 * statistics / failure) / (2 * draws))


def kept_indicators(keep: torch.Tensor, num_patches: int) -> torch.Tensor:
    """[B, N] float: 1 where patch j (sequence position j + 1) is kept."""
    out = torch.zeros(keep.shape[0], num_patches)
    out.scatter_(1, keep[:, 1:] - 1, 1.0)
    return out


def draws(masks: AnchorMasks, steps: int, batch: int) -> torch.Tensor:
    """Kept indicators of ``batch`` rows at steps 0..steps-1: [steps * batch, N]."""
    return torch.cat([kept_indicators(masks(step, batch), masks.num_patches) for step in range(steps)])


@pytest.mark.parametrize("n,ratio", [(49, 0.15), (196, 0.7), (16, 0.5)])
@pytest.mark.parametrize("shared", [False, True], ids=["per_image", "shared"])
def test_anchor_masks_keep_every_patch_and_every_pair_equally_often(n, ratio, shared):
    """A uniformly random K-subset of N patches keeps each patch with probability p = K / N and
    each pair with q = K (K - 1) / (N (N - 1)). The empirical frequencies over T draws stay
    within the Hoeffding thresholds (width 1, the N patches and N (N - 1) / 2 pairs as separate
    statistics, d / 2 each): a biased or structured draw (say, a contiguous block at a random
    offset, whose single-patch frequencies are uniform) exceeds them. Per-image: 1024 steps of
    64 rows, T = 65536 (patch threshold 0.012-0.013); shared: one subset per step, T = 16384
    steps (0.024-0.026)."""
    masks = AnchorMasks(n, ratio, shared, seed=11, global_batch=64)
    kept = num_kept_patches(n, ratio)
    indicators = draws(masks, 1024, 64) if not shared else draws(masks, 16384, 1)
    T = indicators.shape[0]
    p, q = kept / n, kept * (kept - 1) / (n * (n - 1))
    patches = indicators.mean(dim=0)
    assert (patches - p).abs().max() <= hoeffding(T, n, failure=FALSE_FAILURE / 2), (patches - p).abs().max()
    pairs = (indicators.T @ indicators / T)[torch.triu_indices(n, n, offset=1).unbind()]
    assert (pairs - q).abs().max() <= hoeffding(T, n * (n - 1) // 2, failure=FALSE_FAILURE / 2)


#: (N, ratio, floor(N (1 - ratio)) worked out by hand): ViT-S/16 at 224 px (196 patches) with the
#: paper's ratios, the fmnist demo's 49 patches, and edge cases (only CLS left: 49 * 0.01 < 1).
KEPT_BY_HAND = [(196, 0.15, 166), (196, 0.3, 137), (196, 0.7, 58), (49, 0.15, 41), (49, 0.5, 24),
                (16, 0.5, 8), (1024, 0.7, 307), (10, 0.25, 7), (49, 0.99, 0)]


@pytest.mark.parametrize("n,ratio,kept", KEPT_BY_HAND)
@pytest.mark.parametrize("shared", [False, True], ids=["per_image", "shared"])
def test_anchor_masks_keep_cls_and_exactly_floor_n_times_1_minus_ratio_patches(n, ratio, kept, shared):
    masks = AnchorMasks(n, ratio, shared, seed=5, global_batch=16)
    assert masks.kept == kept
    for step in (0, 1, 999, 123_456_789):
        keep = masks(step, 16)
        assert keep.dtype == torch.long and keep.shape == (16, 1 + kept)
        assert (keep[:, 0] == 0).all()  # CLS always kept, first
        patches = keep[:, 1:]
        assert ((patches >= 1) & (patches <= n)).all()  # only patches after CLS: position 0 once
        assert (patches[:, 1:] > patches[:, :-1]).all()  # increasing: K distinct patches


def test_anchor_masks_per_image_rows_are_independent():
    """Per-image masks: the keep indicators of two images of a step are uncorrelated.

    Pairs of rows (2i, 2i + 1), i < 32, of 1024 steps: T = 32768 independent pairs. Each row
    keeps exactly K of N patches, so over the pooled (pair, patch) samples both indicators have
    mean p = K / N and variance p (1 - p) exactly, and their Pearson correlation is
    (mean overlap / N - p^2) / (p (1 - p)), the overlap |S1 & S2| of a pair lying in
    [max(0, 2K - N), K]. Independent rows: expected overlap K^2 / N, correlation 0, and
    Hoeffding (one statistic, width K - max(0, 2K - N)) bounds the correlation's deviation by
    0.018 (N = 49, K = 41) with probability 1 - 1e-6. Rows sharing their generator, or drawn
    from overlapping streams, correlate far above that."""
    n, ratio, pairs_per_step, steps = 49, 0.15, 32, 1024
    masks = AnchorMasks(n, ratio, shared=False, seed=2, global_batch=2 * pairs_per_step)
    k = masks.kept
    rows = draws(masks, steps, 2 * pairs_per_step)
    first, second = rows[0::2].flatten(), rows[1::2].flatten()
    correlation = torch.corrcoef(torch.stack([first, second]))[0, 1].item()
    p = k / n
    overlap = (rows[0::2] * rows[1::2]).sum(dim=1)
    assert ((overlap >= max(0, 2 * k - n)) & (overlap <= k)).all()
    assert correlation == pytest.approx((overlap.mean().item() / n - p * p) / (p * (1 - p)), abs=1e-4)
    bound = hoeffding(steps * pairs_per_step, 1, width=k - max(0, 2 * k - n)) / (n * p * (1 - p))
    assert bound < 0.02
    assert abs(correlation) <= bound, (correlation, bound)
    # and no two images of a batch share their mask (each coincidence has probability 1 / C(49, 41) = 2e-9)
    assert all(len({tuple(r.tolist()) for r in masks(step, 64)}) == 64 for step in range(16))


def test_anchor_masks_shared_mode_is_one_subset_for_the_batch():
    masks = AnchorMasks(49, 0.15, shared=True, seed=2, global_batch=64)
    for step in range(32):
        keep = masks(step, 64)
        assert (keep == keep[0]).all()
        assert torch.equal(keep[:8], masks(step, 8))  # the batch size does not change the subset
    assert len({tuple(masks(step, 1)[0].tolist()) for step in range(32)}) == 32  # a new subset every step


@pytest.mark.parametrize("shared", [False, True], ids=["per_image", "shared"])
def test_anchor_masks_are_a_pure_function_of_seed_and_step(shared):
    """The same (seed, step) gives the same masks whatever was drawn before, in whatever order,
    by whichever object, and whatever the global generators hold; another step or seed gives
    other masks (two independent draws of 24 of 49 patches coincide with probability
    1 / C(49, 24) ~ 1.6e-14 per row)."""
    n, ratio, batch, steps = 49, 0.5, 8, 64
    torch.manual_seed(0)
    reference = [AnchorMasks(n, ratio, shared, seed=3, global_batch=batch)(step, batch) for step in range(steps)]
    again = AnchorMasks(n, ratio, shared, seed=3, global_batch=batch)
    torch.manual_seed(12345)
    torch.rand(100)
    for step in reversed(range(steps)):  # another order, another global generator state, one object
        AnchorMasks(n, ratio, shared, seed=4, global_batch=batch)(step + 1, batch)  # draws in between
        assert torch.equal(again(step, batch), reference[step]), step
    assert torch.equal(again(17, batch), again(17, batch))
    distinct = {tuple(keep.flatten().tolist()) for keep in reference}
    assert len(distinct) == steps  # every step its own masks
    for seed in (4, 5, 2**40):
        other = AnchorMasks(n, ratio, shared, seed=seed, global_batch=batch)
        assert all(not torch.equal(other(step, batch), reference[step]) for step in range(steps))
    # row by row: no row of a step repeats in another step or seed
    rows = {tuple(row.tolist()) for keep in reference for row in keep}
    assert len(rows) == (steps if shared else steps * batch)


def test_the_kept_count_is_computed_in_floating_point_as_the_authors_do():
    """docs/training.md Key settings: ``floor(N (1 - ratio))`` in floating point: 1 - 0.9 is just under
    0.1, so 10 patches at ratio 0.9 keep none, and 20 keep one."""
    from msn.masking import num_kept_patches

    assert num_kept_patches(10, 0.9) == 0 and num_kept_patches(20, 0.9) == 1 and num_kept_patches(196, 0.15) == 166
