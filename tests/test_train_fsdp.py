"""``dist.strategy=fsdp2``: sharded training on 2 gloo ranks on the CPU, against DDP.

One spawn of 2 ranks (module fixture) runs short ``Trainer.fit`` runs of the tiny model under
DDP and FSDP2 and writes their ``latest.pt``; the tests compare those files. Every
comparison is between computations that are equal in exact arithmetic and runs in float64
(``precision=fp64``): they differ only in the order of reductions (DDP's all-reduce against
FSDP2's reduce-scatter of the same gradients, per-shard against whole-tensor norms, one
process against two). Rounding of ~1e-16 relative, a few thousand operations deep, amplified
at most lr / eps = 1e5 by AdamW (docs in tests/test_distributed.py), stays below 1e-9:
:data:`EXACT`. Measured: FSDP2 and DDP agree to the bit on 2 ranks (a sum of two terms and a
halving round alike in any order), one process differs from two by ~7e-12. Runs that take
the same path in the same order (a resume on the same ranks and strategy, recomputed
activations) must match to the bit. The ``resized`` fixture (one process, 3 ranks, then 2)
resumes FSDP2 runs of the default augmentation on another number of ranks, uneven shards
included (:data:`dist_helpers.RESIZE_TOL`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from msn import checkpoint
from msn.config import ConfigError, load_config
from msn.train import Trainer

from conftest import tiny_config_dict
from dist_helpers import _init, assert_same_run, fit_worker, free_port

WORLD = 2
EXACT = 1e-9
#: 32 images, global batch 8: 4 steps per epoch (the runs stop at 3 and 4)
SECTIONS = {"precision": "fp64", "data": {"augment": "per_sample"},
            "optim": {"batch_size": 8, "epochs": 2, "warmup_epochs": 1}}
WEIGHTS = ("encoder", "target_encoder", "prototypes", "optimizer")


def _config(out: Path, steps: int, world: int = WORLD, **sections) -> dict:
    cfg = tiny_config_dict(out, **SECTIONS)
    for section, values in {"train": {"max_steps": steps}, **sections}.items():
        cfg[section] = {**cfg.get(section, {}), **values} if isinstance(values, dict) else values
    return cfg


def _fit(out: Path, steps: int, strategy: str, world: int = WORLD, probe=None, **sections) -> None:
    Trainer(load_config(_config(out, steps, dist={"strategy": strategy}, **sections), world_size=world),
            probe=probe).fit()


#: The live monitor on the tiny data (32 images): every 2 steps, 16 + 16 images.
MONITOR = {"enabled": True, "every": 2, "train_images": 16, "test_images": 16, "shots": [1, 2], "splits": 2, "knn_k": 4}


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    """The runs of the module fixture, on this rank; rank 0 keeps copies of the step-3 files."""
    _init(rank, world, port)
    tmp = Path(tmp)
    _fit(tmp / "ddp", 3, "ddp")
    _fit(tmp / "fsdp2", 3, "fsdp2")
    _fit(tmp / "ddp_clip", 3, "ddp", optim={"clip_grad": 0.01})  # clipping active at every step
    _fit(tmp / "fsdp2_clip", 3, "fsdp2", optim={"clip_grad": 0.01})
    checkpointed, calls = torch.utils.checkpoint.checkpoint, []

    def counting(*args, **kwargs):
        calls.append(1)
        return checkpointed(*args, **kwargs)

    torch.utils.checkpoint.checkpoint = counting  # what timm's checkpoint_seq calls
    try:
        _fit(tmp / "fsdp2_ckpt", 3, "fsdp2", model={"grad_checkpointing": True})
    finally:
        torch.utils.checkpoint.checkpoint = checkpointed
    (tmp / f"checkpoint_calls{rank}.txt").write_text(str(len(calls)))
    from msn.eval.monitor import LowShotProbe

    _fit(tmp / "ddp_monitor", 3, "ddp", probe=LowShotProbe.from_config, monitor=MONITOR)
    _fit(tmp / "fsdp2_monitor", 3, "fsdp2", probe=LowShotProbe.from_config, monitor=MONITOR)
    if rank == 0:
        for name in ("ddp", "fsdp2"):
            shutil.copy(tmp / name / "checkpoints/latest.pt", tmp / f"{name}_step3.pt")
    dist.barrier()
    _fit(tmp / "straight", 4, "fsdp2")  # uninterrupted
    _fit(tmp / "fsdp2", 4, "fsdp2")  # resume=auto from its step-3 latest.pt, same ranks and strategy
    _fit(tmp / "fsdp2_as_ddp", 4, "ddp", resume=str(tmp / "fsdp2_step3.pt"))
    _fit(tmp / "ddp_as_fsdp2", 4, "fsdp2", resume=str(tmp / "ddp_step3.pt"))
    _fit(tmp / "sum", 1, "fsdp2", loss={"proto_grad_reduce": "sum"}, optim={"clip_grad": 0.0})
    _fit(tmp / "mean", 1, "fsdp2", optim={"clip_grad": 0.0})
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("fsdp2")
    mp.spawn(_worker, args=(WORLD, free_port(), str(tmp)), nprocs=WORLD, join=True)
    return tmp


def _load(path: Path) -> dict:
    return checkpoint.load_checkpoint(path)


def _assert_close(a, b, atol: float, where: str = "") -> int:
    """Same tree (keys, types, shapes, dtypes), tensors within ``atol``; returns tensors compared."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        return sum(_assert_close(a[k], b[k], atol, f"{where}/{k}") for k in a)
    if isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        return sum(_assert_close(x, y, atol, f"{where}/{i}") for i, (x, y) in enumerate(zip(a, b)))
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, f"{where}: dtype/shape"
        torch.testing.assert_close(a, b, rtol=0.0, atol=atol, msg=lambda m: f"{where}: {m}")
        return 1
    assert a == b, f"{where}: {a!r} != {b!r}"
    return 0


