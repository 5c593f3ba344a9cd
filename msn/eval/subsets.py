"""Labelled subsets of the low-shot protocol: generation, the reference file format, lookup.

The MSN paper (Assran et al., 2022, Sec. 5) evaluates with 1, 2 and 5 labelled images per
ImageNet class (three independent splits, mean +- std) and with the SimCLR 1% split. The
reference ships them as text files (docs/method.md Sec. 8): one image file name per line, the
class being the prefix before the first ``_`` (``n01440764_10026.JPEG``); within one folder
(= one split) the k-shot file is the first k images per class of the larger file.

This module

* reads and writes that format (:func:`read_subset_file`, :func:`write_subset_file`),
* scans a folder of such files and serves "k per class" from it (:func:`scan_subset_dir`),
* generates nested, deterministic subsets of any data set (:func:`generate_split`): for
  split ``s`` every class's images are put in one random order drawn from
  ``numpy.random.default_rng([seed, s, label])`` and the k-shot subset is the first ``k``
  images of that order, so 1-shot c 2-shot c 5-shot c the percent subset,
* maps file names to data set indices with one clear error for unknown names
  (:class:`NameIndex`).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from msn import files
from msn.config import ConfigError

log = logging.getLogger(__name__)

#: How many bad names an error message shows.
SHOW_NAMES = 5

_PERCENT_FILE = re.compile(r"^(\d+(?:\.\d+)?)percent\.txt$")


class SubsetError(ConfigError):
    """A labelled subset cannot be built (bad file, unknown names, too few images)."""


@dataclass
class LabelledSubset:
    """One labelled training set of one split.

    Attributes:
        key: ``"5"`` for 5 images per class, ``"1%"`` for a percent subset.
        split: split number (0-based).
        indices: data set indices of the labelled images, grouped by class.
        shots: images per class (k-shot subsets), else ``None``.
        percent: percentage of each class (percent subsets), else ``None``.
        source: where the subset came from (a file path or ``generated seed=...``).
    """

    key: str
    split: int
    indices: list[int]
    shots: Optional[int] = None
    percent: Optional[float] = None
    source: str = ""
    file: Optional[str] = field(default=None)


def class_of(name: str) -> str:
    """Class of a reference-format file name: the part before the first ``_``."""
    return name.split("_", 1)[0]


def percent_key(percent: float) -> str:
    """``1`` -> ``"1%"``, ``0.5`` -> ``"0.5%"``."""
    return f"{format_percent(percent)}%"


def format_percent(percent: float) -> str:
    """``1.0`` -> ``"1"``, ``0.5`` -> ``"0.5"`` (used in keys and file names)."""
    return f"{percent:g}"


def read_subset_file(path: str | os.PathLike) -> list[str]:
    """Read a subset file: one image file name per line (blank lines ignored).

    Raises:
        SubsetError: unreadable file, a name without a ``<class>_`` prefix, or duplicates.
    """
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise SubsetError(f"subsets: cannot read {path}: {error.strerror or error}") from None
    names = [line.strip() for line in lines if line.strip()]
    if not names:
        raise SubsetError(f"subsets: {path} holds no file names")
    bad = [name for name in names if "_" not in name or not class_of(name)]
    if bad:
        raise SubsetError(
            f"subsets: {path}: {len(bad)} line(s) lack the '<class>_' prefix, e.g. {', '.join(bad[:SHOW_NAMES])}"
        )
    counts = Counter(names)
    duplicates = [name for name, count in counts.items() if count > 1]
    if duplicates:
        raise SubsetError(
            f"subsets: {path}: {len(duplicates)} name(s) listed twice, e.g. {', '.join(duplicates[:SHOW_NAMES])}"
        )
    return names


def write_subset_file(path: str | os.PathLike, names: Iterable[str]) -> Path:
    """Write names in the reference format (one per line, trailing newline)."""
    return files.write_text(path, "".join(f"{name}\n" for name in names))


def group_by_class(names: Sequence[str]) -> dict[str, list[str]]:
    """Names per class (file order kept within a class; classes in order of first appearance)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(class_of(name), []).append(name)
    return groups


def per_class_counts(names: Sequence[str]) -> Counter:
    """Number of names per class."""
    return Counter(class_of(name) for name in names)


def first_k_per_class(names: Sequence[str], k: int) -> list[str]:
    """The first ``k`` names of every class, in file order (the reference's nesting rule)."""
    seen: Counter = Counter()
    kept = []
    for name in names:
        cls = class_of(name)
        if seen[cls] < k:
            seen[cls] += 1
            kept.append(name)
    return kept


