"""msn.models: timm ViT with token drop, position-embedding resize, head, prototypes.

Claims that are exact in maths (two orders of the same computation) are checked in float64,
where rounding (~1e-16 relative, a few hundred operations deep here) stays far below the
1e-10 tolerance on any CPU; float32 results would depend on the BLAS kernel the CPU picks.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from msn.masking import sample_keep_indices
from msn.models import ProjectionHead, Prototypes, build_vit, resize_pos_embed


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return build_vit("vit_mini", 8, 32, depth=2, embed_dim=32, num_heads=2).double().eval()


EXACT = {"rtol": 0.0, "atol": 1e-10}  # float64, see the module docstring


def randn(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def test_unmasked_forward_equals_timm_forward_features(vit):
    x = randn(3, 3, 32, 32)
    ours = vit(x)
    timm_tokens = vit.vit.forward_features(x)
    torch.testing.assert_close(ours, timm_tokens[:, 0], **EXACT)


def test_keeping_every_token_is_the_full_forward(vit):
    x = randn(2, 3, 32, 32)
    keep_all = torch.arange(17).expand(2, 17)
    torch.testing.assert_close(vit(x, keep_all), vit(x), **EXACT)


def test_token_drop_equals_running_the_kept_tokens_alone(vit):
    """Dropping = removing: equal to embedding, selecting, then running the blocks by hand."""
    x = randn(4, 3, 32, 32)
    keep = sample_keep_indices(4, 16, 0.5, generator=torch.Generator().manual_seed(1))
    tokens = vit.embed(x)
    manual = torch.stack([vit.vit.norm(vit.vit.blocks(tokens[i:i + 1, keep[i]]))[0, 0] for i in range(4)])
    torch.testing.assert_close(vit(x, keep), manual, **EXACT)
    assert not torch.allclose(vit(x, keep), vit(x), atol=1e-3)


def test_token_drop_shrinks_compute():
    model = build_vit("vit_mini", 4, 32, depth=2)
    x = torch.randn(2, 3, 32, 32)

    def flops(keep):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x, keep)
        return counter.get_total_flops()

    full = flops(None)
    masked = flops(sample_keep_indices(2, 64, 0.7))
    assert masked < 0.45 * full


def test_block_outputs_before_final_norm(vit):
    x = randn(2, 3, 32, 32)
    tokens, collected = vit.forward_blocks(x, collect_last=2)
    assert len(collected) == 2
    torch.testing.assert_close(vit.vit.norm(collected[-1]), tokens, **EXACT)


def test_pos_embed_resize_is_bicubic_without_antialias():
    pos = torch.randn(1, 1 + 14 * 14, 8)
    out = resize_pos_embed(pos, (6, 6))
    grid = pos[:, 1:].reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 36, 8)
    assert out.shape == (1, 37, 8)
    torch.testing.assert_close(out[:, 0], pos[:, 0])
    torch.testing.assert_close(out[:, 1:], expected)
    assert resize_pos_embed(pos, (14, 14)) is pos


def test_focal_size_input_uses_resized_embedding(vit):
    x = randn(2, 3, 16, 16)
    tokens = vit.embed(x)
    assert tokens.shape == (2, 5, 32)
    assert vit(x).shape == (2, 32)
    with pytest.raises(ValueError, match="divisible"):
        vit(randn(1, 3, 20, 20))


def test_reference_architecture_details():
    model = build_vit("vit_small", 16, 224)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(21.67e6, rel=2e-3)
    block = model.vit.blocks[0]
    assert block.norm1.eps == 1e-6 and block.attn.qkv.bias is not None
    assert model.vit.pos_embed.shape == (1, 197, 384)
    eager = build_vit("vit_mini", 8, 32, depth=1, attention="eager")
    assert not eager.vit.blocks[0].attn.fused_attn
    with pytest.raises(ValueError, match="unknown architecture"):
        build_vit("vit_huge", 16, 224)


def test_patch_embedding_initialised_like_the_reference():
    """Kaiming normal (fan_in, ReLU gain) with zero bias, as the reference's DeiT does for
    every Conv2d: std sqrt(2 / 768) = 0.0510 for ViT-S/16 (PyTorch's default would give
    0.0208 and a non-zero bias)."""
    torch.manual_seed(0)
    proj = build_vit("vit_small", 16, 224).vit.patch_embed.proj.requires_grad_(False)
    assert proj.weight.shape == (384, 3, 16, 16) and torch.count_nonzero(proj.bias) == 0
    # 294,912 normal draws: sample std within 0.5% of sqrt(2 / fan_in) (3.8 standard errors), mean 5.3
    assert float(proj.weight.std()) == pytest.approx(math.sqrt(2 / 768), rel=5e-3)
    assert abs(float(proj.weight.mean())) < 5e-4
    assert float(proj.weight.abs().max()) > 4 * math.sqrt(2 / 768)  # normal tails, not uniform (max 1.73 std)


def test_sdpa_and_eager_agree():
    torch.manual_seed(0)
    a = build_vit("vit_mini", 8, 32, depth=2, attention="sdpa").double().eval()
    b = build_vit("vit_mini", 8, 32, depth=2, attention="eager").double().eval()
    b.load_state_dict(a.state_dict())
    x = randn(2, 3, 32, 32)
    torch.testing.assert_close(a(x), b(x), **EXACT)


def test_projection_head_layout_and_init():
    head = ProjectionHead(32, 64, 16)
    names = [n for n, _ in head.named_children()]
    assert names == ["fc1", "bn1", "gelu1", "fc2", "bn2", "gelu2", "fc3"]
    assert isinstance(head.bn1, torch.nn.BatchNorm1d)
    assert head.fc3.out_features == 16 and head.fc1.bias.abs().sum() == 0
    assert head(torch.randn(4, 32)).shape == (4, 16)


def test_prototypes_init_and_freeze():
    protos = Prototypes(64, 16)
    bound = 1 / math.sqrt(16)
    assert protos.weight.abs().max() <= bound and protos.weight.requires_grad
    torch.testing.assert_close(protos().norm(dim=1), torch.ones(64))
    assert not Prototypes(4, 16, frozen=True).weight.requires_grad


def test_drop_path_is_stochastic_depth_in_training_only():
    from timm.layers import DropPath

    from msn.models import disable_drop_path

    torch.manual_seed(0)
    vit = build_vit("vit_mini", 8, 32, depth=4, embed_dim=32, num_heads=2, drop_path_rate=0.3)
    rates = [block.drop_path1.drop_prob if isinstance(block.drop_path1, DropPath) else 0.0 for block in vit.vit.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])  # rising linearly to the last block (DeiT)
    plain = build_vit("vit_mini", 8, 32, depth=4, embed_dim=32, num_heads=2)
    plain.load_state_dict(vit.state_dict())  # the same names: drop path has no weights
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    vit.train()
    assert not torch.equal(vit(x), vit(x))  # blocks dropped at random while training
    vit.eval(), plain.eval()
    assert torch.equal(vit(x), plain(x))  # inactive in eval mode
    disable_drop_path(vit.train())
    plain.train()
    assert torch.equal(vit(x), plain(x))
    with pytest.raises(ValueError, match="drop_path_rate"):
        build_vit("vit_mini", 8, 32, drop_path_rate=1.0)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_cls_only_last_block_equals_the_full_block_with_gradients(attention):
    """The last block computes the CLS row only (ClassTokenBlock): output and every weight's
    gradient equal those of the full block's CLS row, in float64."""
    torch.manual_seed(0)
    model = build_vit("vit_mini", 8, 32, depth=2, embed_dim=32, num_heads=2, attention=attention).double()
    x = randn(3, 3, 32, 32)
    keep = sample_keep_indices(3, 16, 0.25, generator=torch.Generator().manual_seed(2))

    def run(cls_only):
        model.zero_grad()
        out = model(x, keep) if cls_only else model.forward_blocks(x, keep)[0][:, 0]
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    (fast, fast_grads), (full, full_grads) = run(True), run(False)
    torch.testing.assert_close(fast, full, **EXACT)
    assert fast_grads.keys() == full_grads.keys()
    for name in full_grads:
        torch.testing.assert_close(fast_grads[name], full_grads[name], **EXACT, msg=name)


