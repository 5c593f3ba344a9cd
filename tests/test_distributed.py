"""Multi-process training on the CPU with gloo (2 processes), preemption and launcher configs.

One spawn of 2 ranks (module fixture) runs the step-level checks and the Trainer runs of the
resume test; torchrun launches `train.py` for the relaunch and the preemption tests. The
`resized` fixture runs the default augmentation on 1, 2 and 3 ranks (one process, a spawn of
2, a spawn of 3) for the tests of resuming on another number of ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from msn import checkpoint, distributed
from msn.config import ConfigError, load_config
from msn.losses import msn_loss
from msn.train import Trainer
from msn.train.preemption import EXIT_PREEMPTED

from conftest import ROOT, TINY_OVERRIDES, assert_same_state, compose_config, tiny_config_dict
from dist_helpers import assert_same_run, fit_worker, free_port, record_keep_indices, step_worker, torchrun

WORLD = 2
#: 2 ranks x 4 images = the single-process batch of 8; per-sample augmentation is a function
#: of (seed, epoch, index) and the masks of (seed, step) split by rank
#: (:class:`msn.masking.AnchorMasks`), so both runs see the same views and masks.
#: The step-level comparisons (DDP against one process, sum against mean, checkpointed
#: against plain) are equal in exact arithmetic and run in float64 (``precision=fp64``):
#: rounding (~1e-16 of magnitudes <= 1, a few thousand operations deep, amplified at most
#: lr / eps = 1e5 by Adam's first step on a mathematically zero gradient) stays below 1e-9
#: on any CPU, so 1e-9 is the tolerance (:data:`EXACT`). In float32 the same noise turns
#: into +-lr steps of biases that feed a batch norm, whatever the tolerance.
STEP_SECTIONS = {"precision": "fp64", "data": {"augment": "per_sample"},
                 "optim": {"batch_size": 8, "epochs": 2, "warmup_epochs": 1}}
EXACT = 1e-9
RESUME_OVERRIDES = [*TINY_OVERRIDES, "data.augment=per_sample", "precision=fp64"]


def _memax_inputs():
    generator = torch.Generator().manual_seed(3)
    batch, views, dim, k = 8, 3, 16, 8
    anchor = torch.randn(views * batch, dim, generator=generator, dtype=torch.float64)
    anchor.view(views, batch, dim)[:, : batch // 2] += 2.0  # rank 0's images differ from rank 1's
    return {"anchor": anchor, "target": torch.randn(batch, dim, generator=generator, dtype=torch.float64),
            "prototypes": torch.randn(k, dim, generator=generator, dtype=torch.float64)}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run :func:`dist_helpers.step_worker` on 2 ranks; returns (results per rank, tmp dir)."""
    tmp = tmp_path_factory.mktemp("ddp")
    tiny = tiny_config_dict(tmp / "step", **STEP_SECTIONS)
    runs = [OmegaConf.to_container(compose_config(*RESUME_OVERRIDES, f"output_dir={tmp / name}", f"train.max_steps={steps}"),
                                   resolve=True)
            for name, steps in (("straight", 8), ("split", 3), ("boundary", 4), ("boundary", 8))]
    mp.spawn(step_worker, args=(WORLD, free_port(), str(tmp), tiny, _memax_inputs(), runs), nprocs=WORLD, join=True)
    shutil.copy(tmp / "split/checkpoints/latest.pt", tmp / "split_step3.pt")  # before the relaunch continues it
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)], tmp


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The single-process step on the global batch of 8."""
    cfg = load_config(tiny_config_dict(tmp_path_factory.mktemp("single") / "run", **STEP_SECTIONS))
    trainer = Trainer(cfg)
    trainer.sampler.set_position(0, 0)
    batch = next(iter(trainer.loader))
    stats = trainer.train_step(batch)
    return {"stats": stats, "anchor": batch.anchor, "encoder": trainer.msn_step.network.state_dict(),
            "target": trainer.msn_step.target.state_dict(), "prototypes": trainer.msn_step.prototypes.weight.detach(),
            "proto_grad": trainer.msn_step.prototypes.weight.grad,
            "grads": {k: p.grad for k, p in trainer.msn_step.network.named_parameters() if p.grad is not None}}


def _assert_states_close(a: dict, b: dict, atol: float = EXACT) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0.0, atol=atol, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------- (1) one step
def test_ddp_step_equals_single_process_step_on_the_global_batch(two_ranks, single):
    ranks, _ = two_ranks
    # each rank loaded its contiguous half of the global batch
    torch.testing.assert_close(torch.cat([r["ddp"]["anchor"] for r in ranks]), single["anchor"], rtol=0, atol=0)
    # the logged loss (mean over ranks) and ME-MAX (global) equal the single-process values
    loss = sum(r["ddp"]["stats"][0] for r in ranks) / WORLD
    assert single["encoder"]["head.fc1.weight"].dtype == torch.float64
    torch.testing.assert_close(loss, single["stats"][0], rtol=0, atol=EXACT)
    for r in ranks:
        torch.testing.assert_close(r["ddp"]["stats"][2], single["stats"][2], rtol=0, atol=EXACT)
    # DDP-averaged gradients (SyncBN backward included) and the all-reduced prototype gradient
    for r in ranks:
        _assert_states_close(r["ddp"]["grads"], single["grads"])
        torch.testing.assert_close(r["ddp"]["proto_grad"], single["proto_grad"], rtol=0, atol=EXACT)
    # updated online, target (EMA) and prototypes: equal to single process, identical on every rank
    for r in ranks:
        _assert_states_close(r["ddp"]["encoder"], single["encoder"])
        _assert_states_close(r["ddp"]["target"], single["target"])
        torch.testing.assert_close(r["ddp"]["prototypes"], single["prototypes"], rtol=0, atol=EXACT)
    for key in ("encoder", "target"):
        _assert_states_close(ranks[0]["ddp"][key], ranks[1]["ddp"][key], atol=0)


def test_shared_mask_is_one_subset_for_the_global_batch(two_ranks, tmp_path):
    """``mask.shared``: every rank drops the same tokens (the reference seeds every rank alike),
    the same subset a single process uses for the whole global batch."""
    ranks, _ = two_ranks
    keeps = [r["shared_mask"]["keep"] for r in ranks]
    assert all(len(k) == 1 for k in keeps)
    rank0, rank1 = keeps[0][0], keeps[1][0]
    assert rank0.shape == (4, 9) and (rank0 == rank0[0]).all()
    assert torch.equal(rank0, rank1)
    trainer = Trainer(load_config(tiny_config_dict(tmp_path / "one", **STEP_SECTIONS, mask={"ratio": 0.5, "shared": True})))
    trainer.sampler.set_position(0, 0)
    seen = record_keep_indices(trainer)
    trainer.train_step(next(iter(trainer.loader)))
    assert seen[0].shape == (8, 9) and torch.equal(seen[0][:4], rank0) and (seen[0] == rank0[0]).all()
    # the per-image default draws different subsets on the two ranks
    assert not torch.equal(ranks[0]["ddp"]["keep"][0], ranks[1]["ddp"]["keep"][0])


def test_sync_bn_is_what_makes_the_step_match(two_ranks, single):
    ranks, _ = two_ranks
    local_bn = sum(r["no_sync_bn"]["stats"][0] for r in ranks) / WORLD
    assert abs(float(local_bn - single["stats"][0])) > 1e-4
    assert ranks[0]["no_sync_bn"]["encoder"]["head.bn1.running_mean"].ne(ranks[1]["no_sync_bn"]["encoder"]["head.bn1.running_mean"]).any()


def test_prototype_gradient_mean_by_default_sum_like_the_reference(two_ranks):
    ranks, _ = two_ranks
    for r in ranks:
        torch.testing.assert_close(r["sum"]["proto_grad"], WORLD * r["ddp"]["proto_grad"], rtol=0, atol=EXACT)


def test_grad_checkpointing_under_ddp_gives_the_same_gradients(two_ranks):
    ranks, _ = two_ranks
    for r in ranks:
        _assert_states_close(r["checkpointed"]["grads"], r["ddp"]["grads"])
        _assert_states_close(r["checkpointed"]["encoder"], r["ddp"]["encoder"])


# ---------------------------------------------------------------------------- (2) ME-MAX
@pytest.mark.parametrize("result, prior", [("memax", {}), ("power_law", {"prior": "power_law", "prior_exponent": 0.25})],
                         ids=["uniform (ME-MAX)", "power law (PMSN)"])
def test_memax_under_ddp_is_the_global_batch_value_not_the_local_one(two_ranks, result, prior):
    """ME-MAX, and PMSN's KL(pbar || power law), on 2 ranks = the single-process term on the
    concatenated batch (value, loss and prototype gradient), not rank 0's rows alone."""
    ranks, _ = two_ranks
    inputs = _memax_inputs()
    protos = inputs["prototypes"].clone().requires_grad_(True)
    full = msn_loss(inputs["anchor"], inputs["target"], protos, **prior)
    full.memax.backward()
    for r in ranks:
        torch.testing.assert_close(r[result]["memax"], full.memax.detach(), rtol=0, atol=EXACT)
        # identity backward + averaging over ranks = the exact gradient of the global term
        torch.testing.assert_close(r[result]["proto_grad_mean"], protos.grad, rtol=0, atol=EXACT)
    torch.testing.assert_close(sum(r[result]["loss"] for r in ranks) / WORLD, full.loss.detach(), rtol=0, atol=EXACT)
    # the peer bug: the regulariser of rank 0's rows alone
    batch, local = inputs["target"].shape[0], inputs["target"].shape[0] // WORLD
    rows = torch.cat([torch.arange(v * batch, v * batch + local) for v in range(3)])
    local_only = msn_loss(inputs["anchor"][rows], inputs["target"][:local], inputs["prototypes"], **prior).memax
    assert abs(float(local_only.detach() - full.memax.detach())) > 1e-2


