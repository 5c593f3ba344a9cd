"""The training state a checkpoint holds, and how a run resumes from it (docs/formats.md Sec. 1).

:func:`gather_state` assembles the checkpoint dictionary of :mod:`msn.checkpoint` from a
:class:`msn.train.step.MSNStep` (weights, prototypes, optimiser) plus the random streams of
every rank and the loop's bookkeeping; :func:`restore_state` puts one back. Together with the
step-seeded data order and masks this makes a resumed run continue bitwise.
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msn import checkpoint, distributed, files
from msn.config import ConfigError, MSNConfig, to_dict
from msn.metrics_log import METRICS_FILE
from msn.safe_load import UnsafePickleError
from msn.train import sharding

log = logging.getLogger(__name__)

#: Config keys that may change between a run and its resumption (run length, logging, paths,
#: processes): anything else makes ``resume=auto`` refuse (``resume=force`` continues anyway).
RESUMABLE_CHANGES = {"name", "output_dir", "resume", "init_from", "trust_pickle", "data.root", "data.num_workers",
                     "train.max_steps", "train.progress", "train.log_every", "train.checkpoint_every_epochs"}
#: Sections whose every key may change so (logging, the live monitor and the collapse alarm,
#: which leave the run's tensors unchanged, and the process layout).
RESUMABLE_SECTIONS = ("logging.", "monitor.", "dist.", "alarm.")


def rank_seed(seed: int, rank: int) -> int:
    """Seed of the global RNG streams of ``rank`` > 0 (rank 0 keeps the single-process stream)."""
    return (seed * 1_000_003 + rank * 998_244_353 + 12_345) % (2**32)


def seed_everything(seed: int) -> None:
    """Seed torch's, numpy's and Python's global generators."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def rng_state(device: torch.device) -> dict[str, Any]:
    """The global generators' states (and the CUDA one of ``device``), as tensors and plain
    values only, so that ``weights_only`` loading reads them back (docs/security.md)."""
    cuda = [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []
    name, keys, position, has_gauss, cached = np.random.get_state()
    numpy_state = [str(name), torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)]
    return {"torch": torch.get_rng_state(), "cuda": cuda, "numpy": numpy_state, "python": random.getstate()}


def _numpy_state(saved: Any) -> tuple:
    """``np.random.set_state``'s tuple from :func:`rng_state`'s list (or a version-1 tuple)."""
    name, keys, position, has_gauss, cached = saved
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    return str(name), keys.astype(np.uint32), int(position), int(has_gauss), float(cached)


