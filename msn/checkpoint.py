"""Training checkpoints: atomic writes, ``latest`` + periodic copies, and loading.

A checkpoint is a ``torch.save`` dict::

    format: "msn-checkpoint", version: 1
    config: the resolved config (plain dict, see msn.config.to_dict)
    step, epoch: optimiser steps done; epoch index of the NEXT step
    encoder, target_encoder: state dicts of msn.models.MSNNetwork (backbone.vit.* + head.*)
    prototypes: [K, D] tensor (un-normalised)
    optimizer: AdamW state dict
    rng: {"torch", "cuda", "numpy", "python"} generator states (numpy's as a plain list)
    extra: trainer bookkeeping (skipped images, wall time, ...)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from msn.files import atomic_write, remove_own_temporaries
from msn.safe_load import load_torch_file

FORMAT = "msn-checkpoint"
#: 2: every entry is a tensor, a plain container, a string or a number (``weights_only`` loads
#: it); 1 held numpy RNG states, which only full unpickling reads (docs/security.md).
VERSION = 2
LATEST = "latest.pt"
#: The checkpoint before ``latest.pt``, kept until a finite step after ``latest.pt`` shows that
#: one good (a checkpoint is good when the step after it was finite).
PREVIOUS = "previous.pt"


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`msn.files.atomic_write` (private temporary, fsync, rename):
    a crash leaves the old file or the new one, and a link planted at ``path`` is replaced."""
    return atomic_write(path, lambda stream: torch.save(obj, stream))


def save_training_checkpoint(state: dict[str, Any], output_dir: str | os.PathLike, epoch_copy: int | None = None,
                             keep_previous: bool = False) -> Path:
    """Write ``checkpoints/latest.pt`` (and ``checkpoints/epoch_XXXX.pt`` when ``epoch_copy``).

    Args:
        keep_previous: keep the ``latest.pt`` being replaced as ``previous.pt`` (a hard link
            where the file system has them, else a rename) until :func:`drop_previous`.
    """
    state = {"format": FORMAT, "version": VERSION, **state}
    folder = checkpoint_dir(output_dir)
    if keep_previous and (folder / LATEST).is_file():
        (folder / PREVIOUS).unlink(missing_ok=True)
        try:
            os.link(folder / LATEST, folder / PREVIOUS)
        except OSError:
            os.replace(folder / LATEST, folder / PREVIOUS)
    latest = atomic_save(state, folder / LATEST)
    if epoch_copy is not None:
        atomic_save(state, folder / f"epoch_{epoch_copy:04d}.pt")
    return latest


def remove_stale_temporaries(output_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporaries of writes a crash interrupted, in the run folder (the
    ``metrics.jsonl`` cut-back, ``config.yaml``) and in ``checkpoints/`` (only names
    :mod:`msn.files` gives its temporaries, never through a linked folder); returns them."""
    return remove_own_temporaries(output_dir) + remove_own_temporaries(checkpoint_dir(output_dir))


def drop_previous(output_dir: str | os.PathLike) -> None:
    """Delete ``previous.pt``: ``latest.pt`` has been shown good."""
    (checkpoint_dir(output_dir) / PREVIOUS).unlink(missing_ok=True)


def find_previous(output_dir: str | os.PathLike) -> Path | None:
    """Path of ``previous.pt`` if one exists."""
    path = checkpoint_dir(output_dir) / PREVIOUS
    return path if path.is_file() and not path.is_symlink() else None


def epoch_copies(output_dir: str | os.PathLike) -> list[Path]:
    """The periodic copies ``epoch_XXXX.pt``, newest first."""
    folder = checkpoint_dir(output_dir)
    return sorted(folder.glob("epoch_[0-9]*.pt"), reverse=True) if folder.is_dir() else []


def find_latest(output_dir: str | os.PathLike) -> Path | None:
    """Path of ``latest.pt`` in ``output_dir`` if one exists."""
    path = checkpoint_dir(output_dir) / LATEST
    return path if path.is_file() else None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", *,
                    trust_pickle: bool = False) -> dict[str, Any]:
    """Load one of our training checkpoints (tensors and plain data only, unless ``trust_pickle``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: one line naming the file: unreadable, not ours, or refused
            (:class:`msn.safe_load.UnsafePickleError`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    state = load_torch_file(path, trust_pickle=trust_pickle, map_location=map_location, what="checkpoint")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path}: not an MSN training checkpoint (no 'format: {FORMAT}' entry)")
    return state
