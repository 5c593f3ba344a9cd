"""msn.losses against formulas written out by hand in float64 (docs/method.md Sec. 5)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from msn.losses import msn_loss, sharpen, sinkhorn


def _norm(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def _softmax(logits):
    m = max(logits)
    e = [math.exp(x - m) for x in logits]
    s = sum(e)
    return [x / s for x in e]


def _predict(z, protos, tau):
    z = _norm(z)
    return _softmax([sum(a * b for a, b in zip(z, _norm(p))) / tau for p in protos])


def _sinkhorn_by_hand(t, iters):
    """Reference doc Sec. 5 step 3, written with python lists. t: B rows of K."""
    B, K = len(t), len(t[0])
    q = [[t[b][k] for b in range(B)] for k in range(K)]  # [K][B]
    total = sum(map(sum, q))
    q = [[x / total for x in row] for row in q]
    for _ in range(iters):
        q = [[x / sum(row) / K for x in row] for row in q]
        col = [sum(q[k][b] for k in range(K)) for b in range(B)]
        q = [[q[k][b] / col[b] / B for b in range(B)] for k in range(K)]
    return [[q[k][b] * B for k in range(K)] for b in range(B)]


def _loss_by_hand(anchor, target, protos, tau, T, use_sinkhorn, iters, lam, lam_ent):
    B = len(target)
    V = len(anchor) // B
    p = [_predict(a, protos, tau) for a in anchor]
    t = []
    for z in target:
        sharp = [x ** (1 / T) for x in _predict(z, protos, tau)]
        t.append([x / sum(sharp) for x in sharp])
    if use_sinkhorn:
        t = _sinkhorn_by_hand(t, iters)
    t_rep = [t[i % B] for i in range(V * B)]  # view-major pairing
    ce = sum(sum(-tk * math.log(pk) for tk, pk in zip(ti, pi)) for ti, pi in zip(t_rep, p)) / len(p)
    K = len(protos)
    pbar = [sum(pi[k] for pi in p) / len(p) for k in range(K)]
    memax = sum(x * math.log(x) for x in pbar) + math.log(K)
    ent = sum(sum(-x * math.log(x) for x in pi) for pi in p) / len(p)
    return ce, memax, ent, ce + lam * memax + lam_ent * ent, t_rep


ANCHOR = [[0.3, -1.2, 0.5], [1.0, 0.2, -0.4], [-0.7, 0.9, 0.1], [0.25, 0.6, 1.3], [2.0, -0.3, 0.0], [-0.1, -0.8, 0.9]]
TARGET = [[0.9, 0.1, -0.2], [-0.4, 1.1, 0.6]]
PROTOS = [[1.0, 0.0, 0.2], [0.0, 1.0, -0.5], [-0.3, 0.4, 1.0], [0.6, -0.6, 0.3]]


@pytest.mark.parametrize("use_sinkhorn", [True, False])
@pytest.mark.parametrize("entropy_weight", [0.0, 0.3])
def test_loss_terms_equal_hand_computed_float64(use_sinkhorn, entropy_weight):
    tau, T, lam = 0.1, 0.25, 1.7
    ce, memax, ent, total, targets = _loss_by_hand(ANCHOR, TARGET, PROTOS, tau, T, use_sinkhorn, 3, lam, entropy_weight)
    out = msn_loss(
        torch.tensor(ANCHOR, dtype=torch.float64), torch.tensor(TARGET, dtype=torch.float64),
        torch.tensor(PROTOS, dtype=torch.float64), temperature=tau, sharpen_temperature=T,
        use_sinkhorn=use_sinkhorn, sinkhorn_iters=3, memax_weight=lam, entropy_weight=entropy_weight,
    )
    assert out.loss.dtype == torch.float64
    assert out.ce.item() == pytest.approx(ce, rel=1e-12, abs=1e-12)
    assert out.memax.item() == pytest.approx(memax, rel=1e-10, abs=1e-13)
    assert out.entropy.item() == pytest.approx(ent, rel=1e-12)
    assert out.loss.item() == pytest.approx(total, rel=1e-12)
    torch.testing.assert_close(out.targets, torch.tensor(targets, dtype=torch.float64), rtol=1e-12, atol=1e-14)
    assert out.targets.shape == (6, 4)
    best = [max(range(4), key=lambda k: row[k]) for row in targets[:2]]
    assert out.num_targets_used.item() == len(set(best))
    assert out.max_target.item() == pytest.approx(sum(max(r) for r in targets[:2]) / 2, rel=1e-12)
    assert out.min_target.item() == pytest.approx(sum(min(r) for r in targets[:2]) / 2, rel=1e-12)  # reference min_t
    assert out.min_max_target.item() == pytest.approx(min(max(r) for r in targets[:2]), rel=1e-12)


def test_targets_pair_with_views_view_major():
    """Row i of the anchor batch is paired with target i % B (not i // V)."""
    out = msn_loss(torch.randn(3 * 4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64),
                   torch.randn(7, 5, dtype=torch.float64), use_sinkhorn=False)
    for view in range(3):
        torch.testing.assert_close(out.targets[view * 4:(view + 1) * 4], out.targets[:4])
    assert not torch.allclose(out.targets[0], out.targets[1])


def test_sinkhorn_marginals():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(16, 32, dtype=torch.float64) * 3, dim=1)
    balanced = sinkhorn(probs, num_iters=50)
    torch.testing.assert_close(balanced.sum(dim=1), torch.ones(16, dtype=torch.float64))
    # after many rounds every prototype receives B/K of the mass
    torch.testing.assert_close(balanced.sum(dim=0), torch.full((32,), 16 / 32, dtype=torch.float64), rtol=1e-6, atol=1e-8)
    three = sinkhorn(probs, num_iters=3)
    torch.testing.assert_close(three.sum(dim=1), torch.ones(16, dtype=torch.float64))  # last step is the column one
    assert (three >= 0).all()


