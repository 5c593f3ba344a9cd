"""ImageFolderDataset's index costs tens of bytes per image, not Python objects per image
(msn/data/datasets.py; docs/results/imagenet_rehearsal.md, the scan's memory row)."""

import gc
import os
import tracemalloc

import numpy as np
import pytest

from msn.data.datasets import ImageFolderDataset

CLASSES, PER_CLASS = 100, 200  # 20,000 files, ImageNet-shaped names


def empty_imagenet_tree(root) -> int:
    """``CLASSES`` wnid-named folders of ``PER_CLASS`` empty ``<wnid>_<n>.JPEG`` files (the scan
    opens none); returns the total bytes of the paths relative to ``root``."""
    total = 0
    for c in range(CLASSES):
        wnid = f"n{1440764 + c:08d}"
        os.mkdir(root / wnid)
        for i in range(PER_CLASS):
            name = f"{wnid}_{10026 + 7 * i}.JPEG"
            open(root / wnid / name, "wb").close()
            total += len(wnid) + 1 + len(name)
    return total


def retained_bytes(build):
    """Bytes still allocated (tracemalloc) once ``build()`` returns, with its result alive."""
    gc.collect()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        kept = build()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - start, kept
    finally:
        tracemalloc.stop()


def test_the_index_costs_its_path_bytes_an_offset_and_a_label_per_image(tmp_path):
    path_bytes = empty_imagenet_tree(tmp_path)
    retained, dataset = retained_bytes(lambda: ImageFolderDataset(str(tmp_path)))
    images = CLASSES * PER_CLASS
    assert len(dataset) == images and dataset.labels.dtype == np.int16
    per_image = retained / images
    # the path, its int64 offset, an int16 label, and 16 bytes for the class tables and the
    # arrays' headers; a (path, label) tuple per image alone costs more than 100 bytes
    bound = path_bytes / images + 8 + 2 + 16
    assert per_image < bound < 64, f"{per_image:.1f} bytes per image, bound {bound:.1f}"
    assert dataset.image_names()[PER_CLASS + 1] == "n01440765_10033.JPEG"
    assert dataset.path(-1) == str(tmp_path / "n01440863" / "n01440863_11419.JPEG")


def test_accessors_agree_and_out_of_range_is_an_index_error(tmp_path):
    for name in ("b/2.png", "a/z/1.png", "a/0.png", "b/x.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    dataset = ImageFolderDataset(str(tmp_path) + "/")  # a trailing separator adds none to the paths
    expected = [(str(tmp_path / "a/0.png"), 0), (str(tmp_path / "a/z/1.png"), 0), (str(tmp_path / "b/2.png"), 1)]
    assert list(dataset.samples) == expected and dataset.samples == expected and dataset.samples[1:] == expected[1:]
    assert dataset.targets is dataset.labels and dataset.labels.tolist() == [0, 0, 1]
    assert [dataset.path(i) for i in range(3)] == [p for p, _ in expected] and dataset.image_names() == ["0.png", "1.png", "2.png"]
    assert dataset[-1] == (None, 1) and isinstance(dataset[0][1], int)  # empty files: unreadable, skipped
    assert repr(dataset).endswith(": 3 images, 2 classes)")
    with pytest.raises(IndexError):
        dataset.path(3)
    with pytest.raises(IndexError):
        dataset[-4]


def test_a_file_name_that_is_not_utf8_keeps_its_bytes(tmp_path):
    (tmp_path / "a").mkdir()
    raw = os.path.join(os.fsencode(tmp_path / "a"), b"caf\xe9.png")
    open(raw, "wb").close()  # the project's machines are Linux: any byte but / and NUL is a name
    dataset = ImageFolderDataset(str(tmp_path))
    assert os.fsencode(dataset.path(0)) == raw and os.path.exists(dataset.path(0))
