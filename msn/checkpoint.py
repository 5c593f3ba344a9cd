"""Training checkpoints: atomic writes, ``latest`` + periodic copies, and loading.

A checkpoint is a ``torch.save`` dict::

    format: "msn-checkpoint", version: 1
    config: the resolved config (plain dict, see msn.config.to_dict)
    step, epoch: optimiser steps done; epoch index of the NEXT step
    encoder, target_encoder: state dicts of msn.models.MSNNetwork (backbone.vit.* + head.*)
    prototypes: [K, D] tensor (un-normalised)
    optimizer: AdamW state dict
    rng: {"torch", "numpy", "python"} generator states
    extra: trainer bookkeeping (skipped images, wall time, ...)
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "msn-checkpoint"
VERSION = 1
LATEST = "latest.pt"


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash at any point leaves either the old file or the new one, never a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(obj, stream)
            stream.flush()
            os.fsync(stream.fileno())
        respect_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def respect_umask(path: str | os.PathLike) -> Path:
    """Give ``path`` the mode any new file of this process gets (``0o666`` less the umask):
    ``tempfile.mkstemp`` and safetensors create files readable by their owner only."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
    return Path(path)


def save_training_checkpoint(state: dict[str, Any], output_dir: str | os.PathLike, epoch_copy: int | None = None) -> Path:
    """Write ``checkpoints/latest.pt`` (and ``checkpoints/epoch_XXXX.pt`` when ``epoch_copy``)."""
    state = {"format": FORMAT, "version": VERSION, **state}
    folder = checkpoint_dir(output_dir)
    latest = atomic_save(state, folder / LATEST)
    if epoch_copy is not None:
        atomic_save(state, folder / f"epoch_{epoch_copy:04d}.pt")
    return latest


def remove_stale_temporaries(output_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of saves a crash interrupted (``.NAME.*.tmp``); returns them."""
    folder = checkpoint_dir(output_dir)
    stale = sorted(folder.glob(".*.tmp")) if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def epoch_copies(output_dir: str | os.PathLike) -> list[Path]:
    """The periodic copies ``epoch_XXXX.pt``, newest first."""
    folder = checkpoint_dir(output_dir)
    return sorted(folder.glob("epoch_[0-9]*.pt"), reverse=True) if folder.is_dir() else []


def find_latest(output_dir: str | os.PathLike) -> Path | None:
    """Path of ``latest.pt`` in ``output_dir`` if one exists."""
    path = checkpoint_dir(output_dir) / LATEST
    return path if path.is_file() else None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load one of our training checkpoints; one clear error when the file is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means a bad file
        raise ValueError(f"{path}: not a readable checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path}: not an MSN training checkpoint (no 'format: {FORMAT}' entry)")
    return state