def _assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert a["step"] == b["step"]
    compared = _assert_close({k: a[k] for k in WEIGHTS}, {k: b[k] for k in WEIGHTS}, atol)
    assert compared > 50  # every weight, buffer and AdamW moment


# ---------------------------------------------------------------------------- (1) FSDP2 = DDP
def test_three_fsdp2_steps_equal_three_ddp_steps_in_the_same_checkpoint_format(runs):
    ddp, fsdp2 = _load(runs / "ddp_step3.pt"), _load(runs / "fsdp2_step3.pt")
    assert fsdp2.keys() == ddp.keys()
    assert ddp["encoder"]["head.fc1.weight"].dtype == torch.float64
    # full tensors on the CPU, optimiser state keyed by index like optimizer.state_dict()
    assert all(t.device.type == "cpu" for t in fsdp2["encoder"].values())
    assert sorted(fsdp2["optimizer"]["state"]) == list(range(len(fsdp2["optimizer"]["state"])))
    _assert_same_weights(ddp, fsdp2, EXACT)
    # a step moves the weights, and the target (EMA) is not the online network
    step4 = _load(runs / "straight/checkpoints/latest.pt")
    assert not torch.equal(step4["encoder"]["head.fc3.weight"], fsdp2["encoder"]["head.fc3.weight"])
    assert not torch.equal(fsdp2["target_encoder"]["head.fc3.weight"], fsdp2["encoder"]["head.fc3.weight"])


def test_fsdp2_prototype_gradient_sum_is_world_size_times_the_mean(runs):
    mean, total = _load(runs / "mean/checkpoints/latest.pt"), _load(runs / "sum/checkpoints/latest.pt")
    # AdamW's first moment after one step from zero is (1 - beta1) * gradient
    index = max(mean["optimizer"]["state"])  # the prototypes: the last parameter
    assert mean["optimizer"]["state"][index]["exp_avg"].shape == mean["prototypes"].shape
    torch.testing.assert_close(total["optimizer"]["state"][index]["exp_avg"],
                               WORLD * mean["optimizer"]["state"][index]["exp_avg"], rtol=0, atol=EXACT)