def set_rng_state(rng: dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_state` returned (missing entries are left alone)."""
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    cuda = rng.get("cuda") or []
    if cuda and device.type == "cuda":
        index = device.index or 0
        torch.cuda.set_rng_state(cuda[0] if len(cuda) == 1 else cuda[min(index, len(cuda) - 1)], device)
    if "numpy" in rng:
        np.random.set_state(_numpy_state(rng["numpy"]))
    if "python" in rng:
        random.setstate(rng["python"])


def gather_state(cfg: MSNConfig, step_fn, step: int, steps_per_epoch: int, extra: dict[str, Any]) -> dict[str, Any]:
    """The full training state. Collective with several processes (every rank calls it): the
    RNG states of all ranks are gathered into ``rng_per_rank``.

    Args:
        cfg: the run's config (saved resolved).
        step_fn: the :class:`msn.train.step.MSNStep` (weights, prototypes, optimiser).
        step: optimiser updates done.
        steps_per_epoch: updates per epoch.
        extra: the loop's bookkeeping (skipped images, wall time, world size).
    """
    per_rank = distributed.all_gather_object(rng_state(step_fn.device))
    epoch, batch_in_epoch = divmod(step, steps_per_epoch)
    if sharding.is_sharded(step_fn.online):  # dist.strategy=fsdp2: full tensors on rank 0 only
        weights = sharding.full_state(step_fn.online, step_fn.target, step_fn.optimizer)
    else:
        weights = {"encoder": step_fn.network.state_dict(), "target_encoder": step_fn.target.state_dict(),
                   "prototypes": step_fn.prototypes.weight.detach().clone(),
                   "optimizer": step_fn.optimizer.state_dict()}
    return {
        "config": to_dict(cfg),
        "step": step,
        "epoch": epoch,
        **weights,
        "rng": per_rank[0],
        "rng_per_rank": per_rank,
        "data": {"seed": cfg.seed, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "global_batch": cfg.optim.batch_size},
        "extra": dict(extra),
    }


def holds_run(output_dir: str | os.PathLike) -> Path | None:
    """The file that shows ``output_dir`` already holds a run (a checkpoint or logged metrics)."""
    folder = checkpoint.checkpoint_dir(output_dir)
    for path in (folder / checkpoint.LATEST, folder / checkpoint.PREVIOUS, *checkpoint.epoch_copies(output_dir),
                 Path(output_dir) / METRICS_FILE):
        if path.is_file() and path.stat().st_size > 0:
            return path
    return None


def find_resume_state(resume: str, output_dir: str | os.PathLike, device: torch.device,
                      trust_pickle: bool = False) -> tuple[Path, dict] | None:
    """The checkpoint ``resume`` asks for, loaded, or ``None`` for a fresh start.

    ``never`` refuses a directory that already holds a run (nothing there is overwritten);
    ``auto`` (and ``force``) takes ``latest.pt`` and, when that file is unreadable, ``previous.pt``
    or the newest readable ``epoch_XXXX.pt`` with a warning; a path must be a readable checkpoint. Checkpoints are
    read as tensors and plain data only, unless ``trust_pickle`` (docs/security.md): a file
    that needs more is refused, never skipped for an older one.

    Raises:
        ConfigError: one line naming the directory or file at fault.
    """
    if resume == "never":
        existing = holds_run(output_dir)
        if existing is not None:
            raise ConfigError(f"resume=never: {output_dir} already holds a run ({existing}); choose another "
                              f"output_dir, or resume=auto to continue it")
        return None
    if resume not in ("auto", "force"):
        try:
            return Path(resume), checkpoint.load_checkpoint(resume, map_location=device, trust_pickle=trust_pickle)
        except (ValueError, FileNotFoundError) as error:
            raise ConfigError(f"resume: {error}") from None
    latest = checkpoint.find_latest(output_dir)
    previous = checkpoint.find_previous(output_dir)
    candidates = [path for path in (latest, previous) if path] + checkpoint.epoch_copies(output_dir)
    failures = []
    for path in candidates:
        try:
            state = checkpoint.load_checkpoint(path, map_location=device, trust_pickle=trust_pickle)
        except UnsafePickleError as error:
            raise ConfigError(f"resume: {error}") from None
        except ValueError as error:
            failures.append(str(error))
            continue
        if failures:
            log.warning("resume=auto: %s; continuing from %s instead", "; ".join(failures), path)
        return path, state
    if failures:
        raise ConfigError(f"resume=auto: no readable checkpoint in {checkpoint.checkpoint_dir(output_dir)} "
                          f"({'; '.join(failures)})")
    return None


def restore_state(state: dict[str, Any], step_fn, seed: int, rank: int, path: str | os.PathLike = "the checkpoint") -> int:
    """Load ``state`` into ``step_fn`` and this rank's random streams; returns the step.

    Raises:
        ConfigError: the checkpoint's model, head, prototypes or optimiser do not fit this config.
    """
    try:
        if sharding.is_sharded(step_fn.online):  # each rank keeps its shard of the full tensors
            sharding.load_full_state(step_fn.online, step_fn.target, step_fn.optimizer, state)
        else:
            step_fn.network.load_state_dict(state["encoder"])
            step_fn.target.load_state_dict(state["target_encoder"])
            with torch.no_grad():
                step_fn.prototypes.weight.copy_(state["prototypes"])
            step_fn.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as error:
        raise ConfigError(f"resume: {path} does not fit this config's model, head or prototypes "
                          f"({_first_misfit(state, step_fn, error)})") from None
    per_rank = state.get("rng_per_rank") or [state.get("rng", {})]
    if rank < len(per_rank):
        set_rng_state(per_rank[rank], step_fn.device)
    else:  # more ranks than when saved: a fresh stream for this rank
        seed_everything(rank_seed(seed, rank) + int(state["step"]))
    return int(state["step"])


def _misfits(saved: Any, expected: dict[str, torch.Tensor], prefix: str) -> list[str]:
    """``KEY: why`` for each tensor of ``expected`` missing from, or shaped otherwise in, ``saved``
    (and each tensor ``saved`` has beyond it)."""
    if not isinstance(saved, dict):
        return [f"{prefix}: not a state dict"]
    found = []
    for key, tensor in expected.items():
        if key not in saved:
            found.append(f"{prefix}.{key}: missing in the checkpoint")
        elif isinstance(saved[key], torch.Tensor) and tuple(saved[key].shape) != tuple(tensor.shape):
            found.append(f"{prefix}.{key}: shape {tuple(saved[key].shape)} in the checkpoint, {tuple(tensor.shape)} here")
    found += [f"{prefix}.{key}: not in this model" for key in saved if key not in expected]
    return found


def _first_misfit(state: dict[str, Any], step_fn, error: BaseException) -> str:
    """The first tensor that does not fit, and how many do not, in a few words (the loader's own
    message lists every key: kilobytes on one line)."""
    found = []
    if not sharding.is_sharded(step_fn.online):
        found = (_misfits(state.get("encoder"), step_fn.network.state_dict(), "encoder")
                 + _misfits(state.get("target_encoder"), step_fn.target.state_dict(), "target_encoder")
                 + _misfits({"weight": state.get("prototypes")}, {"weight": step_fn.prototypes.weight}, "prototypes"))
    if not found:
        text = " ".join(str(error).split()) or type(error).__name__
        return text if len(text) <= 120 else text[:117] + "..."
    more = f"; {len(found) - 1} more tensors differ" if len(found) > 1 else ""
    return f"{found[0]}{more}"


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every config value that differs (except :data:`RESUMABLE_CHANGES`
    and :data:`RESUMABLE_SECTIONS`)."""
    changed = []
    for key in sorted(set(old) | set(new)):
        full = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed.extend(changed_keys(a, b, full + "."))
        elif a != b and full not in RESUMABLE_CHANGES and not f"{full}.".startswith(RESUMABLE_SECTIONS):
            changed.append(f"{full}: {_shown(a)} -> {_shown(b)}")
    return changed


def _shown(value: Any) -> str:
    """A config value in a change list (null: ``unset``, the key's derived default)."""
    return "unset" if value is None else repr(value)


def _refuse_link(path: Path) -> None:
    """A planted link (or FIFO, device, folder) under the name of a file the run writes: one line."""
    if path.is_symlink():
        raise ConfigError(f"{path}: is a symbolic link; a run folder's files are never written through links "
                          f"(remove it, or choose another output_dir)")
    if os.path.lexists(path) and not path.is_file():
        raise ConfigError(f"{path}: is not a regular file (remove it, or choose another output_dir)")


def check_run_folder(output_dir: str | os.PathLike) -> None:
    """Refuse, in one line, a run folder whose ``checkpoints/`` is a link (checkpoints would be
    written wherever it points: set ``output_dir`` there instead) or whose ``metrics.jsonl`` is
    a link or not a regular file (:class:`ConfigError`)."""
    folder = checkpoint.checkpoint_dir(output_dir)
    if folder.is_symlink():
        raise ConfigError(f"{folder}: is a symbolic link; checkpoints are never written through links "
                          f"(set output_dir to the folder where they should go)")
    if os.path.lexists(folder) and not folder.is_dir():
        raise ConfigError(f"cannot write the run's files: {folder} is not a folder (remove it, or choose another "
                          f"output_dir)")
    _refuse_link(Path(output_dir) / METRICS_FILE)


def _logged_step(line: str) -> int:
    """The ``step`` of a metrics line (0 for a line that is not a record: it is kept)."""
    try:
        record = json.loads(line)
    except ValueError:
        return 0
    return int(record.get("step", 0)) if isinstance(record, dict) and isinstance(record.get("step", 0), int) else 0


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records logged after ``step``: the resumed run wrote them after the checkpoint it
    continues from, and will log those steps again (written as a new file, then renamed)."""
    _refuse_link(path)
    if not path.is_file():
        return
    with open(path, encoding="utf-8") as stream:
        lines = [line for line in stream if line.strip() and _logged_step(line) <= step]
    files.write_text(path, "".join(lines), sync=True)


def set_aside_metrics(path: Path) -> Path | None:
    """On a fresh start, move a ``metrics.jsonl`` left in the folder (a run killed before its
    first checkpoint, or any file of that name) to ``metrics.jsonl.N.old`` rather than
    deleting any of it; returns the new name, or None when there was nothing to move."""
    _refuse_link(path)
    if not path.is_file() or path.stat().st_size == 0:
        return None
    number = 1
    while (aside := path.with_name(f"{path.name}.{number}.old")).exists() or aside.is_symlink():
        number += 1
    os.rename(path, aside)
    return aside
