"""Process group set-up and the collectives used by the loss and the trainer.

Every collective reduces to a no-op with one process, so the single-process code path is the
multi-process one with ``world_size() == 1``.

Launchers (see ``docs/scaling.md``):

* ``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``;
* ``srun`` (one task per GPU, also what submitit runs) sets ``SLURM_PROCID``,
  ``SLURM_STEP_NUM_TASKS``/``SLURM_NTASKS``, ``SLURM_LOCALID`` and the node list, which
  :func:`slurm_env` maps to the torchrun variables.

:func:`init_from_env` creates the process group from these variables (NCCL on CUDA, gloo on
the CPU) and :func:`teardown` destroys it.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from msn.runtime import resolve_device

log = logging.getLogger(__name__)


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def local_rank() -> int:
    """Index of this process on its node (``LOCAL_RANK`` of torchrun or ``SLURM_LOCALID``)."""
    if not is_distributed():
        return 0
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))


def is_main_process() -> bool:
    return rank() == 0


# --------------------------------------------------------------------------- set-up
@dataclass
class DistEnv:
    """Where this process sits: ``rank`` of ``world_size``, ``local_rank`` on its node, and
    which launcher said so (``torchrun``, ``slurm`` or ``none``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    source: str = "none"


def expand_hostlist(nodelist: str) -> list[str]:
    """Expand a Slurm node list (``gpu[001-003,7],cpu1``) into host names."""
    hosts: list[str] = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", nodelist):
        parts = re.split(r"\[([^\]]*)\]", item)  # text, ranges, text, ranges, ..., text
        names = [parts[0]]
        for index in range(1, len(parts), 2):
            choices = []
            for piece in parts[index].split(","):
                if "-" in piece:
                    low, high = piece.split("-", 1)
                    choices.extend(str(n).zfill(len(low)) for n in range(int(low), int(high) + 1))
                else:
                    choices.append(piece)
            names = [name + choice + parts[index + 1] for name in names for choice in choices]
        hosts.extend(names)
    return hosts


def slurm_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """torch.distributed variables derived from the Slurm variables of an ``srun`` task.

    Returns an empty dict outside an ``srun`` job step (no ``SLURM_STEP_ID``/``SLURM_PROCID``)
    or when the step has one task. ``MASTER_ADDR`` is the first host of the step's node list;
    ``MASTER_PORT`` (unless already set) is derived from the job id so that concurrent jobs
    sharing a node do not collide.
    """
    env = os.environ if environ is None else environ
    if "SLURM_PROCID" not in env or "SLURM_STEP_ID" not in env:
        return {}
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")))
    if tasks <= 1:
        return {}
    nodelist = env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
    hosts = expand_hostlist(nodelist) if nodelist else []
    job = int(re.sub(r"\D", "", env.get("SLURM_JOB_ID", "0")) or 0)
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": str(tasks),
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": env.get("MASTER_ADDR", hosts[0] if hosts else "127.0.0.1"),
        "MASTER_PORT": env.get("MASTER_PORT", str(20_000 + job % 20_000)),
    }


def read_env(slurm: str = "auto") -> DistEnv:
    """Rank/world size from torchrun's variables, else (``slurm='auto'``) from ``srun``'s."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return DistEnv(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                       int(os.environ.get("LOCAL_RANK", 0)), "torchrun")
    if slurm == "auto":
        mapped = slurm_env()
        if mapped:
            os.environ.update(mapped)
            return DistEnv(int(mapped["RANK"]), int(mapped["WORLD_SIZE"]), int(mapped["LOCAL_RANK"]), "slurm")
    return DistEnv()


def init_from_env(device: str = "auto", backend: str = "auto", timeout_min: float = 30.0,
                  slurm: str = "auto") -> DistEnv:
    """Create the default process group when the launcher asked for more than one process.

    Args:
        device: the ``device`` setting (decides ``auto`` backend and ``cuda:LOCAL_RANK``).
        backend: ``auto`` (NCCL on CUDA, gloo on the CPU), ``nccl`` or ``gloo``.
        timeout_min: collective timeout in minutes.
        slurm: ``auto`` maps ``srun``'s variables when torchrun's are absent; ``never``.

    Returns:
        the :class:`DistEnv`; with world size 1 (or an existing group) nothing is created.
    """
    env = read_env(slurm)
    if env.world_size <= 1 or (dist.is_available() and dist.is_initialized()):
        return env
    target = resolve_device(device, env.local_rank)
    if backend == "auto":
        backend = "nccl" if target.type == "cuda" else "gloo"
    if target.type == "cuda":
        torch.cuda.set_device(target)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    kwargs = {"device_id": target} if backend == "nccl" else {}
    dist.init_process_group(backend=backend, init_method="env://", rank=env.rank, world_size=env.world_size,
                            timeout=datetime.timedelta(minutes=timeout_min), **kwargs)
    log.info("process group: rank %d of %d (local %d, %s, %s, %s)", env.rank, env.world_size, env.local_rank,
             backend, target, env.source)
    return env


def teardown() -> None:
    """Destroy the default process group if this process created one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- collectives
def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (identity with one process); returns ``tensor``."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place maximum over ranks; returns ``tensor``."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_reduce_min_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place minimum over ranks; returns ``tensor``."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def all_gather_object(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` with one process)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_tensors_(tensors, src: int = 0) -> None:
    """Overwrite every tensor with rank ``src``'s value (in place)."""
    if is_distributed():
        for tensor in tensors:
            dist.broadcast(tensor.data, src=src)


class _AllReduceMean(torch.autograd.Function):
    """Forward: mean over ranks. Backward: identity (see ``all_reduce_mean``)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if not is_distributed():
            return tensor.clone()
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out / dist.get_world_size()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return grad_output


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Differentiable mean over ranks with an identity backward.

    Each rank's term ``f(mean_r x_r)`` has the exact gradient ``f'(.) / W`` with respect to
    its own ``x_r``; DDP then averages gradients over ``W`` ranks, so passing the gradient
    through unchanged makes the averaged gradient equal the gradient of the global term
    (MSN reference, ME-MAX regulariser, paper Sec. 3 eq. 3).
    """
    return _AllReduceMean.apply(tensor)


class _AllReduceSum(torch.autograd.Function):
    """Forward: sum over ranks. Backward: sum over ranks of the incoming gradients, the exact
    adjoint when every rank holds a copy of the sum and the losses of all ranks are added."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:  # noqa: D102
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over ranks (backward: sum over ranks); a copy with one process."""
    if not is_distributed():
        return tensor.clone()
    return _AllReduceSum.apply(tensor)