def test_fsdp2_clips_by_the_global_gradient_norm(runs):
    ddp, fsdp2 = _load(runs / "ddp_clip/checkpoints/latest.pt"), _load(runs / "fsdp2_clip/checkpoints/latest.pt")
    _assert_same_weights(ddp, fsdp2, EXACT)
    # the clip changed the AdamW moments (a per-shard norm would have clipped differently)
    unclipped = _load(runs / "ddp_step3.pt")["optimizer"]["state"][0]["exp_avg"]
    assert (fsdp2["optimizer"]["state"][0]["exp_avg"] - unclipped).abs().max() > 1e-3 * unclipped.abs().max()


# ---------------------------------------------------------------------------- (2) resume
def test_fsdp2_checkpoint_resumes_on_two_ranks_like_the_uninterrupted_run(runs):
    straight = _load(runs / "straight/checkpoints/latest.pt")
    assert straight["step"] == 4
    _assert_same_weights(straight, _load(runs / "fsdp2/checkpoints/latest.pt"), 0.0)
    # under the other strategy, in both directions
    _assert_same_weights(straight, _load(runs / "fsdp2_as_ddp/checkpoints/latest.pt"), EXACT)
    _assert_same_weights(straight, _load(runs / "ddp_as_fsdp2/checkpoints/latest.pt"), EXACT)


def test_fsdp2_checkpoint_resumes_on_one_process_like_the_uninterrupted_run(runs, tmp_path):
    cfg = load_config(_config(tmp_path / "one", 4, resume=str(runs / "fsdp2_step3.pt"), dist={"strategy": "fsdp2"}))
    trainer = Trainer(cfg)
    trainer.fit()
    resumed = _load(tmp_path / "one/checkpoints/latest.pt")
    assert resumed["extra"]["world_size"] == 1
    _assert_same_weights(_load(runs / "straight/checkpoints/latest.pt"), resumed, EXACT)


# ---------------------------------------------------------------------------- (2b) other world sizes
#: The default augmentation (``data.augment=batched``) in float64, global batch 12 over 1, 2 or
#: 3 ranks (on 3, every dim 0 not divisible by 3 is sharded unevenly: the width 32 as 11, 11, 10,
#: the 8 prototypes as 3, 3, 2), 36 images: 3 steps per epoch, 6 in the run.
RESIZE = {"precision": "fp64", "data": {"synthetic_size": 36}, "optim": {"batch_size": 12, "epochs": 2, "warmup_epochs": 1},
          "dist": {"strategy": "fsdp2"}}
RESIZE_STEPS = 6


def _resize_config(out: Path, steps: int, resume: str = "auto") -> dict:
    cfg = tiny_config_dict(out, **RESIZE)
    cfg["train"] = {**cfg["train"], "max_steps": steps}
    cfg["resume"] = resume
    return cfg


@pytest.fixture(scope="module")
def resized(tmp_path_factory) -> Path:
    """FSDP2 runs of :data:`RESIZE_STEPS` steps: uninterrupted on 2 ranks, and resumed on 2
    ranks from one process's step 4 and from 3 ranks' step 2 (both mid-epoch)."""
    tmp = tmp_path_factory.mktemp("fsdp2_resize")
    Trainer(load_config(_resize_config(tmp / "one_4", 4))).fit()  # one process: FSDP2 shards nothing
    mp.spawn(fit_worker, args=(3, free_port(), [_resize_config(tmp / "three_2", 2)]), nprocs=3, join=True)
    runs = [_resize_config(tmp / "straight", RESIZE_STEPS),
            _resize_config(tmp / "one_to_two", RESIZE_STEPS, str(tmp / "one_4/checkpoints/latest.pt")),
            _resize_config(tmp / "three_to_two", RESIZE_STEPS, str(tmp / "three_2/checkpoints/latest.pt"))]
    mp.spawn(fit_worker, args=(WORLD, free_port(), runs), nprocs=WORLD, join=True)
    return tmp


