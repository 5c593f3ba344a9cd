"""The shard writer (``msn-shards write SRC DST``; docs/formats.md Sec. 9).

An ImageFolder is copied, file bytes unchanged and in ImageFolder's order, into POSIX tar
files ``shard-NNNNNN.tar`` of ``--samples-per-shard`` samples each; sample ``i`` is the
members ``<key>.<ext>`` (the image file) and ``<key>.cls`` (its class index as text), with
``key = f"{i:09d}"``, and ``index.json`` (:mod:`msn.data.shard_index`) records where each
image lies. A source file that is a symbolic link resolving outside ``SRC`` (or lies in a
linked folder outside it), is not a regular file, is over
:data:`~msn.data.shard_index.MAX_SAMPLE_BYTES`, or that PIL cannot open and verify as an
image, is not copied: it is skipped with one warning naming it, its sample keeps its place
and label with an empty image (read as an unreadable image). ``--overwrite`` deletes only
what this project wrote there: the shards the folder's ``index.json`` names and
:mod:`msn.files` temporaries (docs/security.md).
"""

from __future__ import annotations

import io
import json
import logging
import os
import stat
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from msn.data.datasets import ImageFolderDataset
from msn.data.shard_index import (
    FORMAT,
    INDEX_FILE,
    MAX_SAMPLE_BYTES,
    SHARD_NAME,
    SHARD_PATTERN,
    VERSION,
    ShardError,
    is_plain_name,
    load_index,
    sample_key,
    short_repr,
)
from msn.files import atomic_write, remove_own_temporaries

log = logging.getLogger(__name__)

_BLOCK = 512  # tar block size


