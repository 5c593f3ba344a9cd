"""msn.train.Trainer: forwards per resolution group, step order, resume, divergence."""

import json

import pytest
import torch

from msn import checkpoint
from msn.models import MSNViT
from msn.train import Trainer, TrainingDivergedError
from msn.train import trainer as trainer_module

from conftest import assert_same_state


def _first_batch(trainer):
    trainer.sampler.set_position(0, 0)
    return next(iter(trainer.loader))


def test_one_forward_per_resolution_group_and_only_anchor_masked(tiny_config, monkeypatch):
    trainer = Trainer(tiny_config())
    calls = []
    original = MSNViT.forward_blocks

    def spy(self, images, keep_indices=None, collect_last=0):
        role = "target" if self is trainer.target.backbone else "online"
        calls.append((role, tuple(images.shape), None if keep_indices is None else tuple(keep_indices.shape)))
        return original(self, images, keep_indices, collect_last)

    monkeypatch.setattr(MSNViT, "forward_blocks", spy)
    trainer.train_step(_first_batch(trainer))
    # 32 px views with patch 8 -> 16 patches; ratio 0.5 keeps 8 + CLS
    assert calls == [
        ("online", (8, 3, 32, 32), (8, 9)),      # anchors, masked, one call
        ("online", (2 * 8, 3, 16, 16), None),    # all focal views, one call, unmasked
        ("target", (8, 3, 32, 32), None),        # target view, unmasked
    ]


def test_step_order_lr_clip_and_ema(tiny_config):
    trainer = Trainer(tiny_config(optim={"clip_grad": 1e-3}))
    online_before = [p.detach().clone() for p in trainer.network.parameters()]
    target_before = [p.detach().clone() for p in trainer.target.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(online_before, target_before))
    trainer.train_step(_first_batch(trainer))
    s = trainer.schedules
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(s.learning_rate(1))
    assert trainer.optimizer.param_groups[0]["weight_decay"] == pytest.approx(s.weight_decay_at(1))
    grads = [p.grad for p in trainer.network.parameters() if p.grad is not None]
    assert torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) <= 1e-3 * (1 + 1e-4)
    assert trainer.prototypes.weight.grad.norm() > 1e-3  # prototypes are not clipped
    m = s.momentum(0)
    for t0, o1, t1 in zip(target_before, trainer.network.parameters(), trainer.target.parameters()):
        torch.testing.assert_close(t1, m * t0 + (1 - m) * o1.detach())
    assert not torch.equal(trainer.prototypes.weight, trainer.prototypes.weight.detach() * 0)
    assert trainer.step == 1


def test_shared_mask_is_one_subset_per_batch(tiny_config, monkeypatch):
    trainer = Trainer(tiny_config(mask={"ratio": 0.5, "shared": True}))
    seen = []
    original = MSNViT.forward_blocks

    def spy(self, images, keep_indices=None, collect_last=0):
        if keep_indices is not None:
            seen.append(keep_indices.clone())
        return original(self, images, keep_indices, collect_last)

    monkeypatch.setattr(MSNViT, "forward_blocks", spy)
    batch = _first_batch(trainer)
    assert batch.keep_indices is None
    trainer.train_step(batch)
    assert len(seen) == 1 and (seen[0] == seen[0][0]).all()


def test_bf16_forwards_feed_an_fp32_loss(tiny_config, monkeypatch):
    """``precision=bf16`` (the CUDA default): the encoder forwards run under bf16 autocast, the
    loss is computed in fp32 from them (reference: fp32 everywhere, ``precision=fp32``)."""
    trainer = Trainer(tiny_config(precision="bf16"))
    seen = {}
    real_loss = trainer_module.msn_loss

    def spy(anchor, target, prototypes, **kwargs):
        out = real_loss(anchor, target, prototypes, **kwargs)
        seen.update(anchor=anchor.dtype, target=target.dtype, loss=out.loss.dtype, ce=out.ce.dtype)
        return out

    monkeypatch.setattr(trainer_module, "msn_loss", spy)
    trainer.train_step(_first_batch(trainer))
    assert seen == {"anchor": torch.bfloat16, "target": torch.bfloat16, "loss": torch.float32, "ce": torch.float32}
    assert Trainer(tiny_config(precision="fp32")).autocast_dtype is None
    assert Trainer(tiny_config()).autocast_dtype is None  # auto on a CPU: fp32


