"""Reading torch files without running their code: tensors and plain containers only.

``torch.load(..., weights_only=True)`` builds tensors, dicts, lists, tuples, strings and
numbers and refuses any other object before building it. Every file this project reads
with ``torch.load`` goes through :func:`load_torch_file`; a file that needs more is refused
with one line naming the file and what it asks for, unless the caller passes the one trust
switch, ``trust_pickle`` (docs/security.md).
"""

from __future__ import annotations

import os
import pickle
import re
from typing import Any

import torch

#: What a refusal tells the user to do when they trust the file.
TRUST_HINT = "pass trust_pickle=true (msn-export: --trust-pickle) only if you trust its source"


class UnsafePickleError(ValueError):
    """A torch file that needs full unpickling (which can run code) was refused."""


def unsafe_globals(path: str | os.PathLike) -> list[str]:
    """The Python objects (``module.name``) a torch file would build beyond plain data; reads
    the pickle's opcodes only, builds nothing. Empty when they cannot be listed."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(os.fspath(path)))
    except Exception:  # noqa: BLE001 - a legacy (non-zip) file: the loader's refusal still holds
        return []


def needed_globals(path: str | os.PathLike, error: Exception) -> list[str]:
    """What a file the weights-only loader refused asks to build (empty: it is damaged instead)."""
    return unsafe_globals(path) or re.findall(r"GLOBAL (\S+)", str(error))


def refusal(path: str | os.PathLike, found: list[str]) -> str:
    """The one-line message for a file that needs full unpickling to build ``found``."""
    needs = f"{', '.join(found[:3])}{', ...' if len(found) > 3 else ''}"
    note = ""
    if all(name.startswith("numpy") for name in found):
        note = "; msn checkpoints before version 2 stored numpy RNG states so: resuming once with trust_pickle=true rewrites them"
    return f"{os.fspath(path)}: refused: it needs full unpickling ({needs}), which can run code; {TRUST_HINT}{note}"


def load_torch_file(path: str | os.PathLike, *, trust_pickle: bool = False,
                    map_location: str | torch.device = "cpu", what: str = "torch file") -> Any:
    """``torch.load`` of tensors and plain containers; everything else is refused.

    Args:
        path: a file written by ``torch.save`` (zip or legacy format).
        trust_pickle: unpickle in full (any object, any code the file names). Only for a file
            whose source the user trusts; never a default.
        map_location: where tensors go.
        what: what the file should be, in messages ("checkpoint").

    Raises:
        UnsafePickleError: the file needs full unpickling and ``trust_pickle`` is off.
        ValueError: the file is not a readable ``what`` (one line naming it).
    """
    try:
        loaded = torch.load(os.fspath(path), map_location=map_location, weights_only=not trust_pickle)
    except pickle.UnpicklingError as error:
        found = [] if trust_pickle else needed_globals(path, error)
        if found:
            raise UnsafePickleError(refusal(path, found)) from None
        detail = re.search(r"WeightsUnpickler error:\s*([^\n]{1,120})", str(error))
        why = detail.group(1).strip() if detail else type(error).__name__
        raise ValueError(f"{os.fspath(path)}: not a readable {what} (damaged or not a torch file: {why})") from None
    except Exception as error:  # noqa: BLE001 - any other failure means a damaged or foreign file
        first = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
        raise ValueError(f"{os.fspath(path)}: not a readable {what} ({type(error).__name__}: {first})") from None
    expanded = _first_expanded(loaded)
    if expanded is not None:
        raise ValueError(f"{os.fspath(path)}: refused: tensor {expanded} claims more elements than its stored bytes "
                         f"(an expanded view: a small file that would become a large tensor)")
    return loaded


def _first_expanded(value: Any, where: str = "") -> str | None:
    """The name of the first tensor in ``value`` (nested dicts, lists, tuples) whose elements
    overlap in storage (a stride-0 or overlapping view), or None."""
    if isinstance(value, torch.Tensor):
        needed = value.numel() * value.element_size()
        stored = value.untyped_storage().nbytes() - value.storage_offset() * value.element_size()
        return f"{where or '(the file)'} {tuple(value.shape)}" if needed > stored else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        found = _first_expanded(item, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None