def is_nested(small: Sequence[str], large: Sequence[str]) -> bool:
    """True when, for every class, ``small``'s images are the first ones of ``large``.

    This is the reference's nesting (k-shot file = first k per class of the larger file); it
    implies ``set(small) <= set(large)``.
    """
    small_groups, large_groups = group_by_class(small), group_by_class(large)
    for cls, group in small_groups.items():
        prefix = large_groups.get(cls, [])[: len(group)]
        if set(prefix) != set(group):
            return False
    return True


@dataclass
class SubsetFolder:
    """The files of one subset folder (= one split), indexed by what they hold.

    Attributes:
        path: the folder.
        uniform: images per class -> (file, names) for files with the same count in every class.
        percent: percentage -> (file, names) for files named ``<P>percent.txt``.
    """

    path: Path
    uniform: dict[int, tuple[Path, list[str]]]
    percent: dict[float, tuple[Path, list[str]]]

    def shots(self, k: int) -> tuple[list[str], str]:
        """Names of ``k`` images per class and a description of their source.

        The file holding exactly ``k`` per class is used when there is one; otherwise the
        first ``k`` per class of the smallest file with more (e.g. the 3-shot subset of
        ``5imgs_class.txt``).

        Raises:
            SubsetError: no file of the folder has ``k`` images in every class.
        """
        if k in self.uniform:
            path, names = self.uniform[k]
            return names, str(path)
        larger = sorted(count for count in self.uniform if count > k)
        if not larger:
            have = ", ".join(f"{p.name} ({c}/class)" for c, (p, _) in sorted(self.uniform.items())) or "none"
            raise SubsetError(
                f"subset_dirs: {self.path} has no file with {k} or more images in every class (files: {have})"
            )
        path, names = self.uniform[larger[0]]
        return first_k_per_class(names, k), f"{path} (first {k} per class)"


def scan_subset_dir(folder: str | os.PathLike) -> SubsetFolder:
    """Read every ``*.txt`` file of a folder and index it by images per class.

    A file is classified by its content, not its name (the reference's
    ``imagenet_subsets3/3imgs_class.txt`` holds 5 images per class), except files named
    ``<P>percent.txt`` (e.g. ``1percent.txt``), which are percent subsets. Other files with an
    uneven count per class are ignored with a warning.

    Raises:
        SubsetError: the folder has no usable file, or two files hold the same count.
    """
    folder = Path(folder)
    uniform: dict[int, tuple[Path, list[str]]] = {}
    percent: dict[float, tuple[Path, list[str]]] = {}
    for path in sorted(folder.glob("*.txt")):
        names = read_subset_file(path)
        match = _PERCENT_FILE.match(path.name)
        if match:
            percent[float(match.group(1))] = (path, names)
            continue
        counts = set(per_class_counts(names).values())
        if len(counts) != 1:
            log.warning("ignoring %s: its classes hold %d-%d images", path, min(counts), max(counts))
            continue
        k = counts.pop()
        if k in uniform:
            raise SubsetError(f"subset_dirs: {folder} has two files with {k} images per class: "
                              f"{uniform[k][0].name} and {path.name}")
        uniform[k] = (path, names)
    if not uniform and not percent:
        raise SubsetError(f"subset_dirs: {folder} holds no subset file (*.txt, one image name per line)")
    return SubsetFolder(folder, uniform, percent)


class NameIndex:
    """Map reference-format names to data set indices.

    A name matches a data set image with the same file name, or with the same name without
    extension (``n01440764_10026`` matches ``n01440764_10026.JPEG``). Only the names asked for
    are indexed: each :meth:`resolve` with names not seen before reads the data set's names once,
    keeping those names' places (a name that matches no file exactly costs a second read, by
    stems), so no table over the whole training split is built.

    Args:
        dataset_names: ``dataset.image_names()``, in data set order.
        description: how error messages name the data set.
    """

    def __init__(self, dataset_names: Sequence[str], description: str = "the data set"):
        self.description = description
        self.names = dataset_names
        self.exact: dict[str, Optional[int]] = {}  # asked-for name -> index, -1 (several) or None (none)
        self.stem: dict[str, Optional[int]] = {}  # the same, by name without extension

    def _find(self, table: dict[str, Optional[int]], wanted: set[str], stems: bool) -> None:
        """Record in ``table`` where each of ``wanted`` is among the data set names (or their stems)."""
        if not wanted:
            return
        table.update(dict.fromkeys(wanted))
        keys = (os.path.splitext(name)[0] for name in self.names) if stems else self.names
        for index, name in enumerate(keys):
            if name in wanted:
                table[name] = -1 if table[name] is not None else index

    def resolve(self, names: Sequence[str], source: str) -> list[int]:
        """Indices of ``names``.

        Raises:
            SubsetError: names that are not in the data set (their count and the first few),
                or that match several images.
        """
        self._find(self.exact, {name for name in names if name not in self.exact}, stems=False)
        stems = {os.path.splitext(name)[0] for name in names if self.exact[name] is None}
        self._find(self.stem, stems - self.stem.keys(), stems=True)
        indices, missing, ambiguous = [], [], []
        for name in names:
            index = self.exact[name]
            if index is None:
                index = self.stem[os.path.splitext(name)[0]]
            if index is None:
                missing.append(name)
            elif index < 0:
                ambiguous.append(name)
            else:
                indices.append(index)
        if missing:
            raise SubsetError(
                f"subsets: {len(missing)} of {len(names)} names in {source} are not images of "
                f"{self.description}, e.g. {', '.join(missing[:SHOW_NAMES])}"
            )
        if ambiguous:
            raise SubsetError(
                f"subsets: {len(ambiguous)} names in {source} match several images of "
                f"{self.description}, e.g. {', '.join(ambiguous[:SHOW_NAMES])}"
            )
        return indices


