"""The MSN pre-training loop (paper Sec. 3; docs/method.md Sec. 6 for the step order).

One optimiser step: anchor views (masked) and focal views through the online encoder, one
forward per resolution group; target view through the EMA target encoder without gradient;
MSN loss in fp32; set LR/WD; backward; clip the encoder's gradient norm; AdamW step; EMA.

With several processes (``docs/scaling.md``) the online encoder + head is wrapped in DDP
(both forwards of a step are one DDP call), the heads' batch norms are synchronised
(``model.sync_bn``), the prototypes' gradient is all-reduced by hand
(``loss.proto_grad_reduce``), and ME-MAX / Sinkhorn reduce over ranks inside the loss, so a
step equals the single-process step on the concatenated global batch. The EMA target is
updated identically on every rank. Preemption signals (``dist.preempt_signals``) make every
rank stop at the next step boundary after rank 0 wrote ``latest.pt``.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from msn import checkpoint, distributed
from msn.config import MSNConfig, to_dict
from msn.data import (
    ResumableSampler,
    build_dataset,
    build_multiview_data,
    build_train_loader,
    start_epoch,
)
from msn.logging import METRICS_FILE, MetricsLogger, progress_bar
from msn.losses import msn_loss
from msn.masking import sample_keep_indices
from msn.runtime import autocast, autocast_dtype, resolve_device
from msn.models import MSNNetwork, Prototypes, build_network
from msn.train.ema import ema_update
from msn.train.optim import build_optimizer, parameter_groups, set_lr_and_wd
from msn.train.schedules import Schedules

log = logging.getLogger(__name__)

#: Order of the per-step statistics accumulated between log steps: averaged over the window,
#: except the last (``min_max_t``), its minimum.
STAT_NAMES = ("loss", "ce", "memax", "entropy", "np", "max_t", "min_t", "min_max_t")


#: Exit status of a run stopped by a preemption signal after writing ``latest.pt``
#: (``EX_TEMPFAIL``: run the same command again, ``resume: auto`` continues).
EXIT_PREEMPTED = 75


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left untouched."""


