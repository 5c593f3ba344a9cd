"""msn.data against hostile input: images that would exhaust memory, links and non-images in a
folder given to ``msn-shards write``, a tampered shard index, ``--overwrite`` deleting files
it did not write, and bad Fashion-MNIST files in the cache.

Every file is generated small and cheaply under ``tmp_path`` (a huge PNG is written row by
row, never held as an image); no test needs more than a few tens of MB.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from msn.config import DataConfig, ViewsConfig
from msn.data import (
    FashionMNISTDataset,
    ImageFolderDataset,
    MultiViewDataset,
    MultiViewTransform,
    ShardedImages,
    build_dataset,
    collate_views,
    eval_transform,
    prepare_fashion_mnist,
)
from msn.data import datasets, decode, fashion_mnist, shard_writer, shards_cli
from msn.data.decode import BadImageError, decode_rgb
from msn.data.loader import Unreadable
from msn.data.shard_index import ShardError
from msn.files import TMP_MARK, is_own_temporary

VIEWS = ViewsConfig(rand_size=32, focal_size=16, num_focal=2)


def grey_png(path: Path, width: int, height: int, depth: int = 8) -> Path:
    """A black grey-scale PNG of ``depth`` bits, compressed row by row: a 67 M pixel image is
    a few KB on disk and never an array in memory."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (width * depth + 7) // 8)  # filter byte 0, then zero samples
    packer = zlib.compressobj(6)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, depth, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def line_png(path: Path, width: int = 10_000_000, height: int = 1) -> Path:
    """The finding's 10,000,000 x 1 PNG (about 10 KB), written by PIL."""
    Image.new("L", (width, height), 7).save(path)
    return path


@pytest.fixture
def no_decoding(monkeypatch):
    """Records every call that would decode pixels (``to_rgb8``) or set up a reduced JPEG
    decode (``reduce_on_decode``); the test asserts the list stays empty."""
    calls = []
    for name in ("to_rgb8", "reduce_on_decode"):
        original = getattr(decode, name)
        monkeypatch.setattr(decode, name, lambda image, *a, _f=original, _n=name: calls.append(_n) or _f(image, *a))
    return calls


# ---------------------------------------------------------------------------- 1. decoding bounds
def test_a_10_million_by_1_png_is_refused_from_its_header(tmp_path, no_decoding):
    path = line_png(tmp_path / "line.png")
    assert path.stat().st_size < 20_000
    with pytest.raises(BadImageError) as caught:
        decode_rgb(str(path))
    message = str(caught.value)
    assert message == f"{path}: refused: 10000000x1 has sides more than MAX_ASPECT_RATIO=32 times apart"
    assert no_decoding == []


@pytest.mark.parametrize("depth", [1, 16], ids=["1-bit", "16-bit"])
def test_more_pixels_than_the_bound_are_refused_from_the_header(tmp_path, no_decoding, depth):
    """8193 x 8192 is just over MAX_IMAGE_PIXELS (64 Mi) and under PIL's own warning (89.5 M):
    without the bound the 16-bit file (130 KB) decoded through float64 (about 1.5 GB)."""
    assert decode.MAX_IMAGE_PIXELS == 8192 * 8192
    path = grey_png(tmp_path / "wide.png", 8193, 8192, depth)
    with Image.open(path) as image:
        assert image.size == (8193, 8192) and image.mode == ("1" if depth == 1 else "I;16")
    with pytest.raises(BadImageError, match=rf"^{path}: refused: 8193x8192 is 67117056 pixels, more than "
                                            r"MAX_IMAGE_PIXELS=67108864$"):
        decode_rgb(str(path))
    assert no_decoding == []


def test_the_bounds_are_inclusive_and_module_level(tmp_path, monkeypatch):
    monkeypatch.setattr(decode, "MAX_IMAGE_PIXELS", 100 * 100)
    assert decode_rgb(str(grey_png(tmp_path / "square.png", 100, 100))).shape == (3, 100, 100)
    with pytest.raises(BadImageError, match="101x100 is 10100 pixels, more than MAX_IMAGE_PIXELS=10000"):
        decode_rgb(str(grey_png(tmp_path / "big.png", 101, 100)))
    assert decode_rgb(str(grey_png(tmp_path / "wide.png", 32, 1))).shape == (3, 1, 32)
    for width, height in ((33, 1), (1, 33), (66, 2)):
        with pytest.raises(BadImageError, match=f"{width}x{height} has sides more than MAX_ASPECT_RATIO=32"):
            decode_rgb(str(grey_png(tmp_path / f"{width}x{height}.png", width, height)))


