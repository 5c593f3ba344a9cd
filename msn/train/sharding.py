"""Sharded data parallelism with FSDP2 (``dist.strategy: fsdp2``; docs/scaling.md "Sharding").

With several processes, :func:`shard_step_modules` applies ``torch.distributed.fsdp.fully_shard``
in place: every transformer block, the projection head, then the root (patch embedding,
CLS token, position embedding, final norm and the prototypes), for the online network; the
same blocks and head, then the root, for the EMA target. Every parameter is then a DTensor
sharded on dim 0 over one 1-D mesh, so the online and target parameters of one name hold
the same slice on every rank and the EMA update stays local (:func:`msn.train.ema.ema_update`).
The AdamW moments follow the parameters' sharding; buffers (batch-norm statistics) stay
replicated.

The prototypes are registered as a child of the online root (:data:`PROTOTYPES`): FSDP keeps
the root's parameters gathered from its forward until its backward ends, so the loss reads
``prototypes.weight`` as an ordinary tensor and FSDP reduce-scatters its gradient (mean over
ranks) with the rest of the root's.

Checkpoints stay one ordinary file: :func:`full_state` gathers full CPU tensors on rank 0
(``torch.distributed.checkpoint.state_dict``) in the single-process layout, optimiser state
keyed by parameter index, and :func:`load_full_state` shards such a state back, whatever
the number of ranks or the strategy that wrote it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

#: Name of the prototypes module inside the online root (its state-dict prefix there).
PROTOTYPES = "prototypes"
#: Name of the online network inside :class:`msn.train.step.OnlineForward`.
NETWORK = "network"

#: Full (unsharded) tensors, gathered to rank 0's CPU memory; the other ranks get nothing.
_SAVE = StateDictOptions(full_state_dict=True, cpu_offload=True)
#: Every rank holds the full state (each loaded the file) and keeps its own shard of it.
_LOAD = StateDictOptions(full_state_dict=True, strict=True)


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` was sharded by :func:`shard_step_modules` (an FSDP2 root)."""
    return isinstance(module, FSDPModule)


def shard_step_modules(online: nn.Module, target: nn.Module, prototypes: nn.Module, device: torch.device,
                       world_size: int) -> None:
    """Shard the online forward (with the prototypes) and the EMA target in place.

    Args:
        online: the :class:`msn.train.step.OnlineForward` of the step; it becomes the root
            FSDP module and gains ``prototypes`` as the child :data:`PROTOTYPES`.
        target: the EMA copy of ``online.network``; sharded like it, resharded after its
            (gradient-free) forward so its parameters are always the local shards.
        prototypes: the :class:`msn.models.Prototypes`.
        device: the training device (the mesh's device type).
        world_size: ranks of the default process group (the mesh's size).
    """
    mesh = init_device_mesh(device.type, (world_size,))
    online.add_module(PROTOTYPES, prototypes)
    for network in (getattr(online, NETWORK), target):
        for block in network.backbone.vit.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(network.head, mesh=mesh)
    fully_shard(target, mesh=mesh, reshard_after_forward=True)
    fully_shard(online, mesh=mesh)  # the root: gathered from its forward to the end of its backward


def local(tensors) -> list[torch.Tensor]:
    """This rank's shards of ``tensors`` (plain tensors are returned as they are)."""
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def full_state(online: nn.Module, target: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The weights and optimiser state in the single-process checkpoint layout. Collective.

    Returns:
        on rank 0 ``encoder``, ``target_encoder`` (state dicts of the network), ``prototypes``
        and ``optimizer`` (``torch.optim.Optimizer.state_dict`` layout), CPU tensors; on the
        other ranks the same keys with empty values.
    """
    model = get_model_state_dict(online, options=_SAVE)
    target_state = get_model_state_dict(target, options=_SAVE)
    optim = get_optimizer_state_dict(online, optimizer, options=_SAVE)
    if not model:
        return {"encoder": {}, "target_encoder": {}, "prototypes": None, "optimizer": {}}
    prefix = NETWORK + "."
    return {
        "encoder": {name[len(prefix):]: value for name, value in model.items() if name.startswith(prefix)},
        "target_encoder": target_state,
        "prototypes": model[f"{PROTOTYPES}.weight"],
        "optimizer": _indexed(optim, _parameter_names(online, optimizer)),
    }


def load_full_state(online: nn.Module, target: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any]) -> None:
    """Shard a checkpoint's full ``encoder``, ``target_encoder``, ``prototypes`` and
    ``optimizer`` into the modules and the optimiser (every rank passes the whole state).

    Raises:
        RuntimeError: a missing, unexpected or differently shaped weight (``size mismatch``).
    """
    model = {f"{NETWORK}.{name}": value for name, value in state["encoder"].items()}
    model[f"{PROTOTYPES}.weight"] = state["prototypes"]
    for module, values in ((online, model), (target, state["target_encoder"])):
        _check_shapes(module, values)
        set_model_state_dict(module, values, options=_LOAD)
    named = _named(state["optimizer"], _parameter_names(online, optimizer))
    set_optimizer_state_dict(online, optimizer, named, options=_LOAD)


def _check_shapes(module: nn.Module, values: dict[str, Any]) -> None:
    """Raise like ``load_state_dict`` does before FSDP splits a tensor of the wrong shape."""
    expected = module.state_dict()  # DTensors report their global shape
    missing = sorted(set(expected) - set(values))
    unexpected = sorted(set(values) - set(expected))
    if missing or unexpected:
        raise RuntimeError(f"Missing keys {missing}, unexpected keys {unexpected}")
    for name, tensor in expected.items():
        if tuple(values[name].shape) != tuple(tensor.shape):
            raise RuntimeError(f"size mismatch for {name}: copying a param with shape {tuple(values[name].shape)}, "
                               f"the shape in current model is {tuple(tensor.shape)}")


def _parameter_names(online: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimiser's parameters in its index order (group by group)."""
    names = {id(param): name for name, param in online.named_parameters()}
    return [names[id(param)] for group in optimizer.param_groups for param in group["params"]]


def _indexed(named: dict[str, Any], order: list[str]) -> dict[str, Any]:
    """A name-keyed optimiser state (``torch.distributed.checkpoint``) keyed by index."""
    index = {name: i for i, name in enumerate(order)}
    state = dict(sorted(((index[name], value) for name, value in named["state"].items()), key=lambda item: item[0]))
    groups = [{**group, "params": [index[name] for name in group["params"]]} for group in named["param_groups"]]
    return {"state": state, "param_groups": groups}


def _named(indexed: dict[str, Any], order: list[str]) -> dict[str, Any]:
    """The inverse of :func:`_indexed`."""
    state = {order[int(i)]: value for i, value in indexed.get("state", {}).items()}
    groups = [{**group, "params": [order[int(i)] for i in group["params"]]} for group in indexed["param_groups"]]
    return {"state": state, "param_groups": groups}