def test_fit_writes_metrics_config_and_checkpoints(tiny_config):
    cfg = tiny_config(train={"checkpoint_every_epochs": 1})
    record = Trainer(cfg).fit()
    out = checkpoint.checkpoint_dir(cfg.output_dir)
    assert record["step"] == 8  # 32 images / batch 8 = 4 steps x 2 epochs
    assert (out / "latest.pt").is_file() and (out / "epoch_0001.pt").is_file() and (out / "epoch_0002.pt").is_file()
    lines = [json.loads(line) for line in open(f"{cfg.output_dir}/metrics.jsonl")]
    assert [r["step"] for r in lines] == [2, 4, 6, 8]
    for key in ("loss", "ce", "memax", "entropy", "np", "max_t", "min_t", "min_max_t", "lr", "wd", "momentum",
                "img_per_s"):
        assert key in lines[-1]
    for r in lines:  # min_t: mean smallest probability, at most 1/K; min_max_t: a largest one, at least 1/K
        assert 0 <= r["min_t"] <= 1 / 8 <= r["min_max_t"] <= r["max_t"] <= 1
    assert 1 <= lines[-1]["np"] <= 8
    state = checkpoint.load_checkpoint(out / "latest.pt")
    assert state["step"] == 8 and state["config"]["mask"]["ratio"] == 0.5
    assert (checkpoint.Path(cfg.output_dir) / "config.yaml").is_file()


def test_resume_is_bitwise_identical(tiny_config, tmp_path):
    straight = tiny_config(output_dir=str(tmp_path / "straight"))
    Trainer(straight).fit()
    split = tiny_config(output_dir=str(tmp_path / "split"), train={"max_steps": 3})
    Trainer(split).fit()
    assert checkpoint.load_checkpoint(tmp_path / "split/checkpoints/latest.pt")["step"] == 3
    resumed = tiny_config(output_dir=str(tmp_path / "split"))
    Trainer(resumed).fit()
    a = checkpoint.load_checkpoint(tmp_path / "straight/checkpoints/latest.pt")
    b = checkpoint.load_checkpoint(tmp_path / "split/checkpoints/latest.pt")
    assert a["step"] == b["step"] == 8
    for key in ("encoder", "target_encoder"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"
    assert torch.equal(a["prototypes"], b["prototypes"])
    steps = [json.loads(line)["step"] for line in open(tmp_path / "split/metrics.jsonl")]
    assert steps == [2, 3, 4, 6, 8]


@pytest.fixture
def global_rng_consumer(monkeypatch):
    """Make every step draw from the global torch generator (as dropout or drop-path would) and
    let the draw move the prototypes, so that a resumed run's generator has to continue the
    uninterrupted run's stream for the weights to match."""
    original = Trainer.train_step

    def step_that_draws(self, batch):
        stats = original(self, batch)
        with torch.no_grad():
            self.prototypes.weight.add_(1e-3 * torch.randn(self.prototypes.weight.shape))
        return stats

    monkeypatch.setattr(Trainer, "train_step", step_that_draws)


@pytest.mark.parametrize("first,total,workers", [(3, 6, 0), (6, 12, 0), (4, 8, 0), (8, 12, 0), (3, 6, 2)],
                         ids=["mid-epoch", "continued-after-mid-epoch", "epoch-boundary", "continued-after-boundary",
                              "mid-epoch-2-workers"])
def test_resumed_checkpoint_equals_uninterrupted_in_every_tensor_and_rng(tiny_config, tmp_path, global_rng_consumer,
                                                                          first, total, workers):
    """``first`` steps, then a resumed run to ``total``, against ``total`` steps in one go
    (4 steps per epoch): model, target, prototypes, optimiser, data position and every RNG
    state (torch, numpy, python; per rank) equal to the bit."""
    sections = {"optim": {"epochs": 3}, "data": {"num_workers": workers}}
    Trainer(tiny_config(output_dir=str(tmp_path / "straight"), train={"max_steps": total}, **sections)).fit()
    Trainer(tiny_config(output_dir=str(tmp_path / "split"), train={"max_steps": first}, **sections)).fit()
    Trainer(tiny_config(output_dir=str(tmp_path / "split"), train={"max_steps": total}, **sections)).fit()
    a = checkpoint.load_checkpoint(tmp_path / "straight/checkpoints/latest.pt")
    b = checkpoint.load_checkpoint(tmp_path / "split/checkpoints/latest.pt")
    assert a["step"] == b["step"] == total
    assert assert_same_state(a, b) > 50


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_config, monkeypatch):
    cfg = tiny_config()
    trainer = Trainer(cfg)
    real_loss = trainer_module.msn_loss

    def poisoned(*args, **kwargs):
        out = real_loss(*args, **kwargs)
        if trainer.step >= 5:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer_module, "msn_loss", poisoned)
    with pytest.raises(TrainingDivergedError, match="non-finite loss between steps 5 and 6"):
        trainer.fit()
    state = checkpoint.load_checkpoint(checkpoint.find_latest(cfg.output_dir))
    assert state["step"] == 4  # end of epoch 1, before the NaN
    assert all(torch.isfinite(t).all() for t in state["encoder"].values() if t.is_floating_point())
