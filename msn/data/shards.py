"""Sharded image data (``data=shards``): tar shards with a JSON index, read by offset.

The format is in docs/formats.md Sec. 9. In short: an ImageFolder is copied, file bytes
unchanged and in ImageFolder's order, into POSIX tar files ``shard-NNNNNN.tar`` of
``--samples-per-shard`` samples each; sample ``i`` is the members ``<key>.<ext>`` (the image
file) and ``<key>.cls`` (its class index as text), with ``key = f"{i:09d}"``.
``index.json`` beside the shards lists the classes and, per shard, each sample's key,
label, original path and the byte offset and size of its image inside the tar, so that a
reader gets an image with one ``pread`` and never parses tar headers.

* :func:`write_shards` (the command ``msn-shards write SRC DST``) writes them. A source file
  that is a symbolic link resolving outside ``SRC`` (or lies in a linked folder outside it),
  is not a regular file, is over :data:`MAX_SAMPLE_BYTES`, or that PIL cannot open and
  verify as an image, is not copied: it is skipped with one warning naming it, its sample
  keeps its place and label with an empty image (read as an unreadable image), and the
  command reports how many were skipped. ``--overwrite`` deletes only what this project
  wrote there: the shards the folder's ``index.json`` names and :mod:`msn.files`
  temporaries.
* :func:`read_index` checks the whole index when a data set opens (plain shard names inside
  the folder, offsets and sizes within the shard and :data:`MAX_SAMPLE_BYTES`, labels within
  the classes, keys and counts consistent): a bad index is a :class:`ShardError` naming the
  index file, the shard and the sample.
* :class:`ShardedImages` reads them: the same ``(uint8 [3, H, W] or None, label)`` items as
  :class:`~msn.data.datasets.ImageFolderDataset` over the source folder, decoded by the same
  function, with the same bad-image handling.
* :class:`ShardLocalSampler` (``data.shard_order=local``) gives each rank its own run of
  shards per epoch; :func:`build_sampler` picks it or the global
  :class:`~msn.data.loader.ResumableSampler`.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import stat
import sys
import tarfile
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

from msn.data.datasets import BadImageError, ImageFolderDataset, decode_rgb
from msn.data.loader import ResumableSampler, sample_seed
from msn.files import atomic_write, remove_own_temporaries

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
FORMAT, VERSION = "msn-shards", 1
SHARD_PATTERN = "shard-{:06d}.tar"
#: The names this writer gives its shards (``--overwrite`` deletes no other name).
SHARD_NAME = re.compile(r"shard-[0-9]{6}\.tar")
#: The largest image file a shard holds (the writer skips larger files, the reader refuses an
#: index with a larger entry): ImageNet's largest JPEG is a few MB.
MAX_SAMPLE_BYTES = 256 * 2**20
_BLOCK = 512  # tar block size


class ShardError(ValueError):
    """A shard folder or its index is missing or inconsistent; the message names the path."""


# ---------------------------------------------------------------------------------- writing
def _key(index: int) -> str:
    return f"{index:09d}"


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


def _plain_name(name) -> bool:
    """A file name with no folder part: not empty, ``.``, ``..`` or absolute, no separator."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name and os.path.basename(name) == name and not os.path.isabs(name))


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
        index = _load_index(path)
    except ShardError as error:
        raise ShardError(f"{error}; nothing deleted (--overwrite replaces only a folder of msn-shards)") from None
    shards = index.get("shards")
    if not isinstance(shards, list) or not all(isinstance(entry, dict) for entry in shards):
        raise ShardError(f"{path}: not an {FORMAT} index (no list of shards); nothing deleted")
    for number, entry in enumerate(shards):
        name = entry.get("file")
        if not _plain_name(name) or not SHARD_NAME.fullmatch(name):
            raise ShardError(f"{path}: shard {number}: file {_show(name)} is not a shard name "
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
                key, ext = _key(index), Path(file).suffix.lower().lstrip(".") or "bin"
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
        futures = [pool.submit(_write_shard, dst / SHARD_PATTERN.format(s), src, samples, first,
                               min(first + samples_per_shard, len(samples)), bar) for s, first in enumerate(firsts)]
        try:
            shards = [future.result() for future in futures]
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # shards being written finish (complete) or vanish
            raise
    index = {"format": FORMAT, "version": VERSION, "num_samples": len(samples), "classes": list(folder.classes),
             "samples_per_shard": samples_per_shard, "shards": shards}
    atomic_write(dst / INDEX_FILE, lambda raw: raw.write(json.dumps(index, separators=(",", ":")).encode()))
    return index


# ---------------------------------------------------------------------------------- reading
def _show(value) -> str:
    """``repr(value)`` cut to 60 characters, for one-line messages."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _load_index(path: Path) -> dict:
    """The parsed ``index.json`` at ``path``, if it is of this format and version."""
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        raise ShardError(f"{path}: unreadable shard index ({str(error).splitlines()[0]})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ShardError(f"{path}: not an {FORMAT} index")
    version = index.get("version")
    if type(version) is not int or not 1 <= version <= VERSION:
        raise ShardError(f"{path}: index version {_show(version)} is not one this reader knows (1 to {VERSION})")
    return index


def _integers(values: list) -> np.ndarray | None:
    """``values`` as int64 when every one is an integer that fits, else ``None``."""
    if not values:
        return np.zeros(0, dtype=np.int64)
    try:
        array = np.array(values)
    except (ValueError, OverflowError):  # ragged nesting
        return None
    return array if array.ndim == 1 and array.dtype == np.int64 else None  # not bools, floats, >= 2**63


def _check_shard(path: Path, root: Path, number: int, entry, first: int, num_classes: int, seen: dict) -> int:
    """Check shard ``number`` of the index at ``path`` (its first sample is ``first``);
    returns its sample count. Raises :class:`ShardError` naming the shard and the sample."""
    where = f"{path}: shard {number}"
    if not isinstance(entry, dict):
        raise ShardError(f"{where}: not an object")
    name = entry.get("file")
    if not _plain_name(name):
        raise ShardError(f"{where}: file {_show(name)} is not a plain file name inside the folder")
    where = f"{path}: shard {number} ({name})"
    if name in seen:
        raise ShardError(f"{where}: the same file as shard {seen[name]}")
    seen[name] = number
    n = entry.get("num_samples")
    if type(n) is not int or n < 0:
        raise ShardError(f"{where}: num_samples {_show(n)} is not a count")
    if "first" in entry and entry["first"] != first:
        raise ShardError(f"{where}: first {_show(entry['first'])}, but the shards before it hold {first} samples")
    for field in ("keys", "labels", "offsets", "sizes", "paths"):
        values = entry.get(field)
        if not isinstance(values, list) or len(values) != n:
            raise ShardError(f"{where}: lists {n} samples but not as many {field}")
    expected = [f"{i:09d}" for i in range(first, first + n)]  # _key
    if entry["keys"] != expected:
        j = next(j for j, (key, want) in enumerate(zip(entry["keys"], expected)) if key != want)
        raise ShardError(f"{where}: sample {first + j} has key {_show(entry['keys'][j])}, not {expected[j]}")
    if not set(map(type, entry["paths"])) <= {str}:
        j = next(j for j, p in enumerate(entry["paths"]) if not isinstance(p, str))
        raise ShardError(f"{where}, sample {_key(first + j)}: path {_show(entry['paths'][j])} is not a string")
    shard = root / name
    if not shard.is_file():
        raise FileNotFoundError(f"{shard}: shard listed in {path} not found")
    if shard.resolve().parent != root.resolve():
        raise ShardError(f"{where}: the file resolves to {shard.resolve()}, outside {root}")
    length = shard.stat().st_size
    columns = {}
    for field in ("labels", "offsets", "sizes"):
        columns[field] = _integers(entry[field])
        if columns[field] is None:
            j = next((j for j, v in enumerate(entry[field]) if _integers([v]) is None), 0)
            raise ShardError(f"{where}, sample {_key(first + j)}: {field[:-1]} {_show(entry[field][j])} "
                             "is not an integer")
    labels, offsets, sizes = columns["labels"], columns["offsets"], columns["sizes"]
    checks = (
        ((labels < 0) | (labels >= num_classes), lambda j: f"label {labels[j]} is not in [0, {num_classes})"),
        ((sizes < 0) | (sizes > MAX_SAMPLE_BYTES),
         lambda j: f"size {sizes[j]} is not in [0, MAX_SAMPLE_BYTES={MAX_SAMPLE_BYTES}]"),
        (offsets < 0, lambda j: f"offset {offsets[j]} is negative"),
        (offsets > length - sizes,
         lambda j: f"bytes {offsets[j]} to {int(offsets[j]) + int(sizes[j])} lie past the end of the shard "
                   f"({length} bytes: truncated?)"),
    )
    for bad, describe in checks:
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            raise ShardError(f"{where}, sample {_key(first + j)}: {describe(j)}")
    return n


def read_index(root) -> dict:
    """The checked ``index.json`` of a shard folder.

    Every entry is checked: shard files are plain names of files inside ``root``; keys are
    the sample numbers and the counts add up; labels are within the classes; each image lies
    within its shard and holds at most :data:`MAX_SAMPLE_BYTES`.

    Raises:
        FileNotFoundError: no index, or a shard it lists is missing.
        ShardError: not an index of this format, or a bad entry (one line naming the index,
            the shard and the sample).
    """
    root = Path(root)
    path = root / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: shard index not found (write shards with `msn-shards write SRC DST`)")
    index = _load_index(path)
    classes, shards, total = index.get("classes"), index.get("shards"), index.get("num_samples")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ShardError(f"{path}: classes is not a list of names")
    if not isinstance(shards, list):
        raise ShardError(f"{path}: shards is not a list")
    if type(total) is not int or total < 0:
        raise ShardError(f"{path}: num_samples {_show(total)} is not a count")
    seen: dict[str, int] = {}
    first = 0
    for number, entry in enumerate(shards):
        first += _check_shard(path, root, number, entry, first, len(classes), seen)
    if first != total:
        raise ShardError(f"{path}: the shards hold {first} samples, the index says {total}")
    return index


class _Sources(Sequence):
    """``samples``-like view: item ``i`` is ``("<shard path>:<key>", label)``, made on demand."""

    def __init__(self, dataset: ShardedImages):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[str, int]:
        ds = self.dataset
        shard = ds.shard_of(index)
        return f"{ds.shard_paths[shard]}:{ds.keys[index].decode()}", int(ds.labels[index])


class ShardedImages(Dataset):
    """A shard folder written by :func:`write_shards`, item ``i`` = image ``i`` of the source
    ImageFolder: ``(uint8 tensor [3, H, W], label)``, or ``(None, label)`` for an unreadable
    image with ``on_bad_image=skip`` (warned once per image and process).

    Images are read by ``os.pread`` at the offsets of ``index.json`` (no tar parsing; at most
    :attr:`max_open` shard files open per process) and decoded by
    :func:`~msn.data.datasets.decode_rgb`.

    Args:
        root: folder holding ``index.json`` and the shards.
        on_bad_image: ``skip`` or ``error`` (:class:`~msn.data.datasets.ImageFolderDataset`).
        min_pixels: reduced JPEG decoding, as for the folder.
    """

    max_open = 64

    def __init__(self, root, on_bad_image: str = "skip", min_pixels: int | None = None):
        self.root = Path(root)
        index = read_index(self.root)
        self.classes = list(index["classes"])
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        shards = index["shards"]
        self.shard_paths = [str(self.root / entry["file"]) for entry in shards]
        self.shard_sizes = [entry["num_samples"] for entry in shards]
        self.shard_starts = np.concatenate([[0], np.cumsum(self.shard_sizes, dtype=np.int64)])
        self.offsets = np.array([o for e in shards for o in e["offsets"]], dtype=np.int64)
        self.sizes = np.array([s for e in shards for s in e["sizes"]], dtype=np.int64)
        self.labels = np.array([label for e in shards for label in e["labels"]], dtype=np.int64)
        self.keys = np.array([k.encode() for e in shards for k in e["keys"]], dtype=bytes)
        self.targets = self.labels.tolist()
        self.samples = _Sources(self)
        self.on_bad_image, self.min_pixels = on_bad_image, min_pixels
        self._warned: set[str] = set()
        self._files: OrderedDict[int, int] = OrderedDict()  # shard -> descriptor, least recently used first

    def __len__(self) -> int:
        return len(self.labels)

    def shard_of(self, index: int) -> int:
        """The shard holding sample ``index``."""
        return int(np.searchsorted(self.shard_starts, index, side="right")) - 1

    def __getstate__(self):  # descriptors stay in their process
        state = self.__dict__.copy()
        state["_files"] = OrderedDict()
        return state

    def __del__(self):
        self.close()

    def close(self) -> None:
        """Close the open shard files."""
        files = getattr(self, "_files", {})
        while files:
            os.close(files.popitem()[1])

    def _descriptor(self, shard: int) -> int:
        fd = self._files.pop(shard, None)
        if fd is None:
            if len(self._files) >= self.max_open:
                os.close(self._files.popitem(last=False)[1])
            fd = os.open(self.shard_paths[shard], os.O_RDONLY)
        self._files[shard] = fd
        return fd

    def read_bytes(self, index: int) -> bytes:
        """The image file of sample ``index``, as stored (empty: the writer skipped its file)."""
        size, offset = int(self.sizes[index]), int(self.offsets[index])
        if size == 0:
            return b""
        data = os.pread(self._descriptor(self.shard_of(index)), size, offset)
        if len(data) != size:
            raise OSError(f"short read: {len(data)} of {size} bytes at offset {offset}")
        return data

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int]:
        if index < 0:
            index += len(self)
        source, label = self.samples[index]
        try:
            try:
                data = self.read_bytes(index)
            except OSError as error:
                raise BadImageError(f"{source}: cannot read ({error})") from None
            if not data:
                raise BadImageError(f"{source}: empty sample (msn-shards write did not copy its file: a link out "
                                    "of the source folder, not an image, or too large)")
            return decode_rgb(io.BytesIO(data), self.min_pixels, name=source), label
        except BadImageError as error:
            if self.on_bad_image == "error":
                raise
            if source not in self._warned:
                self._warned.add(source)
                log.warning("skipping unreadable image %s", error)
            return None, label

    def image_names(self) -> list[str]:
        """The source files' names (no folder), in data set order, as the folder's."""
        index = read_index(self.root)
        names = [os.path.basename(p) for entry in index["shards"] for p in entry["paths"]]
        if len(names) != len(self):
            raise ShardError(f"{self.root / INDEX_FILE}: changed since it was opened ({len(names)} samples, "
                             f"not {len(self)})")
        return names


def sharded_dataset(data_cfg, train: bool = True) -> ShardedImages:
    """``data=shards``: ``<root>/train`` (``<root>/val`` when ``train`` is false) if it holds an
    index, else ``<root>`` itself -- the rule of ``data=folder``."""
    from msn.data.transforms import min_decode_pixels

    root = Path(data_cfg.root)
    split = root / ("train" if train else "val")
    if (split / INDEX_FILE).is_file():
        root = split
    if not (root / INDEX_FILE).is_file():
        raise FileNotFoundError(f"data.root: no {INDEX_FILE} in {root} (write shards with `msn-shards write SRC DST`)")
    min_pixels = min_decode_pixels(data_cfg.views) if train and data_cfg.reduced_decode else None
    return ShardedImages(root, data_cfg.on_bad_image, min_pixels)


# ---------------------------------------------------------------------------------- order
class ShardLocalSampler(Sampler):
    """``data.shard_order=local``: each rank reads its own run of shards (the interface of
    :class:`~msn.data.loader.ResumableSampler`).

    Each epoch the shards are permuted, seeded by ``(seed, epoch)`` (the same on every rank),
    and laid end to end; that stream is cut into ``world_size`` consecutive pieces of
    ``batches_per_epoch * local_batch`` samples (``batches_per_epoch = size // global_batch``,
    the remainder, fewer than one global batch, is dropped from the stream's end). Rank ``r``
    takes piece ``r`` and shuffles it by a permutation seeded by ``(seed, epoch, rank)``. So
    every rank yields the same number of batches whatever the shard sizes, and reads about
    ``num_shards / world_size`` shards: a shard at a cut is split between the two ranks
    beside it (disjoint samples), so a rank opens at most ``ceil(num_shards / world_size) + 1``.
    The order is a pure function of ``(seed, epoch, rank, world_size)``.

    Args:
        shard_sizes: samples per shard; shard ``s`` holds the consecutive indices after
            those of shards ``0..s-1``.
    """

    def __init__(self, shard_sizes: Sequence[int], global_batch: int, seed: int, rank: int = 0, world_size: int = 1):
        self.shard_sizes = [int(n) for n in shard_sizes]
        self.shard_starts = np.concatenate([[0], np.cumsum(self.shard_sizes, dtype=np.int64)]).tolist()
        self.size = self.shard_starts[-1]
        if self.size < global_batch:
            raise ValueError(f"data set of {self.size} images is smaller than one global batch ({global_batch})")
        self.global_batch, self.seed = global_batch, seed
        self.rank, self.world_size = rank, world_size
        self.local_batch = global_batch // world_size
        self.batches_per_epoch = self.size // global_batch
        self.per_rank = self.batches_per_epoch * self.local_batch
        self.epoch, self.start_batch = 0, 0

    def set_position(self, epoch: int, batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, batch

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.local_batch

    def shard_order(self, epoch: int) -> list[int]:
        """The epoch's permutation of the shards (the same on every rank)."""
        generator = torch.Generator().manual_seed(sample_seed(self.seed + 5, epoch, 0))
        return torch.randperm(len(self.shard_sizes), generator=generator).tolist()

    def pieces(self, epoch: int, rank: int | None = None) -> list[tuple[int, int, int]]:
        """``(shard, first, stop)`` index ranges that make up ``rank``'s piece of ``epoch``."""
        rank = self.rank if rank is None else rank
        begin, end = rank * self.per_rank, (rank + 1) * self.per_rank
        ranges, position = [], 0
        for shard in self.shard_order(epoch):
            n = self.shard_sizes[shard]
            lo, hi = max(begin, position), min(end, position + n)
            if lo < hi:
                start = self.shard_starts[shard] - position
                ranges.append((shard, start + lo, start + hi))
            position += n
            if position >= end:
                break
        return ranges

    def shards_of(self, epoch: int, rank: int | None = None) -> list[int]:
        """The shards ``rank`` reads in ``epoch``, in stream order."""
        return [shard for shard, _, _ in self.pieces(epoch, rank)]

    def order(self, epoch: int) -> list[int]:
        """This rank's sample indices for ``epoch``, in the order they are yielded."""
        indices = torch.cat([torch.arange(a, b) for _, a, b in self.pieces(epoch)])
        generator = torch.Generator().manual_seed(sample_seed(self.seed + 6, epoch, self.rank))
        return indices[torch.randperm(len(indices), generator=generator)].tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self.order(self.epoch)
        for index in order[self.start_batch * self.local_batch:]:
            yield self.epoch, index


def _shard_sizes(dataset) -> list[int]:
    """Samples per shard of a :class:`ShardedImages`, or of a leading ``Subset`` of one
    (``data.subset``: the first N images)."""
    limit = None
    if isinstance(dataset, torch.utils.data.Subset):
        indices = dataset.indices
        if not (isinstance(indices, range) and indices.start == 0 and indices.step == 1):
            raise ValueError("data.shard_order=local: a subset must be the data set's first images")
        dataset, limit = dataset.dataset, len(indices)
    sizes = getattr(dataset, "shard_sizes", None)
    if sizes is None:
        raise ValueError(f"data.shard_order=local needs data=shards, not {type(dataset).__name__}")
    if limit is not None:
        starts = np.concatenate([[0], np.cumsum(sizes)])
        sizes = [int(min(n, max(0, limit - s))) for n, s in zip(sizes, starts)]
    return list(sizes)


def build_sampler(dataset, data_cfg, global_batch: int, seed: int, rank: int = 0, world_size: int = 1):
    """The pre-training sampler of ``data_cfg.shard_order``: ``global`` (default) the
    :class:`~msn.data.loader.ResumableSampler` over every image, ``local`` a
    :class:`ShardLocalSampler` over the shards of a ``data=shards`` data set."""
    if getattr(data_cfg, "shard_order", "global") == "local":
        return ShardLocalSampler(_shard_sizes(dataset), global_batch, seed, rank, world_size)
    return ResumableSampler(len(dataset), global_batch, seed, rank, world_size)


# ---------------------------------------------------------------------------------- command
def main(argv: list[str] | None = None) -> int:
    """``msn-shards write SRC DST [--samples-per-shard N] [--overwrite]``."""
    parser = argparse.ArgumentParser(prog="msn-shards", description="Tar shards of an ImageFolder for data=shards "
                                     "(docs/formats.md Sec. 9).")
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="copy an ImageFolder into tar shards with an index.json")
    write.add_argument("src", help="ImageFolder root (one sub-folder per class), e.g. /data/imagenet/train")
    write.add_argument("dst", help="output folder (new or empty), e.g. /shards/imagenet/train")
    write.add_argument("--samples-per-shard", type=int, default=1000, metavar="N",
                       help="images per tar file (default 1000: about 110 MB of ImageNet)")
    write.add_argument("--overwrite", action="store_true",
                       help="replace the index and the shards it names in a non-empty DST (other files stay)")
    write.add_argument("--workers", type=int, default=8, metavar="N",
                       help="shards written at once, by threads (default 8; the work is I/O-bound)")
    write.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        index = write_shards(args.src, args.dst, args.samples_per_shard, args.overwrite, not args.no_progress,
                             args.workers)
    except ShardError as error:
        print(f"msn-shards: error: {error}", file=sys.stderr)
        return 2
    skipped = sum(size == 0 for entry in index["shards"] for size in entry["sizes"])
    print(f"wrote {index['num_samples']} images of {len(index['classes'])} classes in {len(index['shards'])} "
          f"shards to {args.dst}" + (f"; {skipped} files not copied (links out of SRC or not images: see the "
                                     "warnings), their samples left empty" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