def test_cls_only_last_block_draws_stochastic_depth_like_the_full_block():
    torch.manual_seed(0)
    model = build_vit("vit_mini", 8, 32, depth=2, embed_dim=32, num_heads=2, drop_path_rate=0.5).double().train()
    x = randn(8, 3, 32, 32)
    torch.manual_seed(5)
    fast = model(x)
    torch.manual_seed(5)
    full = model.forward_blocks(x)[0][:, 0]
    torch.testing.assert_close(fast, full, **EXACT)


def test_cls_only_last_block_saves_its_share_of_flops():
    """ViT-S/16 at 224 px: the last of 12 blocks spends 2 of its 12 D x D products on the 196
    patch tokens (keys, values) instead of 12, and one attention row instead of 197 (eager
    attention: its matmuls are counted, the CPU's fused kernel is not)."""
    model = build_vit("vit_small", 16, 224, attention="eager")
    x = torch.randn(1, 3, 224, 224)

    def flops(fn):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            fn()
        return counter.get_total_flops()

    full, fast = flops(lambda: model.forward_blocks(x)), flops(lambda: model(x))
    d, n, blocks = 384, 197, 12
    linear = 2 * 12 * d * d * n  # qkv 3, proj 1, MLP 8 products per token and block
    attention = 2 * 2 * n * n * d
    saved = 2 * 10 * d * d * (n - 1) + 2 * 2 * (n - 1) * n * d
    assert full - fast == pytest.approx(saved, rel=1e-6)
    assert (full - fast) / (blocks * (linear + attention)) > 0.07


