"""The index of a shard folder (docs/formats.md Sec. 9): its format, names and bounds, and
the check every reader runs when a data set opens (:func:`read_index`).

``index.json`` beside the shards lists the classes and, per shard, each sample's key, label,
original path and the byte offset and size of its image inside the tar. A bad index is a
:class:`ShardError` naming the index file, the shard and the sample (docs/security.md).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

INDEX_FILE = "index.json"
FORMAT, VERSION = "msn-shards", 1
SHARD_PATTERN = "shard-{:06d}.tar"
#: The names this writer gives its shards (``--overwrite`` deletes no other name).
SHARD_NAME = re.compile(r"shard-[0-9]{6}\.tar")
#: The largest image file a shard holds (the writer skips larger files, the reader refuses an
#: index with a larger entry): ImageNet's largest JPEG is a few MB.
MAX_SAMPLE_BYTES = 256 * 2**20


class ShardError(ValueError):
    """A shard folder or its index is missing or inconsistent; the message names the path."""


def sample_key(index: int) -> str:
    """The key of sample ``index``: its number in nine digits (``<key>.<ext>`` in the tar)."""
    return f"{index:09d}"


def is_plain_name(name) -> bool:
    """A file name with no folder part: not empty, ``.``, ``..`` or absolute, no separator."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name and os.path.basename(name) == name and not os.path.isabs(name))


def short_repr(value) -> str:
    """``repr(value)`` cut to 60 characters, for one-line messages."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def load_index(path: Path) -> dict:
    """The parsed ``index.json`` at ``path``, if it is of this format and version."""
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        raise ShardError(f"{path}: unreadable shard index ({str(error).splitlines()[0]})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ShardError(f"{path}: not an {FORMAT} index")
    version = index.get("version")
    if type(version) is not int or not 1 <= version <= VERSION:
        raise ShardError(f"{path}: index version {short_repr(version)} is not one this reader knows (1 to {VERSION})")
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
    if not is_plain_name(name):
        raise ShardError(f"{where}: file {short_repr(name)} is not a plain file name inside the folder")
    where = f"{path}: shard {number} ({name})"
    if name in seen:
        raise ShardError(f"{where}: the same file as shard {seen[name]}")
    seen[name] = number
    count = entry.get("num_samples")
    if type(count) is not int or count < 0:
        raise ShardError(f"{where}: num_samples {short_repr(count)} is not a count")
    if "first" in entry and entry["first"] != first:
        raise ShardError(f"{where}: first {short_repr(entry['first'])}, but the shards before it hold {first} samples")
    for field in ("keys", "labels", "offsets", "sizes", "paths"):
        values = entry.get(field)
        if not isinstance(values, list) or len(values) != count:
            raise ShardError(f"{where}: lists {count} samples but not as many {field}")
    expected = [sample_key(sample) for sample in range(first, first + count)]
    if entry["keys"] != expected:
        bad = next(bad for bad, (key, want) in enumerate(zip(entry["keys"], expected)) if key != want)
        raise ShardError(f"{where}: sample {first + bad} has key {short_repr(entry['keys'][bad])}, not {expected[bad]}")
    if not set(map(type, entry["paths"])) <= {str}:
        bad = next(bad for bad, path_value in enumerate(entry["paths"]) if not isinstance(path_value, str))
        raise ShardError(f"{where}, sample {sample_key(first + bad)}: path {short_repr(entry['paths'][bad])} "
                         "is not a string")
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
            bad = next((bad for bad, value in enumerate(entry[field]) if _integers([value]) is None), 0)
            raise ShardError(f"{where}, sample {sample_key(first + bad)}: {field[:-1]} "
                             f"{short_repr(entry[field][bad])} is not an integer")
    labels, offsets, sizes = columns["labels"], columns["offsets"], columns["sizes"]
    checks = (
        ((labels < 0) | (labels >= num_classes), lambda bad: f"label {labels[bad]} is not in [0, {num_classes})"),
        ((sizes < 0) | (sizes > MAX_SAMPLE_BYTES),
         lambda bad: f"size {sizes[bad]} is not in [0, MAX_SAMPLE_BYTES={MAX_SAMPLE_BYTES}]"),
        (offsets < 0, lambda bad: f"offset {offsets[bad]} is negative"),
        (offsets > length - sizes,
         lambda bad: f"bytes {offsets[bad]} to {int(offsets[bad]) + int(sizes[bad])} lie past the end of the shard "
                   f"({length} bytes: truncated?)"),
    )
    for flagged, describe in checks:
        if flagged.any():
            bad = int(np.flatnonzero(flagged)[0])
            raise ShardError(f"{where}, sample {sample_key(first + bad)}: {describe(bad)}")
    return count


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
    index = load_index(path)
    classes, shards, total = index.get("classes"), index.get("shards"), index.get("num_samples")
    if not isinstance(classes, list) or not all(isinstance(name, str) for name in classes):
        raise ShardError(f"{path}: classes is not a list of names")
    if not isinstance(shards, list):
        raise ShardError(f"{path}: shards is not a list")
    if type(total) is not int or total < 0:
        raise ShardError(f"{path}: num_samples {short_repr(total)} is not a count")
    seen: dict[str, int] = {}
    first = 0
    for number, entry in enumerate(shards):
        first += _check_shard(path, root, number, entry, first, len(classes), seen)
    if first != total:
        raise ShardError(f"{path}: the shards hold {first} samples, the index says {total}")
    return index


