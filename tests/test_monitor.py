"""The live low-shot monitor (``monitor.*``): its k-NN, its image draw, its records, an
unchanged trajectory, its config keys and its curves in ``msn-plot``."""

import json
import math
import random
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from msn import checkpoint
from msn.config import ConfigError, load_config
from msn.eval.monitor import LowShotProbe, draw_balanced, knn_top1
from msn.models import build_network
from msn.plots import PANELS, panels_for, plot_runs
from msn.train import Trainer

from conftest import assert_same_state, compose_config, tiny_config_dict

#: A monitor small enough for the tiny config's 32 synthetic images of 4 classes.
TINY_MONITOR = {"enabled": True, "every": 4, "train_images": 16, "test_images": 16, "shots": [1, 2], "splits": 2,
                "knn_k": 4}


def _at(theta: float) -> list[float]:
    """A unit row at angle ``theta`` in the plane of two orthonormal zero-mean vectors of R^3,
    so that :func:`msn.eval.classifier.normalize_rows` leaves it as it is and the cosine
    similarity of two rows is the cosine of their angle difference."""
    u = torch.tensor([1.0, -1.0, 0.0]) / math.sqrt(2)
    v = torch.tensor([1.0, 1.0, -2.0]) / math.sqrt(6)
    return (math.cos(theta) * u + math.sin(theta) * v).tolist()


def test_knn_top1_on_a_hand_checkable_feature_set():
    """One query at angle 0; the pool: class 0 at +0.1 rad (cos 0.995), class 1 twice at
    +-0.45 rad (cos 0.900). k=1: class 0 wins. k=3 at T=0.07: class 0 weighs e^(0.995/0.07)
    = e^14.21, class 1 2 e^(0.900/0.07) = 2 e^12.86, a ratio of e^1.35 / 2 = 1.9: class 0 still
    wins (similarity-weighted). At T=1 the weights are 2.70 against 2 x 2.46: class 1 wins."""
    pool = torch.tensor([_at(0.1), _at(0.45), _at(-0.45)])
    pool_labels = torch.tensor([0, 1, 1])
    query, truth = torch.tensor([_at(0.0)]), torch.tensor([0])
    assert knn_top1(pool, pool_labels, query, truth, num_classes=2, k=1) == 100.0
    assert knn_top1(pool, pool_labels, query, truth, num_classes=2, k=3) == 100.0
    assert knn_top1(pool, pool_labels, query, truth, num_classes=2, k=3, temperature=1.0) == 0.0
    # four queries, the third one on class 1's side but labelled 0: 3 of 4 right
    queries = torch.tensor([_at(0.0), _at(0.12), _at(-0.5), _at(0.5)])
    assert knn_top1(pool, pool_labels, queries, torch.tensor([0, 0, 0, 1]), num_classes=2, k=1) == 75.0


def test_draw_balanced_is_disjoint_balanced_seeded_and_capped():
    labels = [0] * 50 + [1] * 30 + [2] * 4  # class 2 runs out
    pool, held = draw_balanced(labels, (30, 30))
    assert not set(pool) & set(held) and len(pool) == len(held) == 30
    assert sorted(labels[i] for i in pool).count(2) == 4 and sorted(labels[i] for i in pool).count(0) == 13
    assert [labels[i] for i in held].count(0) == [labels[i] for i in held].count(1) == 15
    assert draw_balanced(labels, (30, 30)) == [pool, held]  # seeded: the same draw every time
    assert draw_balanced(labels, (30, 30), seed=1) != [pool, held]
    with pytest.raises(ConfigError, match=r"^monitor.train_images: 60 \+ 30 monitor images exceed the 84"):
        draw_balanced(labels, (60, 30))


def careless_probe(cfg, dataset):
    """The real probe, plus draws from every global generator (the monitor must undo them)."""
    real = LowShotProbe.from_config(cfg, dataset)

    def probe(*args):
        torch.randn(3), np.random.rand(), random.random()
        return real(*args)

    return probe


def test_monitor_records_and_an_unchanged_trajectory(tiny_config, tmp_path):
    """7 steps (4 per epoch), a record every 2 and the monitor every 4: its values are in the
    records of steps 4 and 7 (the end) only; the checkpoint equals, bit for bit (RNG states
    included), that of the same run without the monitor, even with a probe that draws from
    the global generators."""
    sections = {"train": {"max_steps": 7}}
    Trainer(tiny_config(output_dir=str(tmp_path / "off"), **sections)).fit()
    on = tiny_config(output_dir=str(tmp_path / "on"), monitor=TINY_MONITOR, **sections)
    trainer = Trainer(on, probe=careless_probe)
    trainer.fit()
    records = [json.loads(line) for line in open(tmp_path / "on" / "metrics.jsonl")]
    assert [r["step"] for r in records] == [2, 4, 6, 7]
    keys = {"monitor/knn_top1", "monitor/1shot", "monitor/2shot", "monitor/seconds"}
    for record in records:
        assert (keys <= set(record)) == (record["step"] in (4, 7)), record
    for record in records[1], records[3]:
        assert all(0 <= record[k] <= 100 for k in keys - {"monitor/seconds"}) and record["monitor/seconds"] > 0
    assert trainer.msn_step.target.training and trainer.msn_step.network.training  # train mode restored
    assert trainer._postfix(records[-1])["knn"] == f"{records[-1]['monitor/knn_top1']:.1f}"
    a = checkpoint.load_checkpoint(tmp_path / "off/checkpoints/latest.pt")
    b = checkpoint.load_checkpoint(tmp_path / "on/checkpoints/latest.pt")
    assert a["step"] == b["step"] == 7
    assert assert_same_state(a, b) > 50  # the config (monitor.*, output_dir) excluded


