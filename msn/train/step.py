"""One MSN optimiser update as an object (paper Sec. 3; docs/method.md Sec. 6 for the order).

:class:`MSNStep` owns what a step touches: the online network, its EMA target, the
prototypes, the optimiser, the schedules and the anchor masks. The trainer calls it once per
batch; the benchmarks call the very same object, so a benchmark measures what trains.

One step: the anchor views (masked) and the focal views through the online encoder, one
forward per resolution group; the target view through the target encoder without gradient;
the MSN loss in float32; then the update: learning rate and weight decay of the step,
backward, the prototypes' gradient reduced over ranks, clipping of the encoder's gradient
norm, AdamW, EMA of the target.
"""

from __future__ import annotations

import copy
import inspect
from typing import Callable, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from msn import distributed
from msn.config import MSNConfig
from msn.data import MultiViewBatch, augment_on_device
from msn.losses import MSNLossOutput, effective_rank, msn_loss
from msn.masking import AnchorMasks
from msn.models import MSNNetwork, Prototypes, build_network, disable_drop_path, use_sync_batchnorm
from msn.runtime import autocast, autocast_dtype
from msn.train import sharding
from msn.train.ema import ema_update
from msn.train.optim import build_optimizer, parameter_groups, set_lr_and_wd
from msn.train.schedules import Schedules

#: Order of the statistics a step returns (``MSNStep.__call__``); the trainer averages them
#: over the logging window, except the last (``min_max_t``), its minimum.
STAT_NAMES = ("loss", "ce", "memax", "entropy", "np", "max_t", "min_t", "min_max_t")

#: ``init_from``: a callable ``(network, target, prototypes) -> None`` applied to fresh weights.
InitState = Callable[[MSNNetwork, MSNNetwork, Prototypes], None]


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


