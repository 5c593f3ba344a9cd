"""The collapse alarm (msn.train.collapse) and the target rank it reads (msn.losses.effective_rank):
RankMe on matrices computed by hand, the detector on constructed statistics (the Fashion-MNIST
ablations' collapsed and healthy runs among them), and tiny training runs end to end."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from msn.config import AlarmConfig, ConfigError, load_config
from msn.losses import effective_rank
from msn.train.collapse import CollapseAlarm

from conftest import compose_config, tiny_config_dict


# --------------------------------------------------------------------------- RankMe
def test_rank_of_a_rank_one_matrix_is_one():
    rows = torch.tensor([[2.0], [-1.0], [0.5], [3.0]]) @ torch.tensor([[1.0, 2.0, -2.0, 0.0, 1.0]])
    assert effective_rank(rows).item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("shape", [(16, 16), (8, 16), (16, 8)])
def test_rank_of_orthonormal_rows_is_the_width(shape):
    """Identity-like rows: every singular value equal, so the rank is min(N, D)."""
    assert effective_rank(torch.eye(*shape)).item() == pytest.approx(min(shape), rel=1e-5)
    rotated = torch.eye(*shape) @ torch.linalg.qr(torch.randn(shape[1], shape[1]))[0]
    assert effective_rank(3.0 * rotated).item() == pytest.approx(min(shape), rel=1e-4)


def test_rank_follows_rankme_by_hand():
    """Rows (1,0), (1,0), (0,1): singular values sqrt(2) and 1, p = (sqrt2, 1) / (1 + sqrt2) (+ 1e-7),
    rank exp(-sum p log p) = 1.9706...; rows are L2-normalised first, so scaling one changes nothing."""
    s = torch.tensor([math.sqrt(2.0), 1.0], dtype=torch.float64)
    p = s / s.sum() + 1e-7
    expected = math.exp(-float((p * p.log()).sum()))
    assert expected == pytest.approx(1.9706, abs=1e-4)
    rows = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert effective_rank(rows).item() == pytest.approx(expected, rel=1e-12)
    assert effective_rank(rows * torch.tensor([[5.0], [0.1], [2.0]], dtype=torch.float64)).item() == pytest.approx(expected, rel=1e-12)
    assert effective_rank(rows.to(torch.bfloat16)).dtype == torch.float32  # at least float32
    with pytest.raises(ValueError, match=r"effective_rank expects a non-empty 2-D"):
        effective_rank(torch.ones(3))


# --------------------------------------------------------------------------- the detector
def _alarm(K=256, batch=128, width=128, warmup=37.5, **thresholds) -> CollapseAlarm:
    return CollapseAlarm(AlarmConfig(**thresholds), K, batch, batch, width, warmup)


def _records(start, step, count, **values):
    return [{"step": start + i * step, **values} for i in range(count)]


def test_sinkhorn_off_ablation_fires_once_with_what_to_try():
    """docs/results/fashion_mnist.md's sinkhorn_off run (K 256, batch 128): np 3.0, max_t 0.953."""
    alarm = _alarm()
    messages = [alarm.observe(r) for r in _records(20, 20, 10, np=3.0, max_t=0.953, rank=40.0)]
    assert messages[:2] == [None, None] and messages[3:] == [None] * 7  # after 3 records, and once only
    message = messages[2]
    assert message.startswith("collapse: at step 60, targets one-hot for most images (max_t 0.953 >= alarm.max_t 0.9); "
                              "3.0 distinct target prototypes per batch (np <= 12.8)")
    for hint in ("loss.use_sinkhorn=true", "loss.memax_weight", "loss.temperature", "loss.sharpen_start"):
        assert hint in message
    assert alarm.fired == "collapse"


@pytest.mark.parametrize("values,reason", [
    ({"np": 100.0, "max_t": 0.95, "rank": 40.0}, "targets one-hot"),  # a very low target temperature
    ({"np": 1.0, "max_t": 0.5, "rank": 40.0}, "1.0 distinct target prototypes"),  # ME-MAX 0: one prototype
    ({"np": 100.0, "max_t": 0.1, "rank": 2.5}, "effective rank 2.50 (<= 2.56)"),  # 0.02 of min(128, 128)
])
def test_each_collapse_sign_alone_fires(values, reason):
    alarm = _alarm()
    fired = [m for m in map(alarm.observe, _records(5, 5, 3, **values)) if m]
    assert len(fired) == 1 and fired[0].startswith("collapse: at step 15") and reason in fired[0]