class Preempted(Exception):
    """A preemption signal stopped training at ``step``; ``latest.pt`` holds that step."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(f"stopped by {signal_name} at step {step}, checkpoint written")
        self.step, self.signal_name = step, signal_name


class PreemptionFlag:
    """Context manager: while active, ``signals`` only set a flag (the previous handlers are
    restored on exit). :meth:`agreed` tells every rank whether any rank got one.

    Args:
        names: signal names (``USR1``, ``SIGTERM``, ...).
        device: where the one-element flag is all-reduced (the process group's device).
    """

    def __init__(self, names, device: torch.device):
        self.signals = [getattr(signal, "SIG" + name.upper().removeprefix("SIG")) for name in names]
        self.device = device
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "PreemptionFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        if self.received is None:
            self.received = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a signal on another rank"

    def agreed(self) -> bool:
        """True on every rank when any rank received a signal (one all-reduce per call)."""
        if not distributed.is_distributed():
            return self.received is not None
        flag = torch.tensor([0.0 if self.received is None else 1.0], device=self.device)
        return bool(distributed.all_reduce_max_(flag).item() > 0)


class IgnoreSignals:
    """``worker_init_fn`` of the data-loader workers: ignore the preemption signals (the main
    process stops at the next step boundary and shuts the workers down)."""

    def __init__(self, names):
        self.names = list(names)

    def __call__(self, worker_id: int) -> None:  # noqa: ARG002
        for name in self.names:
            signal.signal(getattr(signal, "SIG" + name.upper().removeprefix("SIG")), signal.SIG_IGN)


class OnlineForward(nn.Module):
    """Both online forwards of a step (masked anchors, then all focal views: one forward per
    resolution group) as one module call, so that DDP sees one forward per backward.
    Returns the projections view-major ``[anchor rows; focal rows]`` in the forward's dtype
    (:func:`msn.losses.msn_loss` computes in at least float32)."""

    def __init__(self, network: MSNNetwork):
        super().__init__()
        self.network = network

    def forward(self, anchor: torch.Tensor, keep: torch.Tensor | None, focal: torch.Tensor) -> torch.Tensor:
        projections = [self.network(anchor, keep)]
        if focal.numel():
            projections.append(self.network(focal))
        return torch.cat(projections)


def rank_seed(seed: int, rank: int) -> int:
    """Seed of the global RNG streams of ``rank`` > 0 (rank 0 keeps the single-process stream)."""
    return (seed * 1_000_003 + rank * 998_244_353 + 12_345) % (2**32)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def mask_generator(seed: int, step: int) -> torch.Generator:
    """Generator of the shared mask of ``step``: seeded without the rank, so that every rank
    draws the same token subset and one mask covers the global batch (the reference seeds
    every rank identically)."""
    return torch.Generator().manual_seed((seed * 7_919 + step * 104_729 + 17) % (2**63 - 1))


class Trainer:
    """Builds every component from a validated :class:`MSNConfig` and runs pre-training.

    Args:
        cfg: validated configuration.
        init_state: optional callable ``(network, target, prototypes) -> None`` applied before
            the optimiser is built (``init_from``).
    """

    def __init__(self, cfg: MSNConfig, init_state=None):
        self.cfg = cfg
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.is_main = self.rank == 0
        self.device = resolve_device(cfg.device, distributed.local_rank() if self.world_size > 1 else None)
        self.autocast_dtype = autocast_dtype(cfg.precision, self.device)
        #: dtype of the weights and input images: float64 with ``precision=fp64``, a mode for
        #: numerical checks (tests compare computations that are equal in exact arithmetic)
        self.param_dtype = torch.float64 if cfg.precision == "fp64" else torch.float32
        self.output_dir = Path(cfg.output_dir)
        views = cfg.data.views

        _seed_everything(cfg.seed)  # the same initial weights on every rank
        if cfg.model.grad_checkpointing:
            _non_reentrant_checkpointing()
        self.network: MSNNetwork = build_network(cfg.model, cfg.head, views.rand_size).to(self.device)
        self.prototypes = Prototypes(cfg.loss.num_prototypes, cfg.head.output_dim, cfg.loss.freeze_prototypes).to(self.device)
        self.target: MSNNetwork = copy.deepcopy(self.network)
        if init_state is not None:
            init_state(self.network, self.target, self.prototypes)
        self.target.requires_grad_(False)
        self.online: nn.Module = OnlineForward(self.network)
        if self.world_size > 1 and cfg.model.sync_bn:
            distributed.convert_sync_batchnorm(self.network, self.device.type)
            distributed.convert_sync_batchnorm(self.target, self.device.type)
        for module in (self.network, self.target, self.prototypes):
            module.to(self.param_dtype)  # in place: a no-op unless precision=fp64
        if self.world_size > 1:
            # DDP broadcasts the online weights from rank 0; the target and prototypes too
            distributed.broadcast_tensors_(list(self.target.state_dict().values()) + [self.prototypes.weight])
            self.online = DistributedDataParallel(
                self.online, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                **_no_forward_buffer_sync(),
            )

        if cfg.train.compile:
            # in place (state-dict names unchanged); dynamic shapes: token counts vary per view group
            self.network.backbone.compile(dynamic=True)
            self.target.backbone.compile(dynamic=True)

        self.dataset = build_dataset(cfg.data, train=True)
        if cfg.data.subset is not None and cfg.data.subset < len(self.dataset):
            self.dataset = torch.utils.data.Subset(self.dataset, range(cfg.data.subset))
        self.num_patches = self.network.backbone.num_patches(views.rand_size)
        global_batch = cfg.optim.batch_size
        self.steps_per_epoch = len(self.dataset) // global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"optim.batch_size: {global_batch} is larger than the data set ({len(self.dataset)} images)")
        self.total_steps = cfg.optim.epochs * self.steps_per_epoch
        self.max_steps = min(self.total_steps, cfg.train.max_steps or self.total_steps)
        o = cfg.optim
        self.schedules = Schedules.from_config(o, cfg.loss, self.steps_per_epoch)
        fused = o.fused == "true" or (o.fused == "auto" and self.device.type == "cuda")
        self.optimizer = build_optimizer(
            parameter_groups(self.network, self.prototypes.weight, o.decay_pos_embed), o.betas, o.eps, fused
        )

        self.train_data, collate = build_multiview_data(
            self.dataset, cfg.data, cfg.seed, self.num_patches, cfg.mask.ratio, cfg.mask.shared
        )
        self.sampler = ResumableSampler(len(self.dataset), global_batch, cfg.seed, self.rank, self.world_size)
        self.loader = build_train_loader(
            self.train_data, self.sampler, cfg.data.num_workers,
            pin_memory=cfg.data.pin_memory and self.device.type == "cuda",
            persistent_workers=cfg.data.persistent_workers,
            collate=collate,
        )
        if cfg.data.num_workers > 0:  # Slurm signals every process: workers leave it to the main one
            self.loader.worker_init_fn = IgnoreSignals(cfg.dist.preempt_signals)
        self.step = 0
        self.skipped_images = 0
        self.train_seconds = 0.0
        if self.rank:
            _seed_everything(rank_seed(cfg.seed, self.rank))  # per-rank streams of the global RNGs

    # ------------------------------------------------------------------ state
    def _rng_state(self) -> dict[str, Any]:
        cuda = [torch.cuda.get_rng_state(self.device)] if self.device.type == "cuda" else []
        return {"torch": torch.get_rng_state(), "cuda": cuda, "numpy": np.random.get_state(), "python": random.getstate()}

    def _set_rng_state(self, rng: dict[str, Any]) -> None:
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        cuda = rng.get("cuda") or []
        if cuda and self.device.type == "cuda":
            index = self.device.index or 0
            torch.cuda.set_rng_state(cuda[0] if len(cuda) == 1 else cuda[min(index, len(cuda) - 1)], self.device)
        if "numpy" in rng:
            np.random.set_state(rng["numpy"])
        if "python" in rng:
            random.setstate(rng["python"])

    def state_dict(self) -> dict[str, Any]:
        """The full training state. Collective with several processes (every rank calls it):
        the RNG states of all ranks are gathered into ``rng_per_rank``."""
        rng = self._rng_state()
        per_rank = distributed.all_gather_object(rng)
        return {
            "config": to_dict(self.cfg),
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "encoder": self.network.state_dict(),
            "target_encoder": self.target.state_dict(),
            "prototypes": self.prototypes.weight.detach().clone(),
            "optimizer": self.optimizer.state_dict(),
            "rng": per_rank[0],
            "rng_per_rank": per_rank,
            "data": {"seed": self.cfg.seed, "epoch": self.step // self.steps_per_epoch,
                     "batch_in_epoch": self.step % self.steps_per_epoch, "global_batch": self.cfg.optim.batch_size},
            "extra": {"skipped_images": self.skipped_images, "train_seconds": self.train_seconds,
                      "world_size": self.world_size},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.network.load_state_dict(state["encoder"])
        self.target.load_state_dict(state["target_encoder"])
        with torch.no_grad():
            self.prototypes.weight.copy_(state["prototypes"])
        self.optimizer.load_state_dict(state["optimizer"])
        per_rank = state.get("rng_per_rank") or [state.get("rng", {})]
        if self.rank < len(per_rank):
            self._set_rng_state(per_rank[self.rank])
        else:  # more ranks than when saved: a fresh stream for this rank
            _seed_everything(rank_seed(self.cfg.seed, self.rank) + int(state["step"]))
        self.step = int(state["step"])
        extra = state.get("extra", {})
        self.skipped_images = int(extra.get("skipped_images", 0))
        self.train_seconds = float(extra.get("train_seconds", 0.0))

    def maybe_resume(self) -> Path | None:
        """Apply ``resume`` (``auto``: ``checkpoints/latest.pt`` if present; ``never``; or a path)."""
        resume = self.cfg.resume
        if resume == "never":
            return None
        path = checkpoint.find_latest(self.output_dir) if resume == "auto" else Path(resume)
        if path is None:
            return None
        state = checkpoint.load_checkpoint(path, map_location=self.device)
        changed = _changed_keys(state.get("config", {}), to_dict(self.cfg))
        if changed:
            log.warning("resuming from %s with a changed config: %s", path, ", ".join(changed))
        self.load_state_dict(state)
        saved_world = int(state.get("extra", {}).get("world_size", 1))
        if saved_world != self.world_size:
            log.warning("resuming a run of %d process(es) with %d: the global batch (%d) and the data order are "
                        "unchanged, each process now takes %d images per step", saved_world, self.world_size,
                        self.cfg.optim.batch_size, self.cfg.optim.batch_size // self.world_size)
        if self.is_main:
            _truncate_metrics(self.output_dir / METRICS_FILE, self.step)
        log.info("resumed from %s at step %d", path, self.step)
        return path

    def save(self, epoch_copy: int | None = None) -> None:
        """Rank 0 writes ``latest.pt`` atomically (every rank must call: the state is gathered)."""
        state = self.state_dict()
        if self.is_main:
            checkpoint.save_training_checkpoint(state, self.output_dir, epoch_copy)

    # ------------------------------------------------------------------ step
    def autocast(self):
        """The autocast context of the encoder forwards (``precision``)."""
        return autocast(self.device, self.autocast_dtype)

    def train_step(self, batch) -> torch.Tensor:
        """One optimiser update on a :class:`msn.data.MultiViewBatch`; returns stacked stats
        (:data:`STAT_NAMES`) as a tensor, without synchronising with the device."""
        cfg = self.cfg
        values = self.schedules.at_update(self.step)
        batch = batch.to(self.device, self.param_dtype)
        keep = batch.keep_indices
        if cfg.mask.ratio > 0 and cfg.mask.shared:
            keep = sample_keep_indices(batch.size, self.num_patches, cfg.mask.ratio, shared=True,
                                       generator=mask_generator(cfg.seed, self.step), device=self.device)
        with self.autocast():
            anchor = self.online(batch.anchor, keep, batch.focal)
            with torch.no_grad():
                target = self.target(batch.target)
        out = msn_loss(
            anchor, target, self.prototypes.weight,
            temperature=cfg.loss.temperature, sharpen_temperature=values["sharpen_T"],
            use_sinkhorn=cfg.loss.use_sinkhorn, sinkhorn_iters=cfg.loss.sinkhorn_iters,
            memax_weight=cfg.loss.memax_weight, entropy_weight=cfg.loss.entropy_weight,
        )
        set_lr_and_wd(self.optimizer, values["lr"], values["wd"])
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()  # DDP averages the encoder's gradients over ranks here
        self._reduce_prototype_grad()
        if cfg.optim.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), cfg.optim.clip_grad)
        self.optimizer.step()
        ema_update(self.target, self.network, values["momentum"])
        self.step += 1
        self.skipped_images += batch.skipped
        used = out.num_targets_used.float()
        if self.world_size > 1:  # distinct prototypes chosen by the targets of the GLOBAL batch
            chosen = torch.zeros(out.targets.shape[1], device=out.targets.device)
            chosen[out.targets[: batch.size].argmax(dim=1)] = 1.0
            used = distributed.all_reduce_max_(chosen).sum()
        return torch.stack([out.loss.detach(), out.ce.detach(), out.memax.detach(), out.entropy.detach(),
                            used, out.max_target, out.min_target, out.min_max_target])

    def _reduce_prototype_grad(self) -> None:
        """The prototypes live outside DDP: all-reduce their gradient (``mean`` like every
        other gradient, or ``sum`` like the reference)."""
        grad = self.prototypes.weight.grad
        if self.world_size == 1 or grad is None:
            return
        distributed.all_reduce_sum_(grad)
        if self.cfg.loss.proto_grad_reduce == "mean":
            grad.div_(self.world_size)

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, Any]:
        """Train until ``train.max_steps`` (or the end of ``optim.epochs``); returns the last
        logged record."""
        cfg = self.cfg
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.is_main:
            OmegaConf.save(OmegaConf.create(to_dict(cfg)), self.output_dir / "config.yaml")
        logger = MetricsLogger(self.output_dir, cfg.logging.wandb, to_dict(cfg), cfg.logging.project,
                               cfg.logging.run_name or cfg.name, enabled=self.is_main)
        self.maybe_resume()
        self.online.train()
        self.target.train()
        bar = progress_bar(self.max_steps, self.step, enabled=cfg.train.progress and self.is_main)
        record: dict[str, Any] = {}
        sums = torch.zeros(len(STAT_NAMES), device=self.device)
        minimum = torch.full((), math.inf, device=self.device)
        window_steps, window_start = 0, time.perf_counter()
        last_good_step = self.step
        preemption = PreemptionFlag(cfg.dist.preempt_signals, self.device)
        try:
            preemption.__enter__()
            while self.step < self.max_steps:
                for batch in start_epoch(self.loader, *divmod(self.step, self.steps_per_epoch)):
                    stats = self.train_step(batch)
                    sums += stats
                    minimum = torch.minimum(minimum, stats[-1])
                    window_steps += 1
                    bar.update(1)
                    epoch_done = self.step % self.steps_per_epoch == 0
                    finished = self.step >= self.max_steps
                    if self.step % cfg.train.log_every == 0 or finished or epoch_done:
                        elapsed = time.perf_counter() - window_start
                        self.train_seconds += elapsed
                        means = distributed.all_reduce_sum_(sums / window_steps) / self.world_size
                        record = self._make_record(means, distributed.all_reduce_min_(minimum), window_steps, elapsed)
                        if not math.isfinite(record["loss"]):
                            raise TrainingDivergedError(
                                f"non-finite loss between steps {last_good_step + 1} and {self.step}; stopping. "
                                f"{self._latest_note()}"
                            )
                        last_good_step = self.step
                        logger.log(record)
                        bar.set_postfix(loss=f"{record['loss']:.3f}", np=int(record["np"]),
                                        img_s=f"{record['img_per_s']:.0f}")
                        sums.zero_()
                        minimum.fill_(math.inf)
                        window_steps, window_start = 0, time.perf_counter()
                    if epoch_done or finished:
                        epoch = self.step // self.steps_per_epoch
                        every = cfg.train.checkpoint_every_epochs
                        copy_epoch = epoch if epoch_done and every and epoch % every == 0 else None
                        self.save(copy_epoch)
                    if finished:
                        break
                    if preemption.agreed():
                        self.save()
                        distributed.barrier()  # latest.pt is on disk before any rank exits
                        if self.is_main:
                            log.warning("%s at step %d: wrote %s", preemption.signal_name, self.step,
                                        checkpoint.checkpoint_dir(self.output_dir) / checkpoint.LATEST)
                        raise Preempted(self.step, preemption.signal_name)
            distributed.barrier()
        finally:
            preemption.__exit__(None, None, None)
            bar.close()
            logger.close()
        return record

    def _make_record(self, means: torch.Tensor, minimum: torch.Tensor, steps: int, elapsed: float) -> dict[str, Any]:
        values = dict(zip(STAT_NAMES, means.tolist()))
        values["min_max_t"] = float(minimum)
        schedule = self.schedules.at_update(self.step - 1)
        return {
            "step": self.step,
            "epoch": (self.step - 1) // self.steps_per_epoch,
            **values,
            **schedule,
            "img_per_s": steps * self.cfg.optim.batch_size / max(elapsed, 1e-9),
            "skipped_images": self.skipped_images,
            "time_s": round(self.train_seconds, 3),
        }

    def _latest_note(self) -> str:
        latest = checkpoint.find_latest(self.output_dir)
        if latest is None:
            return "No checkpoint was written."
        return f"The last good checkpoint is {latest}."


def _no_forward_buffer_sync() -> dict[str, bool]:
    """DDP keyword that stops the per-forward broadcast of buffers (BN running statistics are
    not used by training; with SyncBN they are identical on every rank anyway)."""
    import inspect

    parameters = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in parameters else {"broadcast_buffers": False}


def _non_reentrant_checkpointing() -> None:
    """timm's ``checkpoint_seq`` follows a global switch; the non-reentrant variant is the one
    that works under DDP with two forwards per step (no static graph needed)."""
    from timm.layers import set_reentrant_ckpt

    set_reentrant_ckpt(False)


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    ignored = {"train.max_steps", "train.progress", "train.log_every", "resume", "logging.wandb", "data.num_workers"}
    changed = []
    for key in sorted(set(old) | set(new)):
        full = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed.extend(_changed_keys(a, b, full + "."))
        elif a != b and full not in ignored and not full.startswith("dist."):
            changed.append(f"{full}: {a!r} -> {b!r}")
    return changed


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records logged after ``step`` (written after the checkpoint we resume from)."""
    if not path.is_file():
        return
    import json

    with open(path, encoding="utf-8") as stream:
        lines = [line for line in stream if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as stream:
        stream.writelines(lines)
    os.replace(tmp, path)
