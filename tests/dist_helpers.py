"""Helpers of tests/test_distributed.py: process-group workers (run by torch.multiprocessing
spawn, so they live in an importable module) and free-port / launch utilities."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(*args: str, nproc: int = 2, port: int | None = None, **popen) -> subprocess.Popen:
    """``torchrun --nproc_per_node nproc --master_port <free> train.py args...`` (not waited for)."""
    torchrun_bin = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun_bin), f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={port or free_port()}", str(ROOT / "train.py"), *args]
    env = dict(os.environ, HYDRA_FULL_ERROR="0", WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen)


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # what torchrun sets (OMP_NUM_THREADS=1), so results match its runs
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _snapshot(trainer) -> dict:
    return {
        "encoder": {k: v.detach().clone() for k, v in trainer.network.state_dict().items()},
        "target": {k: v.detach().clone() for k, v in trainer.target.state_dict().items()},
        "prototypes": trainer.prototypes.weight.detach().clone(),
        "grads": {k: p.grad.detach().clone() for k, p in trainer.network.named_parameters() if p.grad is not None},
        "proto_grad": trainer.prototypes.weight.grad.detach().clone(),
    }


def record_keep_indices(trainer) -> list:
    """Record the ``keep_indices`` of every online forward of ``trainer`` (into the list returned)."""
    seen, backbone = [], trainer.network.backbone
    original = backbone.forward

    def spy(images, keep_indices=None):
        if keep_indices is not None:
            seen.append(keep_indices.clone())
        return original(images, keep_indices)

    backbone.forward = spy
    return seen


def step_worker(rank: int, world: int, port: int, out: str, tiny: dict, memax_inputs: dict,
                cli_runs: list) -> None:
    """One training step per variant on this rank's shard, the ME-MAX check, and Trainer runs
    (``cli_runs``: composed config dicts) of the resume test; results go to
    ``out/rank<r>.pt``."""
    _init(rank, world, port)
    from msn.config import load_config
    from msn.losses import msn_loss
    from msn.train import Trainer

    def config(**sections):
        cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in tiny.items()}
        for section, values in sections.items():
            cfg[section] = {**cfg.get(section, {}), **values}
        return load_config(cfg, world_size=world)

    results = {}
    for name, sections in {
        "ddp": {},
        "checkpointed": {"model": {"grad_checkpointing": True}},
        "sum": {"loss": {"proto_grad_reduce": "sum"}},
        "no_sync_bn": {"model": {"sync_bn": False}},
        "shared_mask": {"mask": {"shared": True}},
    }.items():
        trainer = Trainer(config(**sections))
        trainer.sampler.set_position(0, 0)
        batch = next(iter(trainer.loader))
        keeps = record_keep_indices(trainer)
        stats = trainer.train_step(batch)
        results[name] = {"stats": stats, "anchor": batch.anchor.clone(), "keep": keeps, **_snapshot(trainer)}

    # ME-MAX on this rank's rows of fixed inputs (view-major: rank r holds rows r*b..(r+1)*b of every view)
    anchor, target, prototypes = memax_inputs["anchor"], memax_inputs["target"], memax_inputs["prototypes"]
    views = anchor.shape[0] // target.shape[0]
    local = target.shape[0] // world
    rows = torch.cat([torch.arange(v * target.shape[0] + rank * local, v * target.shape[0] + (rank + 1) * local)
                      for v in range(views)])
    protos = prototypes.clone().requires_grad_(True)
    out_loss = msn_loss(anchor[rows], target[rank * local:(rank + 1) * local], protos)
    out_loss.memax.backward()
    grad = protos.grad.clone()
    dist.all_reduce(grad)
    results["memax"] = {"memax": out_loss.memax.detach(), "loss": out_loss.loss.detach(),
                        "proto_grad_mean": grad / world}
    # PMSN's power-law KL term on the same rows: its mean prediction is the same all-reduce
    protos = prototypes.clone().requires_grad_(True)
    out_loss = msn_loss(anchor[rows], target[rank * local:(rank + 1) * local], protos, prior="power_law",
                        prior_exponent=0.25)
    out_loss.memax.backward()
    grad = protos.grad.clone()
    dist.all_reduce(grad)
    results["power_law"] = {"memax": out_loss.memax.detach(), "loss": out_loss.loss.detach(),
                            "proto_grad_mean": grad / world}

    for composed in cli_runs:
        Trainer(load_config(composed, world_size=world)).fit()
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