# ---------------------------------------------------------------------------- (3) resume
def test_two_process_run_stopped_and_relaunched_ends_equal_to_uninterrupted(two_ranks):
    _, tmp = two_ranks
    assert checkpoint.load_checkpoint(tmp / "split/checkpoints/latest.pt")["step"] == 3
    # the ranks that ran steps 1-3 are gone; relaunch through the command line
    proc = torchrun(*RESUME_OVERRIDES, f"output_dir={tmp / 'split'}", "train.max_steps=8")
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-3000:]
    a = checkpoint.load_checkpoint(tmp / "straight/checkpoints/latest.pt")
    b = checkpoint.load_checkpoint(tmp / "split/checkpoints/latest.pt")
    assert a["step"] == b["step"] == 8 and b["extra"]["world_size"] == WORLD and len(b["rng_per_rank"]) == WORLD
    # every tensor of the checkpoint, the RNG states of both ranks included
    assert_same_state(a, b)
    assert a["rng_per_rank"][0]["torch"].ne(a["rng_per_rank"][1]["torch"]).any()  # per-rank streams
    steps = [json.loads(line)["step"] for line in open(tmp / "split/metrics.jsonl")]
    assert steps == [2, 3, 4, 6, 8]


def test_two_process_run_resumed_at_an_epoch_boundary_ends_equal_to_uninterrupted(two_ranks):
    _, tmp = two_ranks
    a = checkpoint.load_checkpoint(tmp / "straight/checkpoints/latest.pt")
    b = checkpoint.load_checkpoint(tmp / "boundary/checkpoints/latest.pt")
    assert a["step"] == b["step"] == 8
    assert_same_state(a, b)