def percent_count(class_size: int, percent: float) -> int:
    """Images drawn from a class of ``class_size`` images: ``max(1, round(size * percent / 100))``."""
    return max(1, math.floor(class_size * percent / 100 + 0.5))


def class_orders(labels: Sequence[int], seed: int, split: int) -> dict[int, np.ndarray]:
    """For every class, its image indices in the random order of split ``split``.

    The order of class ``c`` is a permutation of its indices (ascending) drawn from
    ``numpy.random.default_rng([seed, split, c])``; it depends only on those three numbers and
    on which images the class has.
    """
    labels = np.asarray(labels)
    by_label = np.argsort(labels, kind="stable")  # indices grouped by class, ascending within
    classes, starts, counts = np.unique(labels[by_label], return_index=True, return_counts=True)
    orders = {}
    for label, start, count in zip(classes, starts, counts):
        members = by_label[start : start + count]
        rng = np.random.default_rng([int(seed), int(split), int(label)])
        orders[int(label)] = members[rng.permutation(len(members))]
    return orders


def generate_split(
    labels: Sequence[int],
    shots: Sequence[int],
    seed: int,
    split: int,
    percent: Optional[float] = None,
    class_names: Optional[Sequence[str]] = None,
) -> list[LabelledSubset]:
    """Nested labelled subsets of one split: ``k`` images per class for each ``k`` in ``shots``
    (plus ``percent`` % of each class when asked).

    Every subset takes the first images of the same per-class order (:func:`class_orders`),
    so they are nested (1 c 2 c 5 c percent whenever the counts grow) and the same
    ``(seed, split)`` always gives the same images.

    Raises:
        SubsetError: a class has fewer images than the largest ``k``.
    """
    orders = class_orders(labels, seed, split)
    if shots:
        largest = max(shots)
        short = [(label, len(order)) for label, order in orders.items() if len(order) < largest]
        if short:
            label, size = short[0]
            name = class_names[label] if class_names is not None and label < len(class_names) else str(label)
            raise SubsetError(
                f"shots: class {name!r} (label {label}) has only {size} training images, fewer than "
                f"k={largest}" + (f" ({len(short)} classes are that small)" if len(short) > 1 else "")
            )
    source = f"generated (seed={seed}, split={split})"
    subsets = [
        LabelledSubset(str(k), split, [int(i) for order in orders.values() for i in order[:k]], shots=k, source=source)
        for k in shots
    ]
    if percent is not None:
        indices = [int(i) for order in orders.values() for i in order[: percent_count(len(order), percent)]]
        subsets.append(LabelledSubset(percent_key(percent), split, indices, percent=percent, source=source))
    return subsets


def subset_file_name(subset: LabelledSubset) -> str:
    """Reference file name of a subset: ``5imgs_class.txt`` or ``1percent.txt``."""
    if subset.shots is not None:
        return f"{subset.shots}imgs_class.txt"
    return f"{format_percent(subset.percent)}percent.txt"


def write_split(folder: str | os.PathLike, subsets: Sequence[LabelledSubset], dataset_names: Sequence[str]) -> None:
    """Write the subsets of one split into ``folder`` in the reference format.

    Sets :attr:`LabelledSubset.file` to the written path.
    """
    for subset in subsets:
        path = write_subset_file(Path(folder) / subset_file_name(subset), (dataset_names[i] for i in subset.indices))
        subset.file = str(path)