def test_sharpen_is_power_normalised():
    p = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    expected = torch.tensor([0.5**4, 0.3**4, 0.2**4], dtype=torch.float64)
    torch.testing.assert_close(sharpen(p, 0.25)[0], expected / expected.sum())


def test_memax_gradient_matches_autograd_of_closed_form():
    torch.manual_seed(1)
    anchor = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    protos = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 5, dtype=torch.float64)
    out = msn_loss(anchor, target, protos, memax_weight=1.0)
    grad_anchor, grad_protos = torch.autograd.grad(out.memax, (anchor, protos))

    a2 = anchor.detach().clone().requires_grad_(True)
    p2 = protos.detach().clone().requires_grad_(True)
    probs = torch.softmax(F.normalize(a2, dim=1) @ F.normalize(p2, dim=1).T / 0.1, dim=1)
    pbar = probs.mean(0)
    closed = (pbar * pbar.log()).sum() + math.log(9)
    g_a, g_p = torch.autograd.grad(closed, (a2, p2))
    torch.testing.assert_close(grad_anchor, g_a, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_protos, g_p, rtol=1e-10, atol=1e-12)
    assert closed.item() == pytest.approx(out.memax.item(), rel=1e-12)


def test_prototypes_receive_gradient_but_targets_do_not():
    anchor = torch.randn(4, 3, requires_grad=True)
    target = torch.randn(2, 3, requires_grad=True)
    protos = torch.randn(5, 3, requires_grad=True)
    msn_loss(anchor, target, protos).loss.backward()
    assert protos.grad is not None and protos.grad.abs().sum() > 0
    assert anchor.grad is not None and anchor.grad.abs().sum() > 0
    assert target.grad is None


def test_low_precision_inputs_are_computed_in_fp32():
    out = msn_loss(torch.randn(4, 3).bfloat16(), torch.randn(2, 3).bfloat16(), torch.randn(5, 3))
    assert out.loss.dtype == torch.float32 and out.targets.dtype == torch.float32


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="multiple"):
        msn_loss(torch.randn(5, 3), torch.randn(2, 3), torch.randn(4, 3))


def test_loss_is_computed_in_fp32_under_autocast_and_from_bf16_inputs():
    """The reference computes the loss in fp32; so do we, even inside a bf16 autocast region
    (whose matmuls would otherwise run in bf16) and from bf16 projections."""
    g = torch.Generator().manual_seed(0)
    anchor, target, protos = torch.randn(12, 16, generator=g), torch.randn(4, 16, generator=g), torch.randn(8, 16, generator=g)
    outside = msn_loss(anchor, target, protos)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = msn_loss(anchor, target, protos)
    assert inside.loss.dtype == inside.targets.dtype == torch.float32
    for name in ("loss", "ce", "memax", "entropy", "targets", "max_target", "min_target"):
        assert torch.equal(getattr(inside, name), getattr(outside, name)), name
    low = anchor.bfloat16(), target.bfloat16()
    from_bf16 = msn_loss(*low, protos)
    assert from_bf16.loss.dtype == torch.float32
    assert torch.equal(from_bf16.loss, msn_loss(low[0].float(), low[1].float(), protos).loss)
