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
        "encoder": {k: v.detach().clone() for k, v in trainer.msn_step.network.state_dict().items()},
        "target": {k: v.detach().clone() for k, v in trainer.msn_step.target.state_dict().items()},
        "prototypes": trainer.msn_step.prototypes.weight.detach().clone(),
        "grads": {k: p.grad.detach().clone() for k, p in trainer.msn_step.network.named_parameters() if p.grad is not None},
        "proto_grad": trainer.msn_step.prototypes.weight.grad.detach().clone(),
    }


def record_keep_indices(trainer) -> list:
    """Record the ``keep_indices`` of every online forward of ``trainer`` (into the list returned)."""
    seen, backbone = [], trainer.msn_step.network.backbone
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


def fit_worker(rank: int, world: int, port: int, runs: list) -> None:
    """``Trainer(load_config(run, world_size=world)).fit()`` for each composed config dict of
    ``runs``, in order, on this rank (the runs of the world-size resume tests)."""
    _init(rank, world, port)
    from msn.config import load_config
    from msn.train import Trainer

    for composed in runs:
        Trainer(load_config(composed, world_size=world)).fit()
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------- runs on other world sizes
#: Checkpoint entries that differ between runs on different numbers of ranks by design: the
#: RNG states of every rank (one per rank; a rank the checkpoint did not have starts a fresh
#: stream) and the recorded world size; with ``conftest.RUN_SPECIFIC`` (the config, the wall
#: time). Rank 0's stream (``rng``) is compared.
WORLD_SPECIFIC = {("config",), ("extra", "train_seconds"), ("rng_per_rank",), ("extra", "world_size")}
#: Tolerance of :func:`assert_same_run`, relative to the largest magnitude of the tensor's kind
#: (:func:`_kind`: the weights and buffers, ~1; AdamW's first moments; its second moments), for
#: float64 runs of at most 6 steps, global batch 12, peak lr 1e-3. Images, augmentations, masks
#: and data order are the same bits on any number of ranks (tests/test_data_rank_invariance.py):
#: what is left is the order of the sums that cross ranks (DDP's all-reduce or FSDP2's
#: reduce-scatter of the gradients, SyncBN's statistics, the loss's Sinkhorn and ME-MAX sums,
#: the clipping norm), where the 12 images' terms become 1, 2 or 3 partial sums added in another
#: order. In float64 that moves a sum of n <= 36 terms (12 images x 3 views) by at most
#: n u sum|terms|, u = 2^-53 = 1.1e-16: ~4e-15 relative.
#:
#: * A weight with a real gradient inherits about that relative error (AdamW's m / sqrt(v) is
#:   scale-free): measured <= 5e-14 of the largest moment (DDP, 2 -> 1 and 2 -> 3 ranks).
#: * A weight whose gradient is zero in exact arithmetic (a bias just before a batch norm,
#:   which subtracts it again: head.fc1.bias, head.fc2.bias, and the final LayerNorm's bias that
#:   feeds fc1) has a gradient that is rounding alone, |g| <= delta = 36 u sum|terms| ~ 4e-15
#:   (the terms are O(1) at most), and AdamW turns it into steps of lr |g| / (|g| + eps)
#:   <= lr delta / eps, eps = 1e-8: such a weight is noise of up to
#:   sum_t lr_t delta / eps <= 6 x 1e-3 x 4e-7 = 2.4e-9 in each run, so two runs differ by up
#:   to 4.8e-9 there, absolute. That noise then reaches everything downstream absolutely (the
#:   batch norms' running means, the features, hence every gradient and moment, relative to
#:   the scale of their kind).
#:
#: So 1e-8 of the kind's largest magnitude, twice that worst case. Measured on this CPU: at
#: most 3.7e-11 (the noise biases, themselves ~1e-11 in every run), 1e-11 for the moments. A
#: real difference is orders above: another crop of one image, or one step more or less, moves
#: the online weights by ~lr = 1e-3 and the EMA target by ~(1 - m) lr = 4e-6.
RESIZE_TOL = 1e-8


def _kind(path: tuple) -> str | None:
    """What a checkpoint entry is compared with: ``weights`` (encoder, target, prototypes), an
    AdamW state name (``exp_avg``, ``exp_avg_sq``, ``step``), or ``None``: to the bit (the RNG
    state, the data position, the optimiser's hyperparameters)."""
    if path[0] in ("encoder", "target_encoder", "prototypes"):
        return "weights"
    if path[:2] == ("optimizer", "state"):
        return str(path[-1])
    return None


def _leaves(tree, path: tuple = ()):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, path + (key,))
    elif isinstance(tree, (list, tuple)):
        for index, value in enumerate(tree):
            yield from _leaves(value, path + (index,))
    else:
        yield path, tree


def assert_same_run(a: dict, b: dict, tol: float = RESIZE_TOL) -> tuple[int, float]:
    """``conftest.assert_same_state`` for runs on different numbers of ranks: the same tree,
    every entry but :data:`WORLD_SPECIFIC` compared, floating tensors of a :func:`_kind` within
    ``tol`` of the kind's largest magnitude, every other entry equal (tensors to the bit).
    Returns the number of tensors compared and the largest difference (relative to the scale)."""

    def kept(tree) -> dict:
        return {path: x for path, x in _leaves(tree) if not any(path[:len(s)] == s for s in WORLD_SPECIFIC)}

    left, right = kept(a), kept(b)
    assert left.keys() == right.keys(), sorted(map(str, set(left) ^ set(right)))[:5]
    scales: dict[str, float] = {}
    for path, x in left.items():
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel() and _kind(path):
            scales[_kind(path)] = max(scales.get(_kind(path), 0.0), float(x.abs().max()))
    compared, largest = 0, 0.0
    for path, x in left.items():
        y, where = right[path], "/".join(map(str, path))
        if not isinstance(x, torch.Tensor):
            assert x == y, f"{where}: {x!r} != {y!r}"
            continue
        assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape, f"{where}: dtype/shape"
        compared += 1
        if not (x.is_floating_point() and _kind(path)) or not x.numel():
            assert torch.equal(x, y), f"{where}: differs"
            continue
        error = float((x - y).abs().max()) / scales[_kind(path)]
        largest = max(largest, error)
        assert error <= tol, f"{where}: differs by {error:.3g} of the largest {_kind(path)} ({scales[_kind(path)]:.3g})"
    return compared, largest