def test_forward_cls_before_and_after_the_final_norm(vit):
    """``forward_cls`` (the training forward's CLS-only last block) gives the last block's CLS
    row before the final LayerNorm (``final_norm=False``, the low-shot feature) and after it
    (``forward``), with and without dropped tokens, in float64."""
    x = randn(3, 3, 32, 32)
    keep = sample_keep_indices(3, 16, 0.5, generator=torch.Generator().manual_seed(3))
    for indices in (None, keep):
        tokens, collected = vit.forward_blocks(x, indices, collect_last=1)
        torch.testing.assert_close(vit.forward_cls(x, indices, final_norm=False), collected[-1][:, 0], **EXACT)
        torch.testing.assert_close(vit.forward_cls(x, indices), tokens[:, 0], **EXACT)
        torch.testing.assert_close(vit(x, indices), tokens[:, 0], **EXACT)
    assert not torch.allclose(vit.forward_cls(x, final_norm=False), vit(x), atol=1e-3)


def test_sincos_pos_embed_values_by_hand():
    """Width 8 (2 frequencies: 1 and 1/100), grid 2: the patch at row 1, column 0 is
    [sin 1, sin 0.01, cos 1, cos 0.01, sin 0, sin 0, cos 0, cos 0]; CLS is zero."""
    from msn.models import sincos_pos_embed

    table = sincos_pos_embed(2, 8)
    assert table.shape == (1, 5, 8) and table.dtype == torch.float32
    assert torch.equal(table[0, 0], torch.zeros(8))
    row1_col0 = table[0, 1 + 2 * 1 + 0].double()
    expected = torch.tensor([math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01), 0, 0, 1, 1], dtype=torch.float64)
    torch.testing.assert_close(row1_col0, expected, rtol=0, atol=1e-7)  # float32 rounding of values <= 1
    assert len({tuple(t.tolist()) for t in table[0, 1:]}) == 4  # every patch its own code
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed(2, 6)


def test_sincos_position_table_stays_fixed_through_training(tiny_config):
    """model.pos_embed=sincos: the table is the sin-cos code, not trained (no gradient, no
    AdamW update or weight decay, the EMA target keeps it), and the default stays learned."""
    from msn.models import sincos_pos_embed
    from msn.train import Trainer

    from conftest import first_batch

    learned = Trainer(tiny_config())
    assert learned.msn_step.network.backbone.vit.pos_embed.requires_grad
    trainer = Trainer(tiny_config(model={"pos_embed": "sincos"}))
    vit = trainer.msn_step.network.backbone.vit
    table = sincos_pos_embed(vit.patch_embed.grid_size[0], vit.embed_dim)
    assert not vit.pos_embed.requires_grad and torch.equal(vit.pos_embed.detach(), table)
    before = {k: v.clone() for k, v in trainer.msn_step.network.state_dict().items()}
    batch = first_batch(trainer)
    for _ in range(2):
        trainer.train_step(batch)
    after = trainer.msn_step.network.state_dict()
    assert torch.equal(after["backbone.vit.pos_embed"], table)
    assert torch.equal(trainer.msn_step.target.state_dict()["backbone.vit.pos_embed"], table)
    assert not torch.equal(after["backbone.vit.cls_token"], before["backbone.vit.cls_token"])  # the rest trains
