"""msn.train.Trainer: the loop, metrics and checkpoints, bitwise resume, divergence."""

import json

import pytest
import torch

from msn import checkpoint
from msn.train import Trainer, TrainingDivergedError
from msn.train import step as step_module

from conftest import assert_same_state


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
            self.msn_step.prototypes.weight.add_(1e-3 * torch.randn(self.msn_step.prototypes.weight.shape))
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


def poison_loss_from(trainer: Trainer, step: int, monkeypatch) -> None:
    """Make the loss NaN for every update from ``trainer.global_step == step`` on."""
    real_loss = step_module.msn_loss

    def poisoned(*args, **kwargs):
        out = real_loss(*args, **kwargs)
        if trainer.global_step >= step:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(step_module, "msn_loss", poisoned)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_config, monkeypatch):
    cfg = tiny_config()
    trainer = Trainer(cfg)
    poison_loss_from(trainer, 5, monkeypatch)
    with pytest.raises(TrainingDivergedError, match="non-finite loss between steps 5 and 6"):
        trainer.fit()
    state = checkpoint.load_checkpoint(checkpoint.find_latest(cfg.output_dir))
    assert state["step"] == 4  # end of epoch 1, before the NaN
    assert all(torch.isfinite(t).all() for t in state["encoder"].values() if t.is_floating_point())


def test_a_checkpoint_is_good_only_once_a_finite_step_followed_it(tiny_config, monkeypatch):
    """One step per epoch, the loss non-finite from the fourth step on (as a learning rate of
    1e30 does: the third update leaves huge but finite weights). ``latest.pt`` (step 3) was
    followed by a non-finite step, so the message names ``previous.pt`` (step 2), kept until a
    finite step shows ``latest.pt`` good."""
    cfg = tiny_config(data={"synthetic_size": 8}, optim={"epochs": 6})
    trainer = Trainer(cfg)
    poison_loss_from(trainer, 3, monkeypatch)
    folder = checkpoint.checkpoint_dir(cfg.output_dir)
    with pytest.raises(TrainingDivergedError) as caught:
        trainer.fit()
    assert str(caught.value) == (f"non-finite loss between steps 4 and 4; stopping. {folder / 'latest.pt'} (step 3) was "
                                 f"followed by a non-finite step; the last good checkpoint is {folder / 'previous.pt'}: "
                                 f"resume={folder / 'previous.pt'} continues from it.")
    assert checkpoint.load_checkpoint(folder / "previous.pt")["step"] == 2
    assert checkpoint.load_checkpoint(folder / "latest.pt")["step"] == 3


def test_previous_is_dropped_once_a_finite_step_shows_latest_good(tiny_config, monkeypatch):
    """Two steps per epoch, a record every step, the loss non-finite from the fourth step:
    step 3 was finite after ``latest.pt`` (step 2), so that one is named and nothing else kept."""
    cfg = tiny_config(data={"synthetic_size": 16}, optim={"epochs": 6}, train={"log_every": 1, "progress": False})
    trainer = Trainer(cfg)
    poison_loss_from(trainer, 3, monkeypatch)
    folder = checkpoint.checkpoint_dir(cfg.output_dir)
    with pytest.raises(TrainingDivergedError, match=f"The last good checkpoint is {folder / 'latest.pt'}.$"):
        trainer.fit()
    assert checkpoint.load_checkpoint(folder / "latest.pt")["step"] == 2 and not (folder / "previous.pt").exists()