def test_healthy_statistics_never_fire():
    """Every healthy Fashion-MNIST ablation row (np 99-121, max_t 0.03-0.17, K 256, batch 128), the
    demo's records of a whole run (np 91-110, max_t 0.055-0.145), and the demo's first steps
    measured with the rank (``experiment=fmnist_demo train.log_every=5``, then ``15``: rank 61 down
    to 16 of 128 by step 120)."""
    alarm = _alarm()
    rows = [(104.1, 0.107), (99.2, 0.108), (111.2, 0.168), (120.2, 0.031), (101.1, 0.093), (91.1, 0.055),
            (109.4, 0.145), (97.5, 0.075), (101.96, 0.086)]
    records = [{"step": 25 * (i + 1), "np": used, "max_t": max_t, "rank": None} for i, (used, max_t) in enumerate(rows * 4)]
    first_steps = [(115.6, 0.178, 61.26), (114.2, 0.167, 56.52), (109.6, 0.146, 50.06), (105.4, 0.127, 44.93),
                   (102.0, 0.109, 40.99), (102.6, 0.094, 36.08), (99.6, 0.082, 32.51), (94.6, 0.071, 28.28),
                   (93.2, 0.059, 22.7), (90.4, 0.053, 19.24), (92.1, 0.053, 18.38), (92.6, 0.056, 17.49),
                   (94.7, 0.058, 16.35)]
    demo = _alarm()
    assert [alarm.observe(r) for r in records] == [None] * len(records) and alarm.fired is None
    steps = [5, 10, 15, 20, 25, 30, 35, 40, 60, 75, 90, 105, 120]
    assert [demo.observe({"step": s, "np": n, "max_t": m, "rank": r}) for s, (n, m, r) in zip(steps, first_steps)] \
        == [None] * len(first_steps) == [None] * len(steps)


def test_a_streak_broken_by_a_healthy_record_starts_again():
    alarm = _alarm()
    collapsed, healthy = {"np": 2.0, "max_t": 0.97}, {"np": 100.0, "max_t": 0.1}
    sequence = [collapsed, collapsed, healthy, collapsed, collapsed, collapsed]
    fired = [alarm.observe({"step": 10 * (i + 1), **values}) for i, values in enumerate(sequence)]
    assert fired[:5] == [None] * 5 and fired[5].startswith("collapse: at step 60")


def test_uniform_targets_long_after_warm_up_mean_not_learning():
    """K 256: max_t at most 1.5 / 256 = 0.00586 from twice the warm-up (75 steps) on."""
    alarm = _alarm()
    early = [alarm.observe(r) for r in _records(25, 25, 2, np=100.0, max_t=0.0045, rank=40.0)]  # steps 25, 50
    assert early == [None, None]
    later = [alarm.observe(r) for r in _records(75, 25, 4, np=100.0, max_t=0.0045, rank=40.0)]
    assert later[:2] == [None, None] and later[3] is None
    assert later[2].startswith("not learning: at step 125, targets near uniform (max_t 0.00450 <= alarm.uniform/K")
    assert "loss.temperature" in later[2] and "optim.lr" in later[2]


def test_tiny_bounds_keep_floors_that_can_be_reached():
    """K 8, batch 8, width 16 (the tests' tiny config): np fires at 1 (0.1 x 8 = 0.8 is floored at 1),
    rank at 2 (0.02 x 8 = 0.16 is floored at 2)."""
    alarm = CollapseAlarm(AlarmConfig(), 8, 8, 8, 16, 4)
    assert (alarm.np_floor, alarm.rank_floor) == (1.0, 2.0)
    assert alarm.diagnose({"step": 2, "np": 1.5, "max_t": 0.8, "rank": 2.5}) is None
    kind, reasons = alarm.diagnose({"step": 2, "np": 1.0, "max_t": 0.8, "rank": 1.9})
    assert kind == "collapse" and len(reasons) == 2


def test_replay_restores_a_raised_alarm_and_the_streaks():
    raised = _alarm()
    records = _records(10, 10, 3, np=2.0, max_t=0.97)
    records[-1]["alarm"] = raised.observe(records[0]) or raised.observe(records[1]) or raised.observe(records[2])
    resumed = _alarm()
    resumed.replay(records)
    assert resumed.fired == "collapse" and resumed.observe({"step": 40, "np": 2.0, "max_t": 0.97}) is None
    pending = _alarm()
    pending.replay(records[:2])  # two collapsed records before the interruption: the third fires
    assert pending.observe({"step": 30, "np": 2.0, "max_t": 0.97}).startswith("collapse: at step 30")


@pytest.mark.parametrize("key,value,message", [
    ("max_t", 1.5, "alarm.max_t: must be in (0, 1], got 1.5"),
    ("uniform", 0.5, "alarm.uniform: must be >= 1 (a multiple of 1/K), got 0.5"),
    ("patience", 0, "alarm.patience: must be positive, got 0"),
])
def test_bad_thresholds_are_one_line_naming_the_key(tmp_path, key, value, message):
    with pytest.raises(ConfigError) as error:
        load_config(tiny_config_dict(tmp_path, alarm={key: value}))
    assert str(error.value) == message