def _padded(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


def _add_member(tar: tarfile.TarFile, raw, name: str, data: bytes) -> int:
    """Append ``name`` holding ``data``; return the byte offset of the data in the file."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    tar.addfile(info, io.BytesIO(data))
    return raw.tell() - _padded(len(data))  # the data, then zero padding to a whole block


def _source_bytes(file: str, src: str) -> tuple[bytes, str | None]:
    """The bytes of the source image ``file``, or ``(b"", why)`` when it is not copied: a
    link resolving outside the resolved source folder ``src``, not a regular file, over
    :data:`MAX_SAMPLE_BYTES`, or not an image PIL opens and verifies."""
    real = os.path.realpath(file)
    if os.path.commonpath([real, src]) != src:
        return b"", f"resolves to {real}, outside {src} (a symbolic link)"
    try:
        handle = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as error:
        raise ShardError(f"{file}: cannot read ({error.strerror or error})") from None
    with os.fdopen(handle, "rb") as stream:
        info = os.fstat(handle)
        if not stat.S_ISREG(info.st_mode):
            return b"", "not a regular file"
        if info.st_size > MAX_SAMPLE_BYTES:
            return b"", f"{info.st_size} bytes, more than MAX_SAMPLE_BYTES={MAX_SAMPLE_BYTES}"
        try:
            data = stream.read(MAX_SAMPLE_BYTES + 1)
        except OSError as error:
            raise ShardError(f"{file}: cannot read ({error.strerror or error})") from None
    if len(data) > MAX_SAMPLE_BYTES:
        return b"", f"more than MAX_SAMPLE_BYTES={MAX_SAMPLE_BYTES} bytes"
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except UnidentifiedImageError:
        return b"", "not an image (PIL does not recognise the format)"
    except Exception as error:  # noqa: BLE001 - whatever PIL cannot open is not an image
        return b"", f"not an image ({type(error).__name__}: {' '.join(str(error).split())})"
    return data, None


def _previous_shards(dst: Path) -> list[Path]:
    """The shard files the ``index.json`` of ``dst`` names (none without an index).

    Raises:
        ShardError: an ``index.json`` that is not an msn-shards index, or names a file that
            is not a plain name in ``dst`` (nothing is deleted then).
    """
    path = dst / INDEX_FILE
    if not os.path.lexists(path):
        return []
    try:
        index = load_index(path)
    except ShardError as error:
        raise ShardError(f"{error}; nothing deleted (--overwrite replaces only a folder of msn-shards)") from None
    shards = index.get("shards")
    if not isinstance(shards, list) or not all(isinstance(entry, dict) for entry in shards):
        raise ShardError(f"{path}: not an {FORMAT} index (no list of shards); nothing deleted")
    for number, entry in enumerate(shards):
        name = entry.get("file")
        if not is_plain_name(name) or not SHARD_NAME.fullmatch(name):
            raise ShardError(f"{path}: shard {number}: file {short_repr(name)} is not a shard name "
                             f"({SHARD_PATTERN.format(number)}, ...); nothing deleted")
        if (dst / name).is_file() and not (dst / name).is_symlink() and not _is_tar(dst / name):
            raise ShardError(f"{path}: shard {number}: {name} is not a tar file; nothing deleted")
    return [dst / entry["file"] for entry in shards]


def _is_tar(path: Path) -> bool:
    """Whether ``path`` starts with a POSIX tar header (what this writer writes)."""
    with open(path, "rb") as stream:
        header = stream.read(_BLOCK)
    return len(header) == _BLOCK and header[257:262] == b"ustar"


def _clear(dst: Path) -> None:
    """``--overwrite``: delete the index of ``dst`` (first: a half-cleared folder never looks
    complete), the shards it names and :mod:`msn.files` temporaries; links are removed, not
    followed; other files stay."""
    shards = _previous_shards(dst)
    (dst / INDEX_FILE).unlink(missing_ok=True)
    for path in shards:
        if path.is_symlink() or path.is_file():
            path.unlink(missing_ok=True)
    remove_own_temporaries(dst)


def _write_shard(path: Path, src: Path, samples, first: int, stop: int, bar) -> dict:
    """Shard ``path`` of ``samples[first:stop]`` (atomically); returns its index entry."""
    entry = {"file": path.name, "num_samples": stop - first, "first": first,
             "keys": [], "labels": [], "offsets": [], "sizes": [], "paths": []}
    src_real = os.path.realpath(src)

    def write(raw):
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for index in range(first, stop):
                file, label = samples[index]
                data, refused = _source_bytes(file, src_real)
                if refused:
                    log.warning("%s: not copied: %s", file, refused)
                key, ext = sample_key(index), Path(file).suffix.lower().lstrip(".") or "bin"
                entry["offsets"].append(_add_member(tar, raw, f"{key}.{ext}", data))
                _add_member(tar, raw, f"{key}.cls", str(label).encode("ascii"))
                entry["keys"].append(key)
                entry["labels"].append(label)
                entry["sizes"].append(len(data))
                entry["paths"].append(os.path.relpath(file, src))
                bar.update(1)
        entry["bytes"] = raw.tell()

    atomic_write(path, write)
    return entry


def write_shards(src, dst, samples_per_shard: int = 1000, overwrite: bool = False, progress: bool = True,
                 workers: int = 8) -> dict:
    """Copy the ImageFolder ``src`` into tar shards in ``dst`` (docs/formats.md Sec. 9).

    Samples keep :class:`~msn.data.datasets.ImageFolderDataset`'s order (torchvision's sorted
    classes, then sorted files): sample ``i`` of the shards is image ``i`` of the folder. File
    bytes are copied unchanged; a file that is a link out of ``src`` or not an image is not
    copied (warned; its sample is left empty, so it reads as an unreadable image, as the
    non-image does in the folder). Each shard, then ``index.json``, is written to a
    :func:`msn.files.atomic_write` temporary and renamed, so ``dst`` only holds an index once
    every shard is complete.

    Args:
        overwrite: for a non-empty ``dst``, delete its index, the shards that index names
            and this project's temporaries (other files stay); otherwise a non-empty
            ``dst`` is refused.
        workers: shards written at once, by threads (reading and writing are I/O-bound).

    Returns:
        The index written (a skipped file's sample has size 0).

    Raises:
        ShardError: a missing or empty ``src``, a non-empty ``dst``, an unreadable file, an
            ``index.json`` in ``dst`` that ``overwrite`` cannot trust.
    """
    src, dst = Path(src), Path(dst)
    if samples_per_shard < 1:
        raise ShardError(f"--samples-per-shard must be positive, got {samples_per_shard}")
    if not src.is_dir():
        raise ShardError(f"{src}: source folder not found")
    try:
        folder = ImageFolderDataset(str(src))
    except FileNotFoundError as error:
        raise ShardError(f"{src}: {str(error).split(': ', 1)[-1]}") from None
    if dst.exists() and not dst.is_dir():
        raise ShardError(f"{dst}: exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()):
        if not overwrite:
            raise ShardError(f"{dst}: folder is not empty (pass --overwrite to replace its shards)")
        _clear(dst)
    try:
        dst.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ShardError(f"{dst}: cannot create the folder ({error.strerror or error})") from None

    from tqdm import tqdm

    samples = folder.samples
    firsts = range(0, len(samples), samples_per_shard)
    with tqdm(total=len(samples), desc="shards", unit="img", dynamic_ncols=True, disable=not progress) as bar, \
            ThreadPoolExecutor(max(1, workers)) as pool:
        futures = [pool.submit(_write_shard, dst / SHARD_PATTERN.format(number), src, samples, first,
                               min(first + samples_per_shard, len(samples)), bar) for number, first in enumerate(firsts)]
        try:
            shards = [future.result() for future in futures]
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # shards being written finish (complete) or vanish
            raise
    index = {"format": FORMAT, "version": VERSION, "num_samples": len(samples), "classes": list(folder.classes),
             "samples_per_shard": samples_per_shard, "shards": shards}
    atomic_write(dst / INDEX_FILE, lambda raw: raw.write(json.dumps(index, separators=(",", ":")).encode()))
    return index