def test_world_size_change_on_resume_keeps_the_data_order(two_ranks, tmp_path, caplog):
    """The 2-process checkpoint of step 3 continued by ONE process (same global batch) ends
    where the uninterrupted 2-process run ends (SyncBN + per-sample augmentation)."""
    _, tmp = two_ranks
    raw = compose_config(*RESUME_OVERRIDES, f"output_dir={tmp_path / 'one'}", "train.max_steps=8",
                   f"resume={tmp / 'split_step3.pt'}")
    with caplog.at_level("WARNING"):
        Trainer(load_config(raw)).fit()
    assert "resuming a run of 2 process(es) with 1" in caplog.text
    a = checkpoint.load_checkpoint(tmp / "straight/checkpoints/latest.pt")
    b = checkpoint.load_checkpoint(tmp_path / "one/checkpoints/latest.pt")
    assert b["step"] == 8 and b["extra"]["world_size"] == 1
    _assert_states_close(a["encoder"], b["encoder"])  # float64: equal in exact arithmetic
    torch.testing.assert_close(a["prototypes"], b["prototypes"], rtol=0, atol=EXACT)


# ---------------------------------------------------------------------------- (3b) other world sizes
#: The default augmentation (``data.augment=batched``) in float64, global batch 12 (1, 2 or 3
#: ranks of 12, 6 or 4 images), 36 images: 3 steps per epoch, 6 in the run.
RESIZE_OVERRIDES = [*TINY_OVERRIDES, "precision=fp64", "optim.batch_size=12", "data.synthetic_size=36"]
RESIZE_STEPS = 6