@pytest.mark.slow
@pytest.mark.parametrize("run, saved_on", [("one_to_two", 1), ("three_to_two", 3)], ids=["1 -> 2 ranks", "3 -> 2 ranks"])
def test_fsdp2_run_resumed_from_another_number_of_ranks_ends_where_the_uninterrupted_run_ends(resized, run, saved_on):
    """A checkpoint of 1 process, or of 3 ranks with uneven shards, resumed under FSDP2 on 2
    ranks ends with every tensor of the uninterrupted 2-rank run (weights, target, prototypes,
    AdamW state, rank 0's RNG state), up to the order of the cross-rank sums
    (:data:`dist_helpers.RESIZE_TOL`: the reduce-scatter's in place of the all-reduce's)."""
    straight = _load(resized / "straight/checkpoints/latest.pt")
    resumed = _load(resized / run / "checkpoints/latest.pt")
    saved = _load(resized / ("one_4" if saved_on == 1 else "three_2") / "checkpoints/latest.pt")
    assert saved["extra"]["world_size"] == saved_on and resumed["extra"]["world_size"] == WORLD
    assert straight["step"] == resumed["step"] == RESIZE_STEPS
    compared, largest = assert_same_run(straight, resumed)
    print(f"{run}: {compared} tensors, largest difference {largest:.3g} of its kind's scale")
    assert compared > 100
    # not vacuous: the resumed steps moved the weights
    assert (resumed["encoder"]["head.fc3.weight"] - saved["encoder"]["head.fc3.weight"]).abs().max() > 1e-4


# ---------------------------------------------------------------------------- (3) checkpointing
def test_grad_checkpointing_under_fsdp2_gives_the_same_steps(runs):
    for rank in range(WORLD):  # recomputed at least once per online forward (timm's checkpoint_seq)
        assert int((runs / f"checkpoint_calls{rank}.txt").read_text()) >= 3 * 2
    _assert_same_weights(_load(runs / "fsdp2_step3.pt"), _load(runs / "fsdp2_ckpt/checkpoints/latest.pt"), 0.0)


# ---------------------------------------------------------------------------- (4) config
def test_live_monitor_under_fsdp2_scores_like_ddp_and_leaves_the_run_unchanged(runs):
    """The monitor's forward is a collective under FSDP2 (every rank runs it on the same
    images): its values equal DDP's (the same target weights, float64), and the run's
    checkpoint equals the unmonitored FSDP2 run's to the bit."""
    import json

    records = {name: [json.loads(line) for line in open(runs / name / "metrics.jsonl")]
               for name in ("ddp_monitor", "fsdp2_monitor")}
    monitored = {name: [r for r in rows if "monitor/knn_top1" in r] for name, rows in records.items()}
    assert [r["step"] for r in monitored["fsdp2_monitor"]] == [2, 3]
    for a, b in zip(monitored["ddp_monitor"], monitored["fsdp2_monitor"]):
        for key in ("monitor/knn_top1", "monitor/1shot", "monitor/2shot"):
            assert abs(a[key] - b[key]) <= 1e-6, (key, a[key], b[key])
    _assert_same_weights(_load(runs / "fsdp2_step3.pt"), _load(runs / "fsdp2_monitor/checkpoints/latest.pt"), 0.0)


def test_strategy_is_validated(tmp_path):
    assert load_config(tiny_config_dict(tmp_path)).dist.strategy == "ddp"
    assert load_config(tiny_config_dict(tmp_path, dist={"strategy": "fsdp2"})).dist.strategy == "fsdp2"
    with pytest.raises(ConfigError, match=r"^dist\.strategy: must be ddp or fsdp2, got 'fsdp'$"):
        load_config(tiny_config_dict(tmp_path, dist={"strategy": "fsdp"}))