def test_an_enabled_monitor_without_a_probe_warns_and_trains(tiny_config, caplog):
    trainer = Trainer(tiny_config(monitor=TINY_MONITOR))
    assert trainer.monitor is None and "no probe was given" in caplog.text


@pytest.mark.parametrize("change, key", [
    ({"every": 0}, "monitor.every"),
    ({"root": "/nonexistent/labelled"}, "monitor.root"),
    ({"train_images": 0}, "monitor.train_images"),
    ({"test_images": -1}, "monitor.test_images"),
    ({"shots": []}, "monitor.shots"),
    ({"shots": [1, 0]}, "monitor.shots"),
    ({"shots": [5, 5]}, "monitor.shots"),
    ({"splits": 0}, "monitor.splits"),
    ({"knn_k": 0}, "monitor.knn_k"),
    ({"enabled": "sometimes"}, "monitor.enabled"),
])
def test_bad_monitor_values_name_the_key(change, key, tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tiny_config_dict(tmp_path, monitor=change))
    assert str(info.value).startswith(key + ":") and "\n" not in str(info.value)


def test_a_pool_too_small_for_some_shots_scores_the_others_and_says_so_once(tmp_path, caplog):
    """The monitor is an aid, never a reason a run cannot start (``experiment=fmnist_demo
    data.subset=64`` used to fail): the shot counts the pool cannot serve are left out."""
    cfg = load_config(tiny_config_dict(tmp_path, monitor={**TINY_MONITOR, "train_images": 8, "shots": [1, 5]}))
    from msn.data import build_dataset

    probe = LowShotProbe.from_config(cfg, build_dataset(cfg.data))
    assert probe.shots == [1] and {k for k, _ in probe.subsets} == {1}
    assert caplog.text.count("monitor: a pool of 8 images has too few images of some class for 5 per class") == 1
    values = probe(build_network(cfg.model, cfg.head, 32).backbone.eval(), torch.device("cpu"), torch.float32, nullcontext)
    assert set(values) == {"monitor/knn_top1", "monitor/1shot"}
    none = LowShotProbe.from_config(load_config(tiny_config_dict(tmp_path, monitor={**TINY_MONITOR, "train_images": 2,
                                                                                    "shots": [5]})), build_dataset(cfg.data))
    assert none.shots == [] and none.subsets == []


def test_presets_turn_the_monitor_on_for_fashion_mnist_only(tmp_path):
    assert not load_config(tiny_config_dict(tmp_path)).monitor.enabled  # the base config
    for name in ("fmnist_demo", "fmnist_msn"):
        assert compose_config(f"experiment={name}").monitor.enabled
    assert not compose_config("experiment=vits16_in1k").monitor.enabled


def test_msn_plot_draws_the_monitor_curves(tmp_path):
    records = []
    for step in (10, 20, 30, 40):
        record = {"step": step, "loss": 5 / step, "ce": 4 / step, "memax": 0.1, "entropy": 5.0, "np": 100,
                  "max_t": 0.2, "min_t": 0.05, "lr": 1e-3, "wd": 0.04, "momentum": 0.996, "img_per_s": 50.0}
        if step in (20, 40):
            record.update({"monitor/knn_top1": step, "monitor/5shot": step / 2, "monitor/1shot": step / 4,
                           "monitor/seconds": 1.5})
        records.append(record)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    panels = panels_for(records)
    assert panels[:-1] == PANELS and panels[-1][:2] == ("monitor", ("monitor/knn_top1", "monitor/1shot", "monitor/5shot"))
    assert panels_for(records[:1]) == PANELS  # no monitor values: no monitor panel
    path = plot_runs([tmp_path / "run"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_a_data_set_smaller_than_the_monitor_draw_shrinks_it_with_a_warning(tmp_path, caplog):
    """32 synthetic images against 500 + 500 requested: the draw keeps the proportions of
    what there is (16 + 16), disjoint, and says so."""
    from msn.data import build_dataset
    from msn.eval.monitor import fitted_counts

    assert fitted_counts(1000, 500, 500) == (500, 500) and fitted_counts(256, 300, 100) == (192, 64)
    cfg = load_config(tiny_config_dict(tmp_path, monitor={**TINY_MONITOR, "train_images": 500, "test_images": 500}))
    probe = LowShotProbe.from_config(cfg, build_dataset(cfg.data))
    assert len(probe.pool) == len(probe.test) == 16 and not set(probe.pool) & set(probe.test)
    assert "500 + 500 images requested but the data set holds 32; using 16 + 16" in caplog.text