def _resize_config(out, steps: int, resume: str = "auto") -> dict:
    return OmegaConf.to_container(compose_config(*RESIZE_OVERRIDES, f"output_dir={out}", f"train.max_steps={steps}",
                                                 f"resume={resume}"), resolve=True)


def _fit(composed: dict) -> None:
    Trainer(load_config(composed)).fit()


@pytest.fixture(scope="module")
def resized(tmp_path_factory):
    """Runs of :data:`RESIZE_STEPS` steps with the default augmentation: uninterrupted on 2
    ranks, and stopped then resumed on another number of ranks (2 -> 1 and 2 -> 3 after step 2,
    1 -> 2 after step 4, both mid-epoch). Returns the tmp dir."""
    tmp = tmp_path_factory.mktemp("resize")
    _fit(_resize_config(tmp / "one_4", 4))  # one process, steps 1-4
    two = [_resize_config(tmp / "two_straight", RESIZE_STEPS), _resize_config(tmp / "two_2", 2),
           _resize_config(tmp / "one_to_two", RESIZE_STEPS, str(tmp / "one_4/checkpoints/latest.pt"))]
    mp.spawn(fit_worker, args=(2, free_port(), two), nprocs=2, join=True)
    step2 = str(tmp / "two_2/checkpoints/latest.pt")
    _fit(_resize_config(tmp / "two_to_one", RESIZE_STEPS, step2))
    mp.spawn(fit_worker, args=(3, free_port(), [_resize_config(tmp / "two_to_three", RESIZE_STEPS, step2)]),
             nprocs=3, join=True)
    return tmp


@pytest.mark.slow
@pytest.mark.parametrize("run, worlds", [("two_to_one", (2, 1)), ("one_to_two", (1, 2)), ("two_to_three", (2, 3))],
                         ids=["2 -> 1 ranks", "1 -> 2 ranks", "2 -> 3 ranks"])
def test_run_resumed_on_another_number_of_ranks_ends_where_the_uninterrupted_run_ends(resized, run, worlds):
    """Default augmentation, float64: a run stopped mid-epoch and resumed on another number of
    ranks ends with every tensor of the uninterrupted 2-rank run's checkpoint (weights, target
    encoder, prototypes, AdamW state, batch-norm statistics, rank 0's RNG state), up to the
    order of the cross-rank sums (:data:`dist_helpers.RESIZE_TOL`, derived there)."""
    a = checkpoint.load_checkpoint(resized / "two_straight/checkpoints/latest.pt")
    b = checkpoint.load_checkpoint(resized / run / "checkpoints/latest.pt")
    assert a["step"] == b["step"] == RESIZE_STEPS and a["extra"]["world_size"] == 2
    assert b["extra"]["world_size"] == worlds[1] and len(b["rng_per_rank"]) == worlds[1]
    compared, largest = assert_same_run(a, b)
    print(f"{run}: {compared} tensors, largest difference {largest:.3g} of its kind's scale")
    assert compared > 100  # every weight, buffer, moment and rank 0's RNG state
    # not vacuous: the run moved every group of weights from its start
    start = checkpoint.load_checkpoint(resized / "two_2/checkpoints/latest.pt")
    for key, moved in (("encoder", 1e-3), ("prototypes", 1e-3), ("target_encoder", 1e-5)):  # EMA: 1 - m = 0.004
        before, after = start[key], a[key]
        if key != "prototypes":
            before, after = before["head.fc3.weight"], after["head.fc3.weight"]
        assert (after - before).abs().max() > moved, key


# ---------------------------------------------------------------------------- (4) preemption
def _wait_for_metrics(path, proc, timeout=120.0):
    start = time.time()
    while not (path.is_file() and path.read_text().strip()):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() - start < timeout, "no metrics written"
        time.sleep(0.05)


