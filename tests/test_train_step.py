"""msn.train.step.MSNStep (through the Trainer that calls it): one forward per resolution
group, only the anchor masked, the update's order, shared masks, bf16 forwards into an fp32 loss."""

import pytest
import torch

from msn.models import MSNViT
from msn.train import Trainer
from msn.train import step as step_module

from conftest import first_batch


def test_one_forward_per_resolution_group_and_only_anchor_masked(tiny_config, monkeypatch):
    trainer = Trainer(tiny_config())
    calls = []
    original = MSNViT.forward

    def spy(self, images, keep_indices=None):
        role = "target" if self is trainer.msn_step.target.backbone else "online"
        calls.append((role, tuple(images.shape), None if keep_indices is None else tuple(keep_indices.shape)))
        return original(self, images, keep_indices)

    monkeypatch.setattr(MSNViT, "forward", spy)
    trainer.train_step(first_batch(trainer))
    # 32 px views with patch 8 -> 16 patches; ratio 0.5 keeps 8 + CLS
    assert calls == [
        ("online", (8, 3, 32, 32), (8, 9)),      # anchors, masked, one call
        ("online", (2 * 8, 3, 16, 16), None),    # all focal views, one call, unmasked
        ("target", (8, 3, 32, 32), None),        # target view, unmasked
    ]


def test_step_order_lr_clip_and_ema(tiny_config):
    trainer = Trainer(tiny_config(optim={"clip_grad": 1e-3}))
    online_before = [p.detach().clone() for p in trainer.msn_step.network.parameters()]
    prototypes_before = trainer.msn_step.prototypes.weight.detach().clone()
    target_before = [p.detach().clone() for p in trainer.msn_step.target.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(online_before, target_before))
    trainer.train_step(first_batch(trainer))
    s = trainer.msn_step.schedules
    assert trainer.msn_step.optimizer.param_groups[0]["lr"] == pytest.approx(s.learning_rate(1))
    assert trainer.msn_step.optimizer.param_groups[0]["weight_decay"] == pytest.approx(s.weight_decay_at(1))
    grads = [p.grad for p in trainer.msn_step.network.parameters() if p.grad is not None]
    assert torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) <= 1e-3 * (1 + 1e-4)
    assert trainer.msn_step.prototypes.weight.grad.norm() > 1e-3  # prototypes are not clipped
    m = s.momentum(0)
    for t0, o1, t1 in zip(target_before, trainer.msn_step.network.parameters(), trainer.msn_step.target.parameters()):
        torch.testing.assert_close(t1, m * t0 + (1 - m) * o1.detach())
    assert not torch.equal(trainer.msn_step.prototypes.weight, prototypes_before)  # the prototypes took an update
    assert trainer.global_step == 1


def test_shared_mask_is_one_subset_per_batch(tiny_config, monkeypatch):
    trainer = Trainer(tiny_config(mask={"ratio": 0.5, "shared": True}))
    seen = []
    original = MSNViT.forward

    def spy(self, images, keep_indices=None):
        if keep_indices is not None:
            seen.append(keep_indices.clone())
        return original(self, images, keep_indices)

    monkeypatch.setattr(MSNViT, "forward", spy)
    batch = first_batch(trainer)
    trainer.train_step(batch)
    assert len(seen) == 1 and (seen[0] == seen[0][0]).all()


def test_bf16_forwards_feed_an_fp32_loss(tiny_config, monkeypatch):
    """``precision=bf16`` (the CUDA default): the encoder forwards run under bf16 autocast, the
    loss is computed in fp32 from them (reference: fp32 everywhere, ``precision=fp32``)."""
    trainer = Trainer(tiny_config(precision="bf16"))
    seen = {}
    real_loss = step_module.msn_loss

    def spy(anchor, target, prototypes, **kwargs):
        out = real_loss(anchor, target, prototypes, **kwargs)
        seen.update(anchor=anchor.dtype, target=target.dtype, loss=out.loss.dtype, ce=out.ce.dtype)
        return out

    monkeypatch.setattr(step_module, "msn_loss", spy)
    trainer.train_step(first_batch(trainer))
    assert seen == {"anchor": torch.bfloat16, "target": torch.bfloat16, "loss": torch.float32, "ce": torch.float32}
    assert Trainer(tiny_config(precision="fp32")).msn_step.autocast_dtype is None
    assert Trainer(tiny_config()).msn_step.autocast_dtype is None  # auto on a CPU: fp32



def test_drop_path_acts_on_the_online_encoder_only(tiny_config):
    from timm.layers import DropPath

    trainer = Trainer(tiny_config(model={"drop_path_rate": 0.4}))
    online = [m.drop_prob for m in trainer.msn_step.network.modules() if isinstance(m, DropPath)]
    target = [m.drop_prob for m in trainer.msn_step.target.modules() if isinstance(m, DropPath)]
    assert online and max(online) == pytest.approx(0.4) and set(target) == {0.0}
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    trainer.msn_step.target.train()
    with torch.no_grad():
        assert torch.equal(trainer.msn_step.target.backbone(x), trainer.msn_step.target.backbone(x))  # no block dropped
    trainer.train_step(first_batch(trainer))
    assert trainer.global_step == 1


def test_compiled_step_is_static_and_never_recompiles_after_warm_up(tiny_config):
    """``train.compile``: one static graph per view group (masked anchors, focal views, target
    views), compiled in the first step; five more steps trigger no compilation (dynamo's
    counters). A recording backend checks that every traced graph input has concrete sizes
    (no symbolic shapes) and runs the graph as traced; tests/test_cuda.py runs inductor (its C++
    build takes minutes on a 2-core CPU)."""
    from torch._dynamo import register_backend
    from torch._dynamo.utils import counters

    graphs = []

    @register_backend(name="msn_test_record_shapes")
    def record(graph_module, example_inputs):
        traced = [node.meta.get("example_value") for node in graph_module.graph.nodes if node.op == "placeholder"]
        assert not any(isinstance(value, torch.SymInt) for value in traced)  # no size passed as an input
        shapes = [tuple(value.shape) for value in traced if isinstance(value, torch.Tensor)]
        assert all(isinstance(size, int) for shape in shapes for size in shape)  # no symbolic size
        graphs.append(shapes)
        return graph_module.forward

    torch._dynamo.reset()
    counters.clear()
    compiled = {"train": {"compile": True, "compile_backend": "msn_test_record_shapes"}, "mask": {"ratio": 0.25}}
    trainer = Trainer(tiny_config(**compiled))
    batch = first_batch(trainer)
    trainer.train_step(batch)
    watched = ("stats", "frames", "recompiles")
    warm = {name: dict(counters[name]) for name in watched}
    assert warm["stats"]["unique_graphs"] == 3 and len(graphs) == 3
    shapes = {shape for inputs in graphs for shape in inputs}
    assert (8, 13) in shapes and (2 * 8, 3, 16, 16) in shapes  # kept tokens (CLS + 12 of 16 patches), focal views
    for _ in range(5):
        trainer.train_step(batch)
    assert {name: dict(counters[name]) for name in watched} == warm and len(graphs) == 3
    torch.testing.assert_close(Trainer(tiny_config(mask={"ratio": 0.25})).train_step(batch),
                               Trainer(tiny_config(**compiled)).train_step(batch), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