def test_the_bound_comes_before_a_reduced_jpeg_decode(tmp_path, monkeypatch, no_decoding):
    monkeypatch.setattr(decode, "MAX_IMAGE_PIXELS", 1000)
    Image.new("RGB", (200, 200), (9, 9, 9)).save(tmp_path / "photo.jpg")
    with pytest.raises(BadImageError, match="200x200 is 40000 pixels"):
        decode_rgb(str(tmp_path / "photo.jpg"), min_pixels=100)
    assert no_decoding == []


def test_an_empty_image_is_refused(tmp_path):
    with pytest.raises(BadImageError, match=r"^zero.png: refused: the image is empty \(0x5 pixels\)$"):
        decode.check_image_size(Image.new("L", (0, 5)), "zero.png")
    with pytest.raises(BadImageError, match="empty.png"):  # PIL itself refuses a 0-wide PNG header
        decode_rgb(str(grey_png(tmp_path / "empty.png", 0, 5)))


def test_16_bit_greys_scaled_a_few_rows_at_a_time_are_unchanged(tmp_path, monkeypatch):
    ramp = (np.arange(37 * 23, dtype=np.uint32) * 71 % 65536).astype(np.uint16).reshape(23, 37)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    monkeypatch.setattr(decode, "_FLOAT_CHUNK", 50)  # a row and a bit per step, the last step short
    out = decode_rgb(str(tmp_path / "deep.png"))
    expected = torch.from_numpy(np.rint(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8))
    assert torch.equal(out[0], expected) and torch.equal(out[2], expected)


def test_a_folder_skips_and_counts_or_refuses_the_10_million_by_1_png(tmp_path, caplog):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    Image.new("RGB", (40, 36), (10, 200, 30)).save(tmp_path / "a" / "good.png")
    line = line_png(tmp_path / "b" / "line.png")
    folder = ImageFolderDataset(str(tmp_path))
    bad = [path for path, _ in folder.samples].index(str(line))
    with caplog.at_level("WARNING"):
        assert folder[bad] == (None, 1)
        assert folder[bad] == (None, 1)
    assert sum("line.png: refused" in r.getMessage() for r in caplog.records) == 1  # warned once
    views = MultiViewDataset(folder, MultiViewTransform(VIEWS), seed=0)
    assert views[(0, bad)][3] is True  # replaced by the readable image, augmented with its own key
    batch = collate_views([views[(0, 1 - bad)], views[(0, bad)]])
    assert batch.size == 2 and batch.skipped == 1  # the batch keeps its size; the bad image is counted
    lone = MultiViewDataset(torch.utils.data.Subset(folder, [bad]), MultiViewTransform(VIEWS), seed=0)  # nothing to replace it with
    assert lone[(0, 0)] == Unreadable(str(line))
    strict = ImageFolderDataset(str(tmp_path), on_bad_image="error")
    with pytest.raises(BadImageError, match=f"^{line}: refused: 10000000x1 "):
        strict[bad]


def test_evaluation_never_resizes_an_image_decoding_refuses(tmp_path):
    """The evaluator and the live monitor read images through ``build_dataset`` (an
    ImageFolderDataset or ShardedImages, both decoding with ``decode_rgb``) and apply the
    evaluation transform only to an image that decoded: resizing the short side of a
    10,000,000 x 1 image to 256 px would ask for about 30 GB."""
    from msn.eval.features import _EvalImages

    (tmp_path / "val" / "a").mkdir(parents=True)
    line_png(tmp_path / "val" / "a" / "line.png")
    dataset = build_dataset(DataConfig(name="folder", root=str(tmp_path)), train=False)
    assert isinstance(dataset, ImageFolderDataset)
    real, calls = eval_transform(224, VIEWS.mean, VIEWS.std), []

    def transform(image):
        calls.append(tuple(image.shape))
        return real(image) if image.shape[-1] * image.shape[-2] < 10**6 else torch.zeros(3, 224, 224)

    image, label, readable = _EvalImages(dataset, [0], transform, 224)[0]
    assert calls == [] and not readable and label == 0 and torch.equal(image, torch.zeros(3, 224, 224))
    shard_writer.write_shards(tmp_path / "val", tmp_path / "shards", progress=False)  # an image: copied
    assert ShardedImages(tmp_path / "shards")[0] == (None, 0)  # and refused when read


