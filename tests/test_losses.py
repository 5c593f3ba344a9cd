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


# ---------------------------------------------------------------------------- PMSN: power-law prior
def _pbar_by_hand(anchor, protos, tau):
    p = [_predict(a, protos, tau) for a in anchor]
    return [sum(pi[k] for pi in p) / len(p) for k in range(len(protos))]


def test_power_law_prior_by_hand():
    """exponent 1, K = 4: weights 1, 1/2, 1/3, 1/4 sum to 25/12, so pi = (12, 6, 4, 3) / 25."""
    from msn.losses import power_law_log_prior

    pi = power_law_log_prior(4, 1.0).exp()
    torch.testing.assert_close(pi, torch.tensor([0.48, 0.24, 0.16, 0.12], dtype=torch.float64), rtol=1e-15, atol=1e-15)
    assert power_law_log_prior(1024, 0.25).exp().sum().item() == pytest.approx(1.0, rel=1e-14)
    assert (power_law_log_prior(1024, 0.25).diff() < 0).all()  # fixed index order: prototype 0 is the most likely


def test_power_law_regulariser_by_hand_on_a_known_mean_prediction():
    """pbar = (0.4, 0.3, 0.2, 0.1) against pi = (0.48, 0.24, 0.16, 0.12) (exponent 1):
    KL(pbar || pi) = 0.4 ln(5/6) + 0.3 ln(5/4) + 0.2 ln(5/4) + 0.1 ln(5/6)
                   = 0.5 ln(5/6) + 0.5 ln(5/4) = 0.5 ln(25/24)."""
    from msn.losses import prior_regulariser

    pbar = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    assert prior_regulariser(pbar, "power_law", 1.0).item() == pytest.approx(0.5 * math.log(25 / 24), rel=1e-13)
    # K = 3, exponent 0.5: pi_k = k^-0.5 / (1 + 2^-0.5 + 3^-0.5); at pbar = pi the KL is 0
    z = 1 + 2 ** -0.5 + 3 ** -0.5
    pi3 = torch.tensor([1 / z, 2 ** -0.5 / z, 3 ** -0.5 / z], dtype=torch.float64)
    assert abs(prior_regulariser(pi3, "power_law", 0.5).item()) < 1e-15
    # the uniform ME-MAX of the same pbar: sum pbar ln pbar + ln 4
    memax = sum(x * math.log(x) for x in (0.4, 0.3, 0.2, 0.1)) + math.log(4)
    assert prior_regulariser(pbar, "uniform").item() == pytest.approx(memax, rel=1e-13)


@pytest.mark.parametrize("exponent", [0.25, 1.0])
def test_power_law_loss_terms_equal_hand_computed_float64(exponent):
    tau, T, lam = 0.1, 0.25, 1.7
    ce, _, ent, _, _ = _loss_by_hand(ANCHOR, TARGET, PROTOS, tau, T, True, 3, lam, 0.0)
    pbar = _pbar_by_hand(ANCHOR, PROTOS, tau)
    weights = [(k + 1) ** -exponent for k in range(len(PROTOS))]
    pi = [w / sum(weights) for w in weights]
    kl = sum(p * math.log(p / q) for p, q in zip(pbar, pi))
    out = msn_loss(
        torch.tensor(ANCHOR, dtype=torch.float64), torch.tensor(TARGET, dtype=torch.float64),
        torch.tensor(PROTOS, dtype=torch.float64), temperature=tau, sharpen_temperature=T, memax_weight=lam,
        prior="power_law", prior_exponent=exponent,
    )
    assert out.memax.item() == pytest.approx(kl, rel=1e-10, abs=1e-13)
    assert out.ce.item() == pytest.approx(ce, rel=1e-12)  # the prior only changes the regulariser
    assert out.loss.item() == pytest.approx(ce + lam * kl, rel=1e-12)


def test_power_law_with_exponent_zero_is_memax():
    """pi uniform: KL(pbar || 1/K) = sum pbar ln pbar + ln K, the ME-MAX term with its constant."""
    g = torch.Generator().manual_seed(2)
    anchor, target, protos = (torch.randn(n, 6, generator=g, dtype=torch.float64) for n in (15, 5, 7))
    uniform = msn_loss(anchor, target, protos, prior="uniform")
    flat = msn_loss(anchor, target, protos, prior="power_law", prior_exponent=0.0)
    torch.testing.assert_close(flat.memax, uniform.memax, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(flat.loss, uniform.loss, rtol=1e-12, atol=1e-14)
    probs = torch.softmax(F.normalize(anchor, dim=1) @ F.normalize(protos, dim=1).T / 0.1, dim=1)
    pbar = probs.mean(0)
    neg_entropy = (pbar * pbar.log()).sum()
    assert flat.memax.item() - neg_entropy.item() == pytest.approx(math.log(7), rel=1e-12)


def test_default_is_todays_memax_bitwise():
    g = torch.Generator().manual_seed(4)
    anchor, target, protos = torch.randn(12, 16, generator=g), torch.randn(4, 16, generator=g), torch.randn(8, 16, generator=g)
    default, uniform = msn_loss(anchor, target, protos), msn_loss(anchor, target, protos, prior="uniform")
    probs = F.log_softmax(F.normalize(anchor, dim=1) @ F.normalize(protos, dim=1).T / 0.1, dim=1).exp()
    pbar = probs.mean(dim=0)
    assert torch.equal(default.memax, uniform.memax)
    assert torch.equal(default.memax, torch.sum(pbar * torch.log(pbar)) + math.log(8))


def test_power_law_gradcheck_float64():
    g = torch.Generator().manual_seed(5)
    anchor = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    protos = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 4, generator=g, dtype=torch.float64)

    def regulariser(a, p):
        return msn_loss(a, target, p, prior="power_law", prior_exponent=0.25).memax

    assert torch.autograd.gradcheck(regulariser, (anchor, protos))
    # the whole loss in the anchor (the targets depend on the prototypes without gradient, so
    # a finite difference in the prototypes would move them: not a gradient check there)
    assert torch.autograd.gradcheck(lambda a: msn_loss(a, target, protos.detach(), prior="power_law").loss, (anchor,))


def test_unknown_prior_raises():
    with pytest.raises(ValueError, match="prior"):
        msn_loss(torch.randn(4, 3), torch.randn(2, 3), torch.randn(5, 3), prior="zipf")


def test_training_step_passes_the_prior_to_the_loss(tiny_config, monkeypatch):
    import msn.train.step
    from msn.train import Trainer

    seen = []

    def spy(*args, **kwargs):
        seen.append((kwargs["prior"], kwargs["prior_exponent"]))
        return msn_loss(*args, **kwargs)

    monkeypatch.setattr(msn.train.step, "msn_loss", spy)
    trainer = Trainer(tiny_config(loss={"prior": "power_law", "prior_exponent": 0.5}))
    trainer.sampler.set_position(0, 0)
    stats = trainer.train_step(next(iter(trainer.loader)))
    assert seen == [("power_law", 0.5)] and torch.isfinite(stats).all()
