"""The benchmarks' baseline (benchmarks/reference_recipe.py ``AuthorsStep``), a reconstruction of
the authors' step, is our step computed their way: checked here with the mask the paper uses for
ViT-S (ratio 0.15, one subset shared by the batch), the masked path the benchmark times it on.

The kept tokens. ``AuthorsStep`` inherits our :class:`msn.masking.AnchorMasks` (with ``shared``
forced on), so with ``mask.shared=true`` both steps keep the same subset by construction, and the
test checks that both encoders receive the same keep indices. The authors' own code
(``src/deit.py`` of facebookresearch/msn) draws ``1 + torch.randperm(N)[:K]`` from the global
torch generator at each anchor forward and keeps the tokens in that random order; ours seeds a
generator with (seed, step) and sorts the positions. Which subset a step keeps can therefore not
be equal to theirs; what must be equal, and is tested, is (1) the update given the same subset
and (2) the update whatever the order of the kept tokens (the blocks are permutation-equivariant
over tokens once the position embedding is added, and only the CLS token is read).
"""

from __future__ import annotations

import torch

from reference_recipe import AuthorsStep, FullBlocksForward  # benchmarks/ is on pytest's path (pyproject.toml)
from train_harness import runner as bench

#: Tolerance of every float64 comparison. Both steps compute the same real numbers in another
#: order (eager attention against SDPA, the full last block against the CLS-only one, the EMA as
#: mul_/add_ against one lerp, AdamW's default kernel against the fused one), so they differ by
#: float64 rounding only: ~1e-16 relative per operation, ~1e-14 absolute on a gradient of this
#: small model after its few hundred accumulated operations. Adam's first update of an element,
#: lr * g / (|g| + eps), changes by at most lr / eps = 2e-4 / 1e-8 = 2e4 times a change of g
#: (the worst case: a gradient element near 0), so rounding reaches ~2e-10; measured: 3.5e-12.
#: A real difference is far larger: one update moves a weight by ~lr = 2e-4 and the target by
#: (1 - 0.996) * 2e-4 = 8e-7, and another kept subset moves some weight by ~5e-4 (asserted
#: > 1e-6 below). 1e-9 lies between the two with margin on both sides.
ATOL = 1e-9


def _pair():
    """Our step (shared mask, 0.15) and the authors' on the same weights and batch, in float64,
    each recording the keep indices its encoder received and its loss output."""
    cfg = bench.bench_config("fmnist_demo", 4, ratio=0.15, precision="fp64", mask={"shared": True})
    ours, authors = bench.StepRunner(cfg), bench.StepRunner(cfg, authors=True)
    assert isinstance(authors.step_fn, AuthorsStep) and isinstance(authors.step_fn.online, FullBlocksForward)
    assert authors.step_fn.cfg.mask == ours.step_fn.cfg.mask  # shared, 0.15 (AuthorsStep forces shared)
    for name in ("network", "target", "prototypes"):
        getattr(authors.step_fn, name).load_state_dict(getattr(ours.step_fn, name).state_dict())
    authors.batch = ours.batch
    for runner in (ours, authors):
        _record(runner.step_fn)
    return ours, authors


def _record(step_fn) -> None:
    """Keep, on the step object, the keep indices its online forward received and the loss output."""
    update = step_fn.update
    step_fn.kept, step_fn.outputs = [], []
    step_fn.online.register_forward_pre_hook(lambda module, args: step_fn.kept.append(args[1]))

    def recorded_update(out, step):
        step_fn.outputs.append(out)
        return update(out, step)

    step_fn.update = recorded_update


def _assert_same_update(ours, authors) -> None:
    a, b = ours.step_fn, authors.step_fn
    for name in ("network", "target"):
        mine, theirs = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert mine.keys() == theirs.keys()
        for key in mine:  # parameters and buffers (the head's batch-norm statistics)
            assert mine[key].dtype in (torch.float64, torch.int64), key
            where = f"{name}.{key}"
            torch.testing.assert_close(mine[key], theirs[key], rtol=0, atol=ATOL, msg=lambda m, k=where: f"{k}: {m}")
    torch.testing.assert_close(a.prototypes.weight, b.prototypes.weight, rtol=0, atol=ATOL)
    out, other = a.outputs[-1], b.outputs[-1]
    for field in ("loss", "ce", "memax", "targets"):  # the targets: the sharpened target-view assignments
        torch.testing.assert_close(getattr(out, field), getattr(other, field), rtol=0, atol=ATOL, msg=field)


def test_authors_step_with_the_shared_015_mask_is_our_step_in_float64():
    ours, authors = _pair()
    before = {key: value.clone() for key, value in ours.step_fn.network.state_dict().items()}
    ours()
    authors()
    keep, their_keep = ours.step_fn.kept[0], authors.step_fn.kept[0]
    # the masked path ran in both: 1 + floor(49 * 0.85) = 42 tokens, CLS first, one subset for the batch
    assert keep.shape == (4, 42) and (keep[:, 0] == 0).all() and (keep == keep[0]).all()
    assert torch.equal(keep, their_keep)  # the same subset: both draw it from AnchorMasks(seed, step)
    assert len(authors.step_fn.grad_norms) > 10  # the authors' per-step gradient norms were read
    _assert_same_update(ours, authors)
    moved = sum(int((value - before[key]).abs().max() > 1e-6)
                for key, value in ours.step_fn.network.state_dict().items() if value.is_floating_point())
    assert moved > 10  # the update really moved the weights (a no-op would compare equal)


def test_the_order_of_the_kept_tokens_does_not_change_the_authors_step():
    """The authors keep ``1 + randperm(N)[:K]`` in its random order; ours sorts the subset.
    Shuffling the authors' kept tokens (the same subset, CLS first) leaves the update unchanged,
    while another subset changes it by far more than :data:`ATOL`."""
    ours, authors = _pair()
    elsewhere = bench.StepRunner(ours.step_fn.cfg)  # our step, given the next step's subset
    for name in ("network", "target", "prototypes"):
        getattr(elsewhere.step_fn, name).load_state_dict(getattr(ours.step_fn, name).state_dict())
    elsewhere.batch = ours.batch
    draw, next_draw = authors.step_fn.masks, elsewhere.step_fn.masks
    order = torch.randperm(41, generator=torch.Generator().manual_seed(1)) + 1

    def shuffled(step, batch_size, device=None, rows=None):
        keep = draw(step, batch_size, device, rows)
        return torch.cat([keep[:, :1], keep[:, order]], dim=1)

    authors.step_fn.masks = shuffled
    elsewhere.step_fn.masks = lambda step, batch_size, device=None, rows=None: next_draw(step + 1, batch_size, device, rows)
    for runner in (ours, authors, elsewhere):
        runner()
    kept = ours.step_fn.kept[0]
    assert not torch.equal(authors.step_fn.kept[0], kept)  # the same set in another order
    assert torch.equal(authors.step_fn.kept[0].sort(dim=1).values, kept)
    _assert_same_update(ours, authors)
    assert not torch.equal(elsewhere.step_fn.masks(0, 4), kept)
    differs = max((p - q).abs().max().item() for p, q in zip(ours.step_fn.network.parameters(),
                                                             elsewhere.step_fn.network.parameters()))
    assert differs > 1e-6, differs  # a mask difference is visible far above ATOL