class MSNStep:
    """The MSN train step and the state it updates. Build it with :meth:`from_config`.

    Args:
        cfg: validated configuration (``loss``, ``optim.clip_grad``, ``precision`` are read).
        network: the online encoder + projection head.
        target: its EMA copy (no gradient).
        prototypes: the learnable prototypes.
        online: the module the online forwards go through (:class:`OnlineForward`, wrapped
            in DDP with several processes).
        optimizer: AdamW over the network and the prototypes.
        schedules: learning rate, weight decay, EMA momentum and sharpening per update.
        masks: the anchor masks.
        device: the training device.
    """

    def __init__(self, cfg: MSNConfig, network: MSNNetwork, target: MSNNetwork, prototypes: Prototypes,
                 online: nn.Module, optimizer: torch.optim.Optimizer, schedules: Schedules, masks: AnchorMasks,
                 device: torch.device):
        self.cfg, self.loss_cfg = cfg, cfg.loss
        self.network, self.target, self.prototypes, self.online = network, target, prototypes, online
        self.optimizer, self.schedules, self.masks, self.device = optimizer, schedules, masks, device
        self.autocast_dtype = autocast_dtype(cfg.precision, device)
        #: dtype of the weights and input images: float64 with ``precision=fp64``, a mode for
        #: numerical checks (tests compare computations that are equal in exact arithmetic)
        self.param_dtype = torch.float64 if cfg.precision == "fp64" else torch.float32
        self.world_size = distributed.world_size()
        #: RankMe of the target embeddings of the last step called with ``measure_rank``
        self.target_rank: torch.Tensor | None = None

    @classmethod
    def from_config(cls, cfg: MSNConfig, device: torch.device, steps_per_epoch: int,
                    init_state: Optional[InitState] = None) -> "MSNStep":
        """Build every component of the step from ``cfg`` (the same weights on every rank)."""
        rank, world_size = distributed.rank(), distributed.world_size()
        if cfg.model.grad_checkpointing:
            _non_reentrant_checkpointing()
        network = build_network(cfg.model, cfg.head, cfg.data.views.rand_size).to(device)
        prototypes = Prototypes(cfg.loss.num_prototypes, cfg.head.output_dim, cfg.loss.freeze_prototypes).to(device)
        target = disable_drop_path(copy.deepcopy(network))  # stochastic depth: online encoder only
        if init_state is not None:
            init_state(network, target, prototypes)
        target.requires_grad_(False)
        online: nn.Module = OnlineForward(network)
        if world_size > 1 and cfg.model.sync_bn:
            use_sync_batchnorm(network, device.type)
            use_sync_batchnorm(target, device.type)
        dtype = torch.float64 if cfg.precision == "fp64" else torch.float32
        for module in (network, target, prototypes):
            module.to(dtype)  # in place: a no-op unless precision=fp64
        if world_size > 1 and cfg.dist.strategy == "fsdp2":
            # every rank keeps its slice of rank 0's weights (docs/scaling.md "Sharding")
            distributed.broadcast_tensors_(list(network.state_dict().values()) + list(target.state_dict().values())
                                           + [prototypes.weight])
            sharding.shard_step_modules(online, target, prototypes, device, world_size)
        elif world_size > 1:
            # DDP broadcasts the online weights from rank 0; the target and prototypes too
            distributed.broadcast_tensors_(list(target.state_dict().values()) + [prototypes.weight])
            online = DistributedDataParallel(online, device_ids=[device.index] if device.type == "cuda" else None,
                                             **_no_forward_buffer_sync())
        if cfg.train.compile:
            # in place (state-dict names unchanged). Static shapes: every view group has one
            # shape for a given config (target, masked anchor, focal), so each compiles once
            # and no later step recompiles (tests/test_train_step.py counts it)
            for module in (network.backbone, target.backbone):
                module.compile(dynamic=False, backend=cfg.train.compile_backend)
        optim = cfg.optim
        # PyTorch's fused AdamW kernel exists for CPU and CUDA tensors (4x the default
        # per-tensor kernel on a CPU: benchmarks/bench_train.py --sections profile)
        fused = optim.fused == "true" or (optim.fused == "auto" and device.type in ("cpu", "cuda"))
        optimizer = build_optimizer(parameter_groups(network, prototypes.weight, optim.decay_pos_embed), optim.betas, optim.eps, fused)
        masks = AnchorMasks(network.backbone.num_patches(cfg.data.views.rand_size), cfg.mask.ratio, cfg.mask.shared,
                            cfg.seed, optim.batch_size, rank, world_size)
        return cls(cfg, network, target, prototypes, online, optimizer,
                   Schedules.from_config(optim, cfg.loss, steps_per_epoch), masks, device)

    def autocast(self):
        """The autocast context of the encoder forwards (``precision``)."""
        return autocast(self.device, self.autocast_dtype)

    def train(self) -> None:
        """Training mode of the online and target networks (batch norms use batch statistics)."""
        self.online.train()
        self.target.train()

    def weights_finite(self) -> bool:
        """Whether every weight of the online network and the prototypes is finite (one
        device synchronisation)."""
        tensors = [p.detach() for p in self.network.parameters()] + [self.prototypes.weight.detach()]
        return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())

    def forward_loss(self, batch: MultiViewBatch, step: int, measure_rank: bool = False) -> MSNLossOutput:
        """Forward of every view and the MSN loss at ``step`` (``batch`` on the device); with
        ``measure_rank``, also ``out.target_rank``, the RankMe of this process's target
        embeddings (:func:`msn.losses.effective_rank`: one SVD of [local batch, D]; under DDP
        the local batch's, which the trainer averages over ranks)."""
        keep = self.masks(step, batch.size, self.device, batch.rows)  # each image keeps its own row's mask
        with self.autocast():
            anchor = self.online(batch.anchor, keep, batch.focal)
            with torch.no_grad():
                target = self.target(batch.target)
        loss = self.loss_cfg
        out = msn_loss(
            anchor, target, self.prototypes.weight,
            temperature=loss.temperature, sharpen_temperature=self.schedules.at_update(step)["sharpen_T"],
            use_sinkhorn=loss.use_sinkhorn, sinkhorn_iters=loss.sinkhorn_iters,
            memax_weight=loss.memax_weight, entropy_weight=loss.entropy_weight,
            prior=loss.prior, prior_exponent=loss.prior_exponent,
        )
        if measure_rank:
            out.target_rank = effective_rank(target)
        return out

    def update(self, out: MSNLossOutput, step: int) -> None:
        """Backward of ``out.loss`` and the optimiser update of ``step`` (then the EMA)."""
        values = self.schedules.at_update(step)
        set_lr_and_wd(self.optimizer, values["lr"], values["wd"])
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()  # DDP averages the encoder's gradients over ranks here (FSDP2: reduce-scatters their mean)
        self._reduce_prototype_grad()
        if self.cfg.optim.clip_grad:
            # on FSDP2's DTensor shards the norm is the global one (an all-reduce of the local norms)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.cfg.optim.clip_grad)
        self.optimizer.step()
        ema_update(self.target, self.network, values["momentum"])

    def __call__(self, batch: MultiViewBatch, step: int, measure_rank: bool = False) -> torch.Tensor:
        """The whole step on a :class:`MultiViewBatch`; returns the stacked statistics
        (:data:`STAT_NAMES`) without synchronising with the device. :attr:`target_rank` is
        then the step's RankMe (a device tensor) with ``measure_rank`` (an SVD, which waits
        for the device: the trainer asks for it on logged steps only), else ``None``."""
        batch = augment_on_device(batch, self.device, self.param_dtype)
        out = self.forward_loss(batch, step, measure_rank)
        self.target_rank = out.target_rank
        self.update(out, step)
        return self.statistics(out, batch.size)

    def statistics(self, out: MSNLossOutput, batch_size: int) -> torch.Tensor:
        """The step's statistics; ``np`` counts the distinct prototypes the targets of the
        global batch chose (one max-reduce over ranks)."""
        used = out.num_targets_used.float()
        if self.world_size > 1:
            chosen = torch.zeros(out.targets.shape[1], device=out.targets.device)
            chosen[out.targets[:batch_size].argmax(dim=1)] = 1.0
            used = distributed.all_reduce_max_(chosen).sum()
        return torch.stack([out.loss.detach(), out.ce.detach(), out.memax.detach(), out.entropy.detach(),
                            used, out.max_target, out.min_target, out.min_max_target])

    def _reduce_prototype_grad(self) -> None:
        """The prototypes live outside DDP: all-reduce their gradient (``mean`` like every
        other gradient, or ``sum`` like the reference). Under FSDP2 they are in the root's
        group, whose gradients FSDP already averaged: ``sum`` scales this rank's shard."""
        grad = self.prototypes.weight.grad
        if self.world_size == 1 or grad is None:
            return
        if sharding.is_sharded(self.online):
            if self.loss_cfg.proto_grad_reduce == "sum":
                sharding.local([grad])[0].mul_(self.world_size)
            return
        distributed.all_reduce_sum_(grad)
        if self.loss_cfg.proto_grad_reduce == "mean":
            grad.div_(self.world_size)


def _no_forward_buffer_sync() -> dict[str, bool]:
    """DDP keyword that stops the per-forward broadcast of buffers (BN running statistics are
    not used by training; with SyncBN they are identical on every rank anyway)."""
    parameters = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in parameters else {"broadcast_buffers": False}


def _non_reentrant_checkpointing() -> None:
    """timm's ``checkpoint_seq`` follows a global switch; the non-reentrant variant is the one
    that works under DDP with two forwards per step (no static graph needed)."""
    from timm.layers import set_reentrant_ckpt

    set_reentrant_ckpt(False)
