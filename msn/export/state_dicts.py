"""State dicts: the wrapper prefixes removed, split by prefix, parsed into encoders, loaded strictly.

A strict load fails with one line naming the first offending key as the file names it, and
both shapes (docs/formats.md Sec. 6). Imports only :mod:`msn.export.weight_types`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from msn.export.weight_types import EncoderWeights, WeightsMismatchError

Tensor = torch.Tensor

#: Module wrappers whose prefix is removed when every key of a state dict carries it.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def is_tensor_dict(candidate: Any) -> bool:
    """A non-empty dict whose values are all tensors."""
    return isinstance(candidate, dict) and bool(candidate) and all(isinstance(value, Tensor) for value in candidate.values())


def as_tensor(value: Any) -> Tensor:
    """A detached tensor (numpy arrays and lists converted)."""
    return value.detach() if isinstance(value, Tensor) else torch.as_tensor(value)


def first_keys(state: dict[str, Any], count: int = 4) -> str:
    """The first ``count`` keys, for error messages."""
    return ", ".join(list(state)[:count])


def split_by_prefix(state: dict[str, Tensor], prefix: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(keys under ``prefix`` with it removed, the other keys unchanged)."""
    inside = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    outside = {key: value for key, value in state.items() if not key.startswith(prefix)}
    return inside, outside


def strip_common_prefix(state: dict[str, Tensor], prefix: str = "module.") -> dict[str, Tensor]:
    """Remove ``prefix`` when EVERY key has it (DDP/``torch.compile`` wrappers); else unchanged."""
    if state and all(key.startswith(prefix) for key in state):
        return {key[len(prefix):]: value for key, value in state.items()}
    return state


def unwrap_state(state: dict[str, Any]) -> tuple[dict[str, Tensor], str]:
    """(tensors with the DDP / ``torch.compile`` prefixes removed, the removed prefixes)."""
    state = {key: as_tensor(value) for key, value in state.items()}
    wrapper = ""
    for prefix in WRAPPER_PREFIXES:
        stripped = strip_common_prefix(state, prefix)
        if stripped is not state:
            wrapper, state = wrapper + prefix, stripped
    return state, wrapper


def parse_wrapped(state: dict[str, Any], parse: Callable[[dict[str, Tensor]], EncoderWeights]) -> EncoderWeights:
    """``parse(unwrapped state)``, its ``origin`` naming tensors as the file does (with the prefixes)."""
    unwrapped, wrapper = unwrap_state(state)
    encoder = parse(unwrapped)
    if wrapper:
        encoder.origin = {ours: " + ".join(wrapper + part for part in theirs.split(" + "))
                          for ours, theirs in encoder.origin.items()}
        for key in encoder.backbone:
            encoder.origin.setdefault(key, wrapper + key)
    return encoder


def split_head(state: dict[str, Tensor], prefixes: tuple[str, ...]) -> tuple[dict[str, Tensor] | None, dict[str, Tensor], str]:
    """(projection head ``fc1.*`` ... under the first matching prefix or None, the rest, that prefix)."""
    for prefix in prefixes:
        head, rest = split_by_prefix(state, prefix)
        if head and any(key.startswith("fc1.") for key in head):
            return head, rest, prefix
    return None, state, ""


def _shape(tensor: Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def load_strict(module: nn.Module, state: dict[str, Tensor], origin: dict[str, str] | None = None, what: str = "") -> None:
    """``module.load_state_dict(state, strict=True)`` with ONE clear line on failure.

    Args:
        module: the receiving module.
        state: tensors in the module's names.
        origin: our key -> the name in the file, used in messages (defaults to our key).
        what: prefix of the message (the file path, and which part is being loaded).

    Raises:
        WeightsMismatchError: ``<what>: <key>: shape (..) in the file, (..) in the model`` for
            the first mismatch, or the first missing / unexpected key.
    """
    origin = origin or {}
    prefix = f"{what}: " if what else ""
    expected = module.state_dict()
    state = dict(state)
    for key, tensor in expected.items():
        if key not in state:
            if key.endswith("num_batches_tracked"):  # a BN step counter that older files omit
                state[key] = torch.zeros_like(tensor)
                continue
            raise WeightsMismatchError(f"{prefix}missing key {key} (the model expects shape {_shape(tensor)})")
        if _shape(state[key]) != _shape(tensor):
            name = origin.get(key, key)
            ours = f" ({key})" if name != key else ""
            raise WeightsMismatchError(f"{prefix}{name}: shape {_shape(state[key])} in the file, {_shape(tensor)} in the model{ours}")
    unexpected = [key for key in state if key not in expected]
    if unexpected:
        more = f" (+{len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise WeightsMismatchError(f"{prefix}unexpected key {origin.get(unexpected[0], unexpected[0])} with shape "
                                   f"{_shape(state[unexpected[0]])}{more}: the model has no such tensor")
    module.load_state_dict(state, strict=True)
