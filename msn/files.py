"""Files written without following planted links, and removed only when this project wrote them.

Every file the project writes goes through :func:`atomic_write`: a private temporary in the
target's folder (``mkstemp``: a new name, created exclusively, never a link), flushed to disk,
then renamed over the target. A symbolic link planted under the target's name is replaced, its
target never touched; a crash leaves the old file or the new one, never a partial file.
Appends (``metrics.jsonl``) open with ``O_NOFOLLOW``. Temporaries carry :data:`TMP_MARK` in
their names, so that a clean-up after a crash deletes only what this project wrote
(docs/security.md).
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

#: Part of the name of every temporary file this project writes: ``.<target>.msn-XXXXXXXX.tmp``.
TMP_MARK = ".msn-"
TMP_SUFFIX = ".tmp"


def respect_umask(path: str | os.PathLike) -> Path:
    """Give ``path`` the mode any new file of this process gets (``0o666`` less the umask):
    ``tempfile.mkstemp`` and safetensors create files readable by their owner only."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
    return Path(path)


def _replace_from_temporary(path: Path, fill: Callable[[int, str], None], suffix: str = "") -> Path:
    """Create a private temporary beside ``path``, ``fill(handle, name)`` it, then rename it to
    ``path``; the temporary is removed when anything fails, an interrupt included."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARK}", suffix=TMP_SUFFIX + suffix, dir=path.parent)
    try:
        fill(handle, tmp)
        respect_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None], sync: bool = True) -> Path:
    """Call ``write(stream)`` on a new private temporary beside ``path``, then rename it to ``path``.

    Args:
        path: the file to create or replace (a link under that name is replaced, not followed).
        write: fills the binary stream.
        sync: ``fsync`` before the rename (checkpoints, indexes); off for throw-away reports.

    Returns:
        ``path``. The temporary is removed when anything fails, an interrupt included.
    """
    def fill(handle: int, name: str) -> None:  # noqa: ARG001 - the descriptor is enough
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            if sync:
                os.fsync(stream.fileno())

    path = _replace_from_temporary(Path(path), fill)
    if sync:  # the rename itself reaches the disk (a power cut after it keeps the new file)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    return path


def write_bytes(path: str | os.PathLike, data: bytes, sync: bool = False) -> Path:
    """:func:`atomic_write` of ``data``."""
    return atomic_write(path, lambda stream: stream.write(data), sync=sync)


def write_text(path: str | os.PathLike, text: str, sync: bool = False) -> Path:
    """:func:`atomic_write` of ``text`` in UTF-8."""
    return write_bytes(path, text.encode("utf-8"), sync=sync)


def write_with(path: str | os.PathLike, save: Callable[[str], None]) -> Path:
    """``save(name)`` for writers that take a file name (matplotlib, safetensors, ONNX): they
    write a private temporary (same extension) that is then renamed to ``path``."""
    def fill(handle: int, name: str) -> None:
        os.close(handle)
        save(name)

    path = Path(path)
    return _replace_from_temporary(path, fill, path.suffix)


def open_append(path: str | os.PathLike) -> IO[str]:
    """``path`` opened to append text. A symbolic link under that name is refused (``OSError``),
    and so is anything but a regular file (a FIFO would block the writer for ever)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
    handle = os.open(path, flags, 0o666)
    if not stat.S_ISREG(os.fstat(handle).st_mode):
        os.close(handle)
        raise OSError(f"{path}: not a regular file; refused")
    return os.fdopen(handle, "a", encoding="utf-8")


def open_regular(path: str | os.PathLike) -> IO[bytes]:
    """``path`` opened to read bytes, refused (``OSError``) unless it is a regular file: a FIFO
    or a device planted among images would block or never end a read."""
    handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(handle).st_mode):
        os.close(handle)
        raise OSError(f"{path}: not a regular file")
    return os.fdopen(handle, "rb")


def is_own_temporary(path: Path) -> bool:
    """A regular file (not a link) named as :func:`atomic_write` names its temporaries."""
    name = path.name
    return (name.startswith(".") and TMP_MARK in name and TMP_SUFFIX in name
            and path.is_file() and not path.is_symlink())


def remove_own_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporaries an interrupted :func:`atomic_write` left in ``folder`` (not
    through a linked folder, and no file this project did not name); returns them."""
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        return []
    stale = sorted(path for path in folder.iterdir() if is_own_temporary(path))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