LONG_RUN = [*TINY_OVERRIDES, "data.synthetic_size=512", "train.log_every=1"]  # 64 steps per epoch


def test_sigterm_single_process_checkpoints_and_exits_75(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, HYDRA_FULL_ERROR="0", WANDB_MODE="disabled")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *LONG_RUN, f"output_dir={out}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_metrics(out / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED == 75, text[-3000:]
    line = [x for x in text.splitlines() if x.startswith("preempted: stopped by SIGTERM at step")]
    assert line, text[-3000:]
    step = int(line[0].split("at step ")[1].split(",")[0])
    assert 1 <= step < 64  # before the first end-of-epoch checkpoint: this one is the preemption's
    assert checkpoint.load_checkpoint(out / "checkpoints/latest.pt")["step"] == step
    assert not (out / "checkpoints/epoch_0001.pt").exists()


def test_sigterm_to_a_two_process_torchrun_job_checkpoints_on_every_rank(tmp_path):
    out = tmp_path / "run"
    # Slurm signals every process of the step: send SIGTERM to torchrun's whole session
    proc = torchrun(*LONG_RUN, f"output_dir={out}", start_new_session=True)
    _wait_for_metrics(out / "metrics.jsonl", proc)
    os.killpg(proc.pid, signal.SIGTERM)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0  # torchrun itself reports the signal (documented)
    line = [x for x in text.splitlines() if x.startswith("preempted: stopped by SIGTERM at step")]
    assert len(line) == 1, text[-3000:]  # rank 0 reports, after both ranks agreed on the step
    step = int(line[0].split("at step ")[1].split(",")[0])
    assert 1 <= step < 64
    assert checkpoint.load_checkpoint(out / "checkpoints/latest.pt")["step"] == step


# ---------------------------------------------------------------------------- set-up, config
def test_slurm_environment_maps_to_torch_distributed():
    assert distributed.expand_hostlist("gpu[001-003,7],cpu1,a[1-2]b[5,6]") == [
        "gpu001", "gpu002", "gpu003", "gpu7", "cpu1", "a1b5", "a1b6", "a2b5", "a2b6"]
    env = {"SLURM_PROCID": "5", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8",
           "SLURM_LOCALID": "1", "SLURM_STEP_NODELIST": "node[12-15]", "SLURM_JOB_ID": "4242"}
    mapped = distributed.slurm_env(env)
    assert mapped == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node12",
                      "MASTER_PORT": str(20_000 + 4242)}
    assert distributed.slurm_env({**env, "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1"}) == {}
    batch_script = {k: v for k, v in env.items() if k != "SLURM_STEP_ID"}  # sbatch shell, not an srun task
    assert distributed.slurm_env(batch_script) == {}


def test_slurm_launcher_config_composes():
    cfg = compose_config("hydra/launcher=slurm", "hydra.launcher.nodes=2", "hydra.launcher.gpus_per_node=4",
                   "hydra.launcher.partition=gpu", hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 4, 4)
    assert launcher.partition == "gpu" and launcher.timeout_min > 0 and launcher.additional_parameters.requeue is True
    assert cfg.hydra.runtime.choices["hydra/launcher"] == "slurm"
    stock = compose_config("hydra/launcher=submitit_slurm", "hydra.launcher.tasks_per_node=8", hydra_config=True)
    assert stock.hydra.launcher.tasks_per_node == 8


def test_new_keys_validate(tmp_path):
    cfg = load_config(tiny_config_dict(tmp_path))
    assert cfg.model.sync_bn and cfg.loss.proto_grad_reduce == "mean" and cfg.dist.backend == "auto"
    for section, values, key in (("loss", {"proto_grad_reduce": "max"}, "loss.proto_grad_reduce"),
                                 ("dist", {"backend": "mpi"}, "dist.backend"),
                                 ("dist", {"preempt_signals": ["USR3"]}, "dist.preempt_signals"),
                                 ("dist", {"requeue": "always"}, "dist.requeue")):
        with pytest.raises(ConfigError, match=key):
            load_config(tiny_config_dict(tmp_path, **{section: values}))
    with pytest.raises(ConfigError, match="not divisible by the world size 3"):
        load_config(tiny_config_dict(tmp_path), world_size=3)
