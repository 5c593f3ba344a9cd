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


def reference_schedule_values(ipe: int, epochs: int, warmup: float, start_lr=2e-4, lr=1e-3, final_lr=1e-6,
                              wd=0.04, final_wd=0.4, ema=(0.996, 1.0), sharpen=(0.25, 0.25), stretch=1.25):
    """The reference training loop's values per update, written out from its code: stateful
    warm-up/cosine LR and cosine WD objects stepped once per update (``T_max`` an int, the
    LR's cosine over ``T_max - warmup``), and momentum/temperature generators whose float
    increment is ``(final - start) / (ipe * epochs * 1.25)``, read once per update."""
    t_max, warmup_steps = int(stretch * epochs * ipe), int(warmup * ipe)
    increment_m = (ema[1] - ema[0]) / (ipe * epochs * stretch)
    increment_t = (sharpen[1] - sharpen[0]) / (ipe * epochs * stretch)
    momentum = (ema[0] + increment_m * i for i in range(int(ipe * epochs * stretch) + 1))
    temperature = (sharpen[0] + increment_t * i for i in range(int(ipe * epochs * stretch) + 1))
    values = []
    for step in range(1, ipe * epochs + 1):
        if step < warmup_steps:
            new_lr = start_lr + float(step) / float(max(1, warmup_steps)) * (lr - start_lr)
        else:
            progress = float(step - warmup_steps) / float(max(1, t_max - warmup_steps))
            new_lr = max(final_lr, final_lr + (lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress)))
        new_wd = final_wd + (wd - final_wd) * 0.5 * (1.0 + math.cos(math.pi * (step / t_max)))
        new_wd = max(final_wd, new_wd) if final_wd <= wd else min(final_wd, new_wd)
        values.append({"lr": new_lr, "wd": new_wd, "momentum": next(momentum), "sharpen_T": next(temperature)})
    return values


@pytest.mark.parametrize("ipe", [1, 3, 6, 7, 13, 1251])
@pytest.mark.parametrize("epochs", [1, 3, 5])
def test_every_update_equals_the_reference_to_the_last_bit(ipe, epochs):
    sharpen = (0.25, 0.2)  # a moving temperature, so that its ramp is checked too
    ours = Schedules(total_steps=ipe * epochs, steps_per_epoch=ipe, warmup_epochs=0.5, sharpen_start=sharpen[0],
                     sharpen_final=sharpen[1])
    reference = reference_schedule_values(ipe, epochs, warmup=0.5, sharpen=sharpen)
    for update, expected in enumerate(reference):
        assert ours.at_update(update) == expected, f"update {update} of {ipe} x {epochs}"


def test_float_increment_where_the_length_is_not_whole():
    """3 epochs x 7 steps: the ramps run over 26.25 steps, not int(26.25) = 26."""
    s = Schedules(total_steps=21, steps_per_epoch=7)
    assert s.stretched_steps == 26 and s.stretched_length == 26.25
    assert s.at_update(20)["momentum"] == pytest.approx(0.996 + 20 * 0.004 / 26.25, abs=1e-15)  # 0.999048
    assert abs(s.at_update(20)["momentum"] - (0.996 + 20 * 0.004 / 26)) > 2e-5  # the int length: 0.999077


def test_from_config_reads_every_schedule_key():
    from msn.config import LossConfig, OptimConfig

    optim = OptimConfig(epochs=3, lr=5e-4, start_lr=1e-5, final_lr=2e-6, warmup_epochs=1, weight_decay=0.01,
                        final_weight_decay=0.1, ema_start=0.99, ema_end=0.999, schedule_stretch=1.5)
    loss = LossConfig(sharpen_start=0.3, sharpen_final=0.2)
    s = Schedules.from_config(optim, loss, steps_per_epoch=10)
    assert (s.total_steps, s.steps_per_epoch, s.lr, s.start_lr, s.final_lr, s.warmup_epochs) == (30, 10, 5e-4, 1e-5, 2e-6, 1)
    assert (s.weight_decay, s.final_weight_decay, s.ema_start, s.ema_end) == (0.01, 0.1, 0.99, 0.999)
    assert (s.sharpen_start, s.sharpen_final, s.schedule_stretch) == (0.3, 0.2, 1.5)


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