@pytest.mark.parametrize("experiment", ["fmnist_demo", "fmnist_msn"])
def test_presets_bounds(experiment, tmp_path):
    """The demo and showcase presets (K 256, batch 128, width 128): np alarm at 12.8, rank at 2.56."""
    cfg = load_config(compose_config(f"experiment={experiment}", f"output_dir={tmp_path}"))
    alarm = CollapseAlarm.from_config(cfg, 375, 1)
    assert (alarm.np_floor, alarm.rank_floor, alarm.uniform_ceiling) == pytest.approx((12.8, 2.56, 1.5 / 256))


def test_alarm_keys_may_change_on_resume():
    """``alarm.*`` never touches the weights: changing it (or resuming a run written before the
    section existed) is no config change for ``resume=auto``."""
    from msn.train.state import changed_keys

    assert changed_keys({"seed": 0}, {"seed": 0, "alarm": {"max_t": 0.9}}) == []
    assert changed_keys({"alarm": {"max_t": 0.9}}, {"alarm": {"max_t": 0.5}}) == []
    assert changed_keys({"seed": 0}, {"seed": 1}) == ["seed: 0 -> 1"]


def test_record_holds_the_mean_of_the_ranks_measured_by_each_process(monkeypatch):
    """Two processes (the all-reduce simulated: the other one measured 3.0 on its local batch)."""
    from msn.train import trainer as trainer_module

    def other_rank_adds(tensor):
        return tensor.add_(3.0) if tensor.ndim == 0 else tensor.mul_(2)

    monkeypatch.setattr(trainer_module.distributed, "all_reduce_sum_", other_rank_adds)
    window = trainer_module.StatsWindow(torch.device("cpu"))
    window.add(torch.ones(8))
    window.add(torch.ones(8), torch.tensor(5.0))
    assert window.close(world_size=2)[4] == 4.0
    window.add(torch.ones(8))
    assert window.close(world_size=2)[4] is None  # a window whose steps measured none


def test_progress_bar_shows_the_rank_and_a_raised_alarm(tiny_config):
    from msn.train import Trainer

    trainer = Trainer(tiny_config())
    record = {"step": 6, "loss": 2.0, "np": 1.0, "max_t": 0.99, "rank": 3.25, "img_per_s": 10.0}
    assert trainer._postfix(record) == {"loss": "2.000", "np": "1", "img_s": "10", "rank": "3.2"}
    for step in (2, 4, 6):
        trainer._check_alarm({**record, "step": step})
    assert trainer._postfix({**record, "np": 5.0, "max_t": 0.5})["alarm"] == "collapse"  # stays once raised
    assert "alarm" not in Trainer(tiny_config(alarm={"enabled": False}))._postfix(record)


# --------------------------------------------------------------------------- end to end
def _fit(tmp_path, name, steps, **loss):
    from msn.train import Trainer

    cfg = tiny_config_dict(tmp_path / name, loss={"num_prototypes": 8, **loss},
                           optim={"epochs": 10}, train={"log_every": 2, "max_steps": steps, "progress": False})
    trainer = Trainer(load_config(cfg))
    trainer.fit()
    return [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]


def test_a_collapsing_tiny_run_raises_one_alarm_and_a_healthy_one_none(tmp_path, caplog, monkeypatch):
    """Sinkhorn off with a very low target temperature (0.05): one-hot targets from the start,
    one alarm, not raised again when the run is resumed; the same tiny model with the paper's
    loss never alarms. Every record carries the rank,
    measured on the logged steps only (one SVD per record)."""
    from msn.train import step as step_module

    measured = []
    real_rank = step_module.effective_rank
    monkeypatch.setattr(step_module, "effective_rank", lambda z: measured.append(z.shape) or real_rank(z))
    with caplog.at_level(logging.WARNING, logger="msn.train.trainer"):
        collapsed = _fit(tmp_path, "collapsed", 6, use_sinkhorn=False, sharpen_start=0.05, sharpen_final=0.05)
    alarms = [r for r in collapsed if "alarm" in r]
    assert len(alarms) == 1 and alarms[0]["step"] == 6 and alarms[0]["alarm"].startswith("collapse: at step 6")
    assert [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING] == [alarms[0]["alarm"]]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="msn.train.trainer"):  # resumed: the alarm is not raised again
        resumed = _fit(tmp_path, "collapsed", 8, use_sinkhorn=False, sharpen_start=0.05, sharpen_final=0.05)
    assert [r["step"] for r in resumed] == [2, 4, 6, 8] and [r for r in resumed if "alarm" in r] == alarms
    assert resumed[-1]["max_t"] >= 0.9 and not caplog.records
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="msn.train.trainer"):
        healthy = _fit(tmp_path, "healthy", 8)
    assert not [r for r in healthy if "alarm" in r] and not caplog.records
    for record in collapsed + healthy:
        assert 1.0 <= record["rank"] <= 8.0  # min(local batch 8, width 16)
    assert measured == [(8, 16)] * (len(collapsed) + 1 + len(healthy)) == [(8, 16)] * 8  # records at 2, 4, 6 (, 8)
