"""msn.train schedules, parameter groups and EMA against hand-computed values."""

import math

import pytest
import torch

from msn.models import Prototypes, build_network
from msn.train import Schedules, build_optimizer, ema_update, parameter_groups, set_lr_and_wd
from msn.config import HeadConfig, ModelConfig


def test_schedule_values_at_known_steps():
    # 10 epochs of 100 steps, stretch 1.25 -> T = 1250; warm-up 2 epochs = 200 steps
    s = Schedules(total_steps=1000, steps_per_epoch=100, warmup_epochs=2)
    assert s.stretched_steps == 1250 and s.warmup_steps == 200
    assert s.learning_rate(0) == pytest.approx(2e-4)
    assert s.learning_rate(100) == pytest.approx(2e-4 + 0.5 * 8e-4)
    assert s.learning_rate(200) == pytest.approx(1e-3)
    # halfway through the cosine part: (725 - 200) / 1050 = 0.5
    assert s.learning_rate(725) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5)
    assert s.learning_rate(1000) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi * 800 / 1050)))
    assert s.learning_rate(1000) > 1e-6  # stretched: the run ends before the LR floor
    assert s.weight_decay_at(0) == pytest.approx(0.04)
    assert s.weight_decay_at(625) == pytest.approx(0.22)
    assert s.weight_decay_at(1250) == pytest.approx(0.4)
    assert s.momentum(0) == pytest.approx(0.996)
    assert s.momentum(1000) == pytest.approx(0.996 + 0.004 * 1000 / 1250)  # 0.9992
    assert s.sharpen_temperature(500) == pytest.approx(0.25)
    t = Schedules(total_steps=1000, steps_per_epoch=100, sharpen_start=0.25, sharpen_final=0.125)
    assert t.sharpen_temperature(625) == pytest.approx(0.1875)


def test_update_uses_advanced_lr_and_current_momentum():
    s = Schedules(total_steps=1000, steps_per_epoch=100, warmup_epochs=2)
    first = s.at_update(0)
    assert first["lr"] == pytest.approx(s.learning_rate(1)) and first["lr"] > 2e-4
    assert first["momentum"] == pytest.approx(0.996)
    assert first["wd"] == pytest.approx(s.weight_decay_at(1))


def _network():
    return build_network(ModelConfig(arch="vit_mini", depth=1, embed_dim=16, num_heads=2, patch_size=8),
                         HeadConfig(hidden_dim=16, output_dim=8), 16)


def test_parameter_groups_follow_reference():
    net, protos = _network(), Prototypes(4, 8)
    groups = parameter_groups(net, protos.weight)
    names = {id(p): n for n, p in net.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert "backbone.vit.cls_token" in decay and "backbone.vit.pos_embed" in decay  # reference decays them
    assert "backbone.vit.blocks.0.attn.qkv.weight" in decay and "head.fc1.weight" in decay
    assert "backbone.vit.blocks.0.attn.qkv.bias" in no_decay and "head.bn1.weight" in no_decay
    assert "backbone.vit.norm.weight" in no_decay and "head.fc3.bias" in no_decay
    assert decay.isdisjoint(no_decay) and len(decay | no_decay) == len(names)
    assert groups[2]["params"] == [protos.weight] and groups[2]["weight_decay"] == 0.0
    moved = parameter_groups(net, protos.weight, decay_pos_embed=False)
    assert "backbone.vit.pos_embed" in {names[id(p)] for p in moved[1]["params"]}
    assert len(parameter_groups(net, Prototypes(4, 8, frozen=True).weight)) == 2


def test_set_lr_and_wd_leaves_excluded_groups_at_zero():
    net, protos = _network(), Prototypes(4, 8)
    opt = build_optimizer(parameter_groups(net, protos.weight))
    set_lr_and_wd(opt, 0.5, 0.3)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.5, 0.5]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.3, 0.0, 0.0]


def test_ema_update_over_parameters_only():
    online, target = _network(), _network()
    target.head.bn1.running_mean.fill_(7.0)
    before = {n: p.clone() for n, p in target.named_parameters()}
    ema_update(target, online, 0.9)
    for name, param in target.named_parameters():
        expected = 0.9 * before[name] + 0.1 * dict(online.named_parameters())[name]
        torch.testing.assert_close(param, expected)
    assert (target.head.bn1.running_mean == 7.0).all()