# ---------------------------------------------------------------------------- 2. writer's sources
def _source_with_traps(tmp_path):
    """SRC with two good images, and beside them: a link to a private key outside SRC, a link
    to an image outside SRC, a class folder linked from outside, a text file named .jpg, and
    a link to an image inside SRC (which is copied)."""
    src, outside = tmp_path / "src", tmp_path / "outside"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    (outside / "loot").mkdir(parents=True)
    Image.new("RGB", (20, 16), (1, 2, 3)).save(src / "a" / "good.png")
    Image.new("RGB", (24, 18), (4, 5, 6)).save(src / "b" / "fine.jpg")
    (outside / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nsecret\n")
    Image.new("RGB", (8, 8), (7, 8, 9)).save(outside / "elsewhere.png")
    Image.new("RGB", (8, 8), (7, 8, 9)).save(outside / "loot" / "photo.png")
    (src / "a" / "key.jpg").symlink_to(outside / "id_rsa")
    (src / "a" / "other.png").symlink_to(outside / "elsewhere.png")
    (src / "a" / "same.png").symlink_to(Path("..") / "b" / "fine.jpg")  # inside SRC: copied
    (src / "b" / "notes.jpg").write_text("not an image, just notes")
    (src / "loot").symlink_to(outside / "loot", target_is_directory=True)
    return src


def test_writer_copies_no_link_out_of_the_source_and_no_non_image(tmp_path, caplog, capsys):
    src = _source_with_traps(tmp_path)
    dst = tmp_path / "dst"
    with caplog.at_level("WARNING"):
        assert shards_cli.main(["write", str(src), str(dst), "--no-progress"]) == 0
    assert "; 4 files not copied (links out of SRC or not images" in capsys.readouterr().out
    shard = (dst / "shard-000000.tar").read_bytes()
    assert b"PRIVATE KEY" not in shard and b"just notes" not in shard
    skipped = {r.getMessage().split(": not copied: ")[0]: r.getMessage() for r in caplog.records
               if ": not copied: " in r.getMessage()}
    trapped = ("a/key.jpg", "a/other.png", "b/notes.jpg", "loot/photo.png")
    assert sorted(skipped) == sorted(str(src / p) for p in trapped)
    assert f"resolves to {tmp_path / 'outside' / 'id_rsa'}, outside {src}" in skipped[str(src / "a/key.jpg")]
    assert "not an image" in skipped[str(src / "b/notes.jpg")]
    folder, shards = ImageFolderDataset(str(src)), ShardedImages(dst)
    assert shards.targets == folder.targets.tolist()  # every sample keeps its place and label
    index = json.loads((dst / "index.json").read_text())
    for i, (path, _) in enumerate(folder.samples):
        image, _ = shards[i]
        if path in skipped:
            assert image is None and index["shards"][0]["sizes"][i] == 0
        else:
            assert torch.equal(image, folder[i][0])
    strict = ShardedImages(dst, on_bad_image="error")
    with pytest.raises(BadImageError, match="empty sample"):
        strict[[p for p, _ in folder.samples].index(str(src / "a/key.jpg"))]


def test_writer_skips_special_and_oversized_files(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    os.mkfifo(src / "pipe.png")  # reading it would block the writer for ever
    assert shard_writer._source_bytes(str(src / "pipe.png"), str(src)) == (b"", "not a regular file")
    Image.new("RGB", (30, 30), (1, 2, 3)).save(src / "photo.png")
    monkeypatch.setattr(shard_writer, "MAX_SAMPLE_BYTES", 50)
    data, why = shard_writer._source_bytes(str(src / "photo.png"), str(src))
    assert data == b"" and why.endswith("more than MAX_SAMPLE_BYTES=50")


# ---------------------------------------------------------------------------- 3. the index
@pytest.fixture
def shard_folder(tmp_path):
    """Two classes, six PNGs, shards of four: ``(folder, index dict)``."""
    src = tmp_path / "src"
    for c, name in enumerate(("a", "b")):
        (src / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (12 + i, 10), (c * 100, i * 50, 9)).save(src / name / f"{name}{i}.png")
    dst = tmp_path / "shards"
    index = shard_writer.write_shards(src, dst, samples_per_shard=4, progress=False)
    (tmp_path / "secret.tar").write_bytes(b"x" * 100_000)
    return dst, index


def _tamper(dst, index, change):
    index = json.loads(json.dumps(index))
    change(index, dst)
    (dst / "index.json").write_text(json.dumps(index))


def _set(shard, field, value, position=None):
    def change(index, dst):
        entry = index["shards"][shard]
        if position is None:
            entry[field] = value(dst) if callable(value) else value
        else:
            entry[field][position] = value
    return change


def _link_shard(index, dst):
    (dst / "link.tar").symlink_to(dst.parent / "secret.tar")
    index["shards"][0]["file"] = "link.tar"


def _sparse_shard(index, dst):
    with open(dst / "shard-000001.tar", "r+b") as f:
        f.truncate(100 * 2**30)  # sparse: no disk used
    index["shards"][1]["sizes"][0] = 100 * 2**30 - 4096


BAD_INDEXES = {
    "parent-path": (_set(0, "file", "../secret.tar"), r"shard 0: file '../secret.tar' is not a plain file name"),
    "absolute-path": (_set(0, "file", lambda dst: str(dst.parent / "secret.tar")),
                      r"shard 0: file '/.* is not a plain file name"),
    "dot-dot": (_set(1, "file", ".."), r"shard 1: file '..' is not a plain"),
    "link-out": (_link_shard, r"shard 0 \(link.tar\): the file resolves to .*secret.tar, outside "),
    "huge-size": (_sparse_shard, r"shard 1 \(shard-000001.tar\), sample 000000004: size 107374178304 is not in "
                                 r"\[0, MAX_SAMPLE_BYTES=268435456\]"),
    "label-too-big": (_set(1, "labels", 2, 1), r"shard 1 \(shard-000001.tar\), sample 000000005: label 2 is not in "
                                               r"\[0, 2\)"),
    "label-negative": (_set(0, "labels", -1, 0), r"sample 000000000: label -1 is not in \[0, 2\)"),
    "label-text": (_set(0, "labels", "1", 2), r"sample 000000002: label '1' is not an integer"),
    "offset-negative": (_set(0, "offsets", -512, 3), r"sample 000000003: offset -512 is negative"),
    "offset-float": (_set(0, "offsets", 512.0, 3), r"sample 000000003: offset 512.0 is not an integer"),
    "past-the-end": (_set(0, "offsets", 10**6, 1), r"sample 000000001: bytes 1000000 to \d+ lie past the end"),
    "key": (_set(0, "keys", "../../x", 2), r"shard 0 \(shard-000000.tar\): sample 2 has key '../../x', not 000000002"),
    "first": (_set(1, "first", 3), r"shard 1 \(shard-000001.tar\): first 3, but the shards before it hold 4"),
    "short-list": (_set(0, "sizes", [1, 2]), r"shard 0 \(shard-000000.tar\): lists 4 samples but not as many sizes"),
    "count": (_set(1, "num_samples", -2), r"shard 1 \(shard-000001.tar\): num_samples -2 is not a count"),
    "same-file": (_set(1, "file", "shard-000000.tar"), r"shard 1 \(shard-000000.tar\): the same file as shard 0"),
    "total": (lambda index, dst: index.update(num_samples=7), r"the shards hold 6 samples, the index says 7"),
    "version": (lambda index, dst: index.update(version="1"), r"index version '1' is not one this reader knows"),
    "classes": (lambda index, dst: index.update(classes="ab"), r"classes is not a list of names"),
}


@pytest.mark.parametrize("case", BAD_INDEXES)
def test_a_bad_index_is_refused_when_the_data_set_opens(shard_folder, case):
    dst, index = shard_folder
    change, message = BAD_INDEXES[case]
    _tamper(dst, index, change)
    with pytest.raises(ShardError) as caught:
        ShardedImages(dst)
    text = str(caught.value)
    assert "\n" not in text and text.startswith(f"{dst / 'index.json'}: ")
    assert re.search(message, text), text


def test_a_valid_index_opens(shard_folder):
    dst, index = shard_folder
    shards = ShardedImages(dst)
    assert len(shards) == 6 and shards.targets == [0, 0, 0, 1, 1, 1] and shards[5][0].shape == (3, 10, 14)
    assert shards.image_names() == ["a0.png", "a1.png", "a2.png", "b0.png", "b1.png", "b2.png"]


# ---------------------------------------------------------------------------- 4. --overwrite
def test_overwrite_deletes_only_the_indexed_shards_and_own_temporaries(shard_folder, tmp_path):
    dst, _ = shard_folder
    src = tmp_path / "src"
    kept = {"shard-999999.tar": b"a user's tar", ".notes.tmp": b"a user's notes", ".shard-000000.tar.tmp": b"old",
            "shard-000000.tar.bak": b"backup"}
    for name, data in kept.items():
        (dst / name).write_bytes(data)
    own = dst / f".shard-000007.tar{TMP_MARK}abcd1234.tmp"
    own.write_bytes(b"left by a killed writer")
    assert is_own_temporary(own)
    victim = tmp_path / "victim.tar"
    victim.write_bytes(b"outside, not ours")
    (dst / "shard-000001.tar").unlink()
    (dst / "shard-000001.tar").symlink_to(victim)  # a link where an indexed shard was
    assert shards_cli.main(["write", str(src), str(dst), "--samples-per-shard", "6", "--overwrite",
                               "--no-progress"]) == 0
    for name, data in kept.items():
        assert (dst / name).read_bytes() == data, name
    assert not own.exists() and victim.read_bytes() == b"outside, not ours"
    assert not (dst / "shard-000001.tar").exists() and not (dst / "shard-000001.tar").is_symlink()
    assert len(ShardedImages(dst)) == 6 and json.loads((dst / "index.json").read_text())["samples_per_shard"] == 6


OUTSIDE_INDEX = '{"format": "msn-shards", "version": 1, "shards": [{"file": "../victim.tar"}]}'


@pytest.mark.parametrize("index_text", ['{"notes": "mine"}', "not json at all", OUTSIDE_INDEX],
                         ids=["foreign", "unreadable", "path-outside"])
def test_overwrite_deletes_nothing_when_the_index_is_not_ours(tmp_path, capsys, index_text):
    src = _source_with_traps(tmp_path)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "index.json").write_text(index_text)
    (dst / "shard-000000.tar").write_bytes(b"someone's tar")
    (tmp_path / "victim.tar").write_bytes(b"victim")
    assert shards_cli.main(["write", str(src), str(dst), "--overwrite", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"msn-shards: error: {dst / 'index.json'}: ")
    assert "nothing deleted" in err
    assert (dst / "index.json").read_text() == index_text
    assert (dst / "shard-000000.tar").read_bytes() == b"someone's tar"
    assert (tmp_path / "victim.tar").read_bytes() == b"victim"


def test_shard_temporaries_carry_the_msn_files_mark(shard_folder, tmp_path, monkeypatch):
    dst, _ = shard_folder
    seen = []
    original = shard_writer._add_member

    def spying(tar, raw, name, data):
        seen.extend(p for p in (tmp_path / "out").iterdir() if p.name.startswith("."))
        return original(tar, raw, name, data)

    monkeypatch.setattr(shard_writer, "_add_member", spying)
    shard_writer.write_shards(tmp_path / "src", tmp_path / "out", samples_per_shard=4, progress=False, workers=1)
    assert seen and all(TMP_MARK in p.name for p in seen)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------- 5. Fashion-MNIST
def _idx(magic, dims, body: bytes) -> bytes:
    return struct.pack(f">{1 + len(dims)}I", magic, *dims) + body


def _fashion_files(count):
    """Images whose first pixel is the label, labels ``i % 10``, as idx bytes."""
    labels = (np.arange(count) % 10).astype(np.uint8)
    images = np.zeros((count, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = labels
    return _idx(2051, (count, 28, 28), images.tobytes()), _idx(2049, (count,), labels.tobytes())


@pytest.fixture(scope="module")
def fashion_source(tmp_path_factory):
    """A folder of the four gzipped idx files (synthetic, the real sizes): ``(folder, {name: bytes})``."""
    root = tmp_path_factory.mktemp("fashion-source")
    plain = {}
    for split, count in (("train", 60000), ("t10k", 10000)):
        images, labels = _fashion_files(count)
        plain[f"{split}-images-idx3-ubyte"], plain[f"{split}-labels-idx1-ubyte"] = images, labels
    for name, data in plain.items():
        (root / f"{name}.gz").write_bytes(gzip.compress(data, compresslevel=1))
    return root, plain


def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MSN_CACHE_DIR", str(tmp_path / "cache"))
    raw = tmp_path / "cache" / "fashion-mnist" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    return raw


def _truncated(data):
    return data[:-1]


def _wrong_magic(data):
    return struct.pack(">I", 2049 if data[3] == 3 else 2051) + data[4:]


def _wrong_count(data):
    return data[:4] + struct.pack(">I", struct.unpack(">I", data[4:8])[0] - 1) + data[8:]


def _bad_label(data):
    return data[:-1] + b"\x0c" if data[3] == 1 else data


@pytest.mark.parametrize("name", ["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"])
@pytest.mark.parametrize("damage", [_truncated, _wrong_magic, _wrong_count, _bad_label],
                         ids=["truncated", "magic", "count", "label"])
def test_a_bad_cached_file_is_rebuilt_from_the_source(fashion_source, tmp_path, monkeypatch, caplog, name, damage):
    source, plain = fashion_source
    raw = _cache(tmp_path, monkeypatch)
    if damage is _bad_label and "labels" not in name:
        name = "train-labels-idx1-ubyte"
    (raw / name).write_bytes(damage(plain[name]))
    with caplog.at_level("WARNING"):
        assert prepare_fashion_mnist(str(source)) == raw.parent.parent
    assert {p.name: p.read_bytes() for p in raw.iterdir()} == plain
    assert any(f"{raw / name}: rebuilding a bad cached Fashion-MNIST file" in r.getMessage() for r in caplog.records)


def test_the_rebuilt_cache_reads_the_right_labels(fashion_source, tmp_path, monkeypatch):
    source, plain = fashion_source
    raw = _cache(tmp_path, monkeypatch)
    (raw / "t10k-labels-idx1-ubyte").write_bytes(_bad_label(plain["t10k-labels-idx1-ubyte"]))
    test = FashionMNISTDataset(str(source), train=False)
    assert test.targets == [i % 10 for i in range(10000)]
    image, label = test[9999]
    assert label == 9 and int(image[0, 0, 0]) == 9


def test_a_bad_cached_file_without_a_source_is_one_line_naming_it(tmp_path, monkeypatch):
    raw = _cache(tmp_path, monkeypatch)
    (raw / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03 short")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as caught:
        prepare_fashion_mnist(str(tmp_path / "empty"))
    text = str(caught.value)
    assert "\n" not in text and text.startswith(f"{raw / 'train-images-idx3-ubyte'}: cached Fashion-MNIST file is "
                                                "bad (10 bytes, shorter than its header)")


def test_a_bad_source_file_is_refused(fashion_source, tmp_path, monkeypatch):
    source, plain = fashion_source
    _cache(tmp_path, monkeypatch)
    bad = tmp_path / "bad-source"
    bad.mkdir()
    for name, data in plain.items():
        (bad / f"{name}.gz").symlink_to(source / f"{name}.gz")
    (bad / "train-labels-idx1-ubyte.gz").unlink()
    (bad / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_wrong_magic(plain["train-labels-idx1-ubyte"])))
    with pytest.raises(ValueError, match=rf"^{bad}/train-labels-idx1-ubyte.gz: not Fashion-MNIST's "
                                         r"train-labels-idx1-ubyte \(magic number 2051, not 2049\)$"):
        prepare_fashion_mnist(str(bad))
    laid_out = tmp_path / "laid-out" / "FashionMNIST" / "raw"
    laid_out.mkdir(parents=True)
    for name, data in plain.items():
        (laid_out / name).write_bytes(_truncated(data) if name.startswith("t10k-images") else data)
    with pytest.raises(ValueError, match=rf"^{laid_out}/t10k-images-idx3-ubyte: not Fashion-MNIST's "):
        prepare_fashion_mnist(str(tmp_path / "laid-out"))


def test_decompression_follows_no_planted_link(fashion_source, tmp_path, monkeypatch):
    source, plain = fashion_source
    raw = _cache(tmp_path, monkeypatch)
    victim, other = tmp_path / "victim", tmp_path / "other"
    victim.write_bytes(b"precious")
    other.write_bytes(b"not labels")
    (raw / "train-labels-idx1-ubyte.tmp").symlink_to(victim)  # the old fixed temporary name
    (raw / "t10k-labels-idx1-ubyte").symlink_to(other)  # a link where a cached file goes
    prepare_fashion_mnist(str(source))
    assert victim.read_bytes() == b"precious" and other.read_bytes() == b"not labels"
    assert not (raw / "t10k-labels-idx1-ubyte").is_symlink()
    assert {p.name: p.read_bytes() for p in raw.iterdir() if not p.is_symlink()} == plain
    assert not [p for p in raw.iterdir() if is_own_temporary(p)]


# ------------------------------------------------------------------ Fashion-MNIST fetched when missing
@pytest.fixture
def mirror(fashion_source, tmp_path, monkeypatch):
    """torchvision's Fashion-MNIST mirror list pointed at a loopback HTTP server serving the
    synthetic gzipped files (and their md5s as the expected ones): the real download code runs
    without the internet. Yields ``(requests served, {name: plain bytes})``."""
    import hashlib
    import http.server
    import threading

    from torchvision.datasets import FashionMNIST

    source, plain = fashion_source
    served = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(source), **kwargs)

        def log_message(self, *args):  # quiet
            served.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(FashionMNIST, "mirrors", [f"http://127.0.0.1:{server.server_address[1]}/"])
    monkeypatch.setattr(FashionMNIST, "resources", [
        (f"{name}.gz", hashlib.md5((source / f"{name}.gz").read_bytes()).hexdigest()) for name in plain])
    monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_ROOT", str(tmp_path / "no-debian-package"))
    monkeypatch.setenv("MSN_CACHE_DIR", str(tmp_path / "cache"))
    try:
        yield served, plain
    finally:
        server.shutdown()
        server.server_close()


def test_missing_fashion_mnist_is_downloaded_checked_and_cached(mirror, tmp_path, caplog):
    served, plain = mirror
    with caplog.at_level("WARNING"):
        folder = prepare_fashion_mnist(None)
    raw = tmp_path / "cache" / "fashion-mnist" / "FashionMNIST" / "raw"
    assert folder == raw.parent.parent and {p.name: p.read_bytes() for p in raw.iterdir()} == plain
    assert len(served) == 4 and any("downloading it into" in r.getMessage() for r in caplog.records)
    assert prepare_fashion_mnist(None) == folder and len(served) == 4  # the second time from the cache
    assert len(fashion_mnist.FashionMNISTDataset(None, train=False)) == 10000


def test_a_download_that_does_not_match_its_md5_is_refused_in_one_line(mirror, tmp_path, monkeypatch):
    from torchvision.datasets import FashionMNIST

    monkeypatch.setattr(FashionMNIST, "resources", [(name, "0" * 32) for name, _ in FashionMNIST.resources])
    with pytest.raises(FileNotFoundError) as caught:
        prepare_fashion_mnist(None)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"data.root: Fashion-MNIST is not at {tmp_path / 'no-debian-package'}")
    assert "md5" in message and "install the Debian package dataset-fashion-mnist, or run once with network access" in message
    assert not any((tmp_path / "cache").rglob("*-ubyte"))


def test_without_package_or_network_one_line_says_both_ways(tmp_path, monkeypatch):
    from torchvision.datasets import FashionMNIST

    monkeypatch.setattr(FashionMNIST, "mirrors", ["http://127.0.0.1:9/"])  # the discard port: nothing listens
    monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_ROOT", str(tmp_path / "no-debian-package"))
    monkeypatch.setenv("MSN_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="download failed .*install the Debian package dataset-fashion-mnist, "
                                                "or run once with network access, or set data.root"):
        prepare_fashion_mnist(None)


def test_a_fifo_among_images_is_a_bad_image_not_a_hang(tmp_path):
    folder = tmp_path / "images" / "a"
    folder.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "0.png")
    os.mkfifo(folder / "1.png")
    dataset = datasets.ImageFolderDataset(str(tmp_path / "images"))
    assert dataset[1][0] is None and dataset[0][0].shape == (3, 8, 8)
    with pytest.raises(BadImageError, match="not a regular file"):
        decode_rgb(folder / "1.png")


def test_a_link_back_up_the_tree_is_walked_once(tmp_path):
    """``a/x -> .`` and ``a/y -> .`` made torchvision's walk endless (and its memory grow)."""
    folder = tmp_path / "images" / "a"
    (folder / "sub").mkdir(parents=True)
    for path in (folder / "0.png", folder / "sub" / "1.png"):
        Image.new("RGB", (8, 8)).save(path)
    (folder / "x").symlink_to(".")
    (folder / "y").symlink_to(".")
    (folder / "sub" / "up").symlink_to("..")
    names = sorted(os.path.relpath(path, folder) for path, _ in datasets.ImageFolderDataset(str(tmp_path / "images")).samples)
    assert names == ["0.png", "sub/1.png"]


def test_a_plain_tree_lists_as_torchvision_lists_it(tmp_path):
    from torchvision.datasets import ImageFolder

    for name in ("b/2.png", "a/z/1.png", "a/0.png", "a/y.jpg", "b/notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / name, format="PNG") if not name.endswith(".txt") else (tmp_path / name).write_text("x")
    (tmp_path / "b" / "link").symlink_to(tmp_path / "a" / "z")  # a link to another folder is still followed
    assert datasets.ImageFolderDataset(str(tmp_path)).samples == ImageFolder(str(tmp_path)).samples


def test_overwrite_deletes_no_file_a_hostile_index_names(shard_folder, tmp_path):
    dst, _ = shard_folder
    src = tmp_path / "src"
    (dst / "NOTES.md").write_text("mine")
    (dst / "shard-000009.tar").write_text("not a tar")
    index = json.loads((dst / "index.json").read_text())
    for name in ("NOTES.md", "shard-000009.tar"):
        index["shards"][0]["file"] = name
        (dst / "index.json").write_text(json.dumps(index))
        assert shards_cli.main(["write", str(src), str(dst), "--overwrite", "--no-progress"]) == 2
    assert (dst / "NOTES.md").read_text() == "mine" and (dst / "shard-000009.tar").read_text() == "not a tar"


def test_torchvisions_processed_files_are_never_read(fashion_source, tmp_path, monkeypatch):
    """torchvision prefers ``processed/*.pt`` over the checked idx files when both exist."""
    source, plain = fashion_source
    monkeypatch.setenv("MSN_CACHE_DIR", str(tmp_path / "cache"))
    folder = prepare_fashion_mnist(str(source))
    (folder / "FashionMNIST" / "processed").mkdir()
    for split in ("training", "test"):
        torch.save((torch.zeros(5, 28, 28, dtype=torch.uint8), torch.tensor([999, -7, 3, 3, 3])),
                   folder / "FashionMNIST" / "processed" / f"{split}.pt")
    data = fashion_mnist.FashionMNISTDataset(str(source), train=False)
    assert len(data) == 10000 and set(data.targets) <= set(range(10))
