"""msn.data: views, determinism, sharding/resume of the sampler, bad images, Fashion-MNIST."""

from pathlib import Path

import pytest
import torch

from msn.config import ViewsConfig
from msn.data import (
    FashionMNISTDataset,
    ImageFolderDataset,
    MultiViewDataset,
    MultiViewTransform,
    ResumableSampler,
    SyntheticImages,
    build_train_loader,
    collate_views,
)
from msn.data.loader import Unreadable

from conftest import FASHION_MNIST, require_dir

VIEWS = ViewsConfig(rand_size=32, focal_size=16, num_focal=3)


def _dataset(size=16):
    return MultiViewDataset(SyntheticImages(size, 4, 40), MultiViewTransform(VIEWS), seed=0)


def test_views_shapes_and_order():
    views, label, key, replaced = _dataset()[(0, 3)]
    assert len(views) == 2 + 3 and key == (0, 3) and replaced is False
    assert [v.shape[-1] for v in views] == [32, 32, 16, 16, 16]
    assert all(v.dtype == torch.float32 for v in views)
    assert label == 3
    assert not torch.equal(views[0], views[1])  # target and anchor are independent draws


def test_same_key_same_sample_other_key_differs():
    ds = _dataset()
    a, b, c = ds[(0, 5)], ds[(0, 5)], ds[(1, 5)]
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    assert a[1:] == b[1:]
    assert not torch.equal(a[0][0], c[0][0])
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    ds[(0, 1)]
    assert torch.equal(torch.rand(1), before)  # the global RNG is untouched


def test_collate_is_view_major_and_counts_skips():
    ds = _dataset()
    samples = [ds[(0, i)] for i in range(4)]
    batch = collate_views(samples[:2] + [Unreadable("a/broken.jpg")] + samples[2:])
    assert batch.size == 4 and batch.skipped == 1
    assert batch.focal.shape == (3 * 4, 3, 16, 16)
    # focal row v*B + i is view v of image i
    assert torch.equal(batch.focal[1 * 4 + 2], samples[2][0][2 + 1])
    assert torch.equal(batch.anchor[3], samples[3][0][1])
    with pytest.raises(RuntimeError, match="every image of a batch of 2 was unreadable, a/broken.jpg first"):
        collate_views([Unreadable("a/broken.jpg"), Unreadable("b/x.png")])


def test_sampler_shards_disjoint_and_resumes():
    full = list(ResumableSampler(40, 8, seed=1))
    assert len(full) == 40 and sorted(i for _, i in full) == list(range(40))
    ranks = [list(ResumableSampler(40, 8, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1])
    # rank r takes the r-th half of each global batch
    assert ranks[0][:4] == full[:4] and ranks[1][:4] == full[4:8]
    resumed = ResumableSampler(40, 8, seed=1)
    resumed.set_position(0, 3)
    assert list(resumed) == full[24:]
    nxt = ResumableSampler(40, 8, seed=1)
    nxt.set_position(1)
    assert [i for _, i in nxt] != [i for _, i in full] and all(e == 1 for e, _ in nxt)
    with pytest.raises(ValueError):
        ResumableSampler(4, 8, seed=0)


def test_loader_yields_batches_independent_of_workers():
    ds = _dataset()
    batches = []
    for workers in (0, 2):
        loader = build_train_loader(ds, ResumableSampler(16, 8, seed=0), num_workers=workers)
        batches.append(list(loader))
    assert len(batches[0]) == 2
    for b0, b2 in zip(*batches):
        assert torch.equal(b0.anchor, b2.anchor) and torch.equal(b0.focal, b2.focal)


def test_image_folder_skips_bad_image_once(tmp_path, caplog):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (20, 16), color=(10, 200, 30)).save(tmp_path / cls / "good.png")
    (tmp_path / "b" / "broken.jpg").write_bytes(b"not a jpeg at all")
    ds = ImageFolderDataset(str(tmp_path))
    broken = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("broken.jpg")][0]
    image, label = ds[0]
    assert image.shape == (3, 16, 20) and image.dtype == torch.uint8
    with caplog.at_level("WARNING"):
        assert ds[broken][0] is None
        assert ds[broken][0] is None
    assert sum("broken.jpg" in r.getMessage() for r in caplog.records) == 1
    strict = ImageFolderDataset(str(tmp_path), on_bad_image="error")
    with pytest.raises(RuntimeError, match="broken.jpg"):
        strict[broken]


def test_fashion_mnist_reader(tmp_path, monkeypatch):
    root = str(require_dir(FASHION_MNIST, "Fashion-MNIST (Debian package dataset-fashion-mnist)"))
    monkeypatch.setenv("MSN_CACHE_DIR", str(tmp_path))
    train = FashionMNISTDataset(root, train=True)
    test = FashionMNISTDataset(root, train=False)
    assert len(train) == 60000 and len(test) == 10000
    image, label = train[0]
    assert image.shape == (3, 28, 28) and image.dtype == torch.uint8
    assert torch.equal(image[0], image[2]) and label == 9  # first training image is an ankle boot
    assert sorted(set(test.targets)) == list(range(10))
    assert (Path(tmp_path) / "fashion-mnist" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()
    with pytest.raises(FileNotFoundError, match="data.root"):
        FashionMNISTDataset(str(tmp_path / "missing"))


def test_trainer_pipeline_is_independent_of_workers(tiny_config):
    from msn.data import build_dataset, build_multiview_data, fixed_image_size

    cfg = tiny_config()
    dataset = build_dataset(cfg.data)
    assert fixed_image_size(dataset) == (32, 32)
    data, collate = build_multiview_data(dataset, cfg.data, cfg.seed)
    assert collate.batch_views is not None
    runs = [list(build_train_loader(data, ResumableSampler(16, 8, seed=0), num_workers=w, collate=collate)) for w in (0, 2)]
    for a, b in zip(*runs):
        assert torch.equal(a.target, b.target) and torch.equal(a.focal, b.focal)
    assert runs[0][0].focal.shape == (2 * 8, 3, 16, 16)


def _decoded(tmp_path, image, name, **save):
    from msn.data.decode import decode_rgb

    path = tmp_path / name
    image.save(path, **save)
    out = decode_rgb(str(path))
    assert out.dtype == torch.uint8 and out.shape[0] == 3
    return out


def test_decoding_scales_16_bit_and_float_greys_instead_of_saturating(tmp_path):
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 65535, 256).astype(np.uint16).reshape(16, 16)
    png16 = Image.fromarray(ramp)  # saved as a 16-bit PNG; PIL reads it back as I;16 or I
    out = _decoded(tmp_path, png16, "deep.png")
    with Image.open(tmp_path / "deep.png") as reread:
        assert reread.mode in ("I;16", "I")
    expected = torch.from_numpy(np.rint(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8))
    assert torch.equal(out[0], expected) and torch.equal(out[1], out[2])  # grey, 0..255, not 99.6% at 255
    assert (out == 255).float().mean() < 0.01
    wide = Image.fromarray((ramp.astype(np.int32) * 4), mode="I")  # 18-bit values: scaled by their max
    assert _decoded(tmp_path, wide, "wide.tif")[0].max() == 255
    unit = Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32), mode="F")
    assert torch.all(_decoded(tmp_path, unit, "unit.tif") == 128)


def test_decoding_composites_transparency_applies_exif_and_converts_cmyk(tmp_path):
    from PIL import Image

    clear = Image.new("LA", (4, 4), (0, 0))  # black, fully transparent
    assert torch.all(_decoded(tmp_path, clear, "clear.png") == 255)  # the white matte shows
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([10, 20, 30] + [200, 100, 50] * 255)
    palette.putpixel((0, 0), 1)
    out = _decoded(tmp_path, palette, "palette.png", transparency=0)
    assert out[:, 0, 0].tolist() == [200, 100, 50] and out[:, 3, 3].tolist() == [255, 255, 255]
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    red = _decoded(tmp_path, cmyk, "cmyk.jpg", quality=100)
    assert red[0].float().mean() > 240 and red[1:].float().mean() < 15
    tall = Image.new("RGB", (6, 10), (0, 0, 0))
    exif = tall.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rotated = _decoded(tmp_path, tall, "phone.jpg", exif=exif)
    assert rotated.shape == (3, 6, 10)  # displayed 10 wide, 6 high


def test_min_decode_pixels_by_hand():
    from msn.data.view_params import min_decode_pixels

    # focal views bind: 96^2 / (0.05 * 3/4) = 245760 (the 224 px pair needs 224^2 / 0.225 = 223004.4)
    assert min_decode_pixels(ViewsConfig()) == 245760
    assert min_decode_pixels(ViewsConfig(num_focal=0, focal_size=8, focal_scale=(0.5, 1.0))) == 223005


def test_reduced_decode_keeps_enough_pixels_and_leaves_small_images_alone(tmp_path):
    """A 1600x1200 JPEG holds 1.92 M pixels: halving twice leaves 400x300 = 120000 >= 100000,
    an eighth (200x150) would not; a 300x200 JPEG and a PNG are decoded in full, bit for bit."""
    from PIL import Image

    from msn.data.decode import decode_rgb

    g = torch.Generator().manual_seed(0)

    def save(name, width, height):
        low = torch.rand(1, 3, height // 20, width // 20, generator=g)
        pixels = torch.nn.functional.interpolate(low, size=(height, width), mode="bilinear")[0]
        path = tmp_path / name
        Image.fromarray((pixels * 255).to(torch.uint8).permute(1, 2, 0).numpy()).save(path)
        return str(path)

    big = save("big.jpg", 1600, 1200)
    reduced, full = decode_rgb(big, min_pixels=100_000), decode_rgb(big)
    assert full.shape == (3, 1200, 1600) and reduced.shape == (3, 300, 400)
    shrunk = torch.nn.functional.interpolate(full[None].float(), size=(300, 400), mode="area")[0]
    assert (reduced.float() - shrunk).abs().mean() < 3  # the same picture (smooth image: a few grey levels)
    for small in (save("small.jpg", 300, 200), save("big.png", 1600, 1200)):
        assert torch.equal(decode_rgb(small, min_pixels=50_000), decode_rgb(small))


def test_pre_training_folders_decode_reduced_evaluation_folders_in_full(tmp_path, tiny_config):
    from PIL import Image

    from msn.data import build_dataset
    from msn.data.view_params import min_decode_pixels

    (tmp_path / "images" / "a").mkdir(parents=True)
    Image.new("RGB", (40, 40)).save(tmp_path / "images" / "a" / "x.jpg")
    data_cfg = tiny_config(data={"name": "folder", "root": str(tmp_path / "images")}).data
    assert build_dataset(data_cfg, train=True).min_pixels == min_decode_pixels(data_cfg.views)
    assert build_dataset(data_cfg, train=False).min_pixels is None
    data_cfg.reduced_decode = False
    assert build_dataset(data_cfg, train=True).min_pixels is None


# ---------------------------------------------------------------------------- long-tailed subset
def _geometric_counts(per_class, classes, ratio):
    return [round(per_class * ratio ** (-c / (classes - 1))) for c in range(classes)]


def test_long_tail_indices_follow_the_geometric_rule_and_are_seeded():
    from msn.data.datasets import long_tail_indices

    labels = [i % 5 for i in range(500)]  # 5 balanced classes of 100
    kept = long_tail_indices(labels, 10.0, seed=0)
    counts = [sum(labels[i] == c for i in kept) for c in range(5)]
    # 100 * 10^(-c/4): 100, 56.2, 31.6, 17.8, 10
    assert counts == _geometric_counts(100, 5, 10.0) == [100, 56, 32, 18, 10]
    assert kept == sorted(set(kept))  # ascending, no repeats: the data set's own order
    assert long_tail_indices(labels, 10.0, seed=0) == kept  # deterministic
    other = long_tail_indices(labels, 10.0, seed=1)
    assert other != kept and [sum(labels[i] == c for i in other) for c in range(5)] == counts
    assert long_tail_indices(labels, 1.0) == list(range(500))  # ratio 1: everything


def test_build_dataset_makes_only_the_training_split_long_tailed():
    from msn.config import DataConfig
    from msn.data import build_dataset

    cfg = DataConfig(name="synthetic", synthetic_size=400, synthetic_classes=4, synthetic_image_size=8,
                     long_tail_ratio=8.0)
    train, test = build_dataset(cfg, train=True), build_dataset(cfg, train=False)
    counts = [train.targets.count(c) for c in range(4)]
    assert counts == _geometric_counts(100, 4, 8.0) == [100, 50, 25, 12]
    assert len(train) == sum(counts) and train[0][1] == train.targets[0]
    names = train.image_names()
    assert len(names) == len(train) and all(int(n.split("_")[0]) == t for n, t in zip(names, train.targets))
    assert isinstance(test, SyntheticImages) and len(test) == 100  # evaluation split whole
    assert len(build_dataset(DataConfig(name="synthetic", synthetic_size=400), train=True)) == 400


def test_fashion_mnist_long_tail_is_ratio_10(tmp_path, monkeypatch):
    from msn.config import DataConfig
    from msn.data import build_dataset

    root = str(require_dir(FASHION_MNIST, "Fashion-MNIST (Debian package dataset-fashion-mnist)"))
    monkeypatch.setenv("MSN_CACHE_DIR", str(tmp_path))
    train = build_dataset(DataConfig(name="fashion_mnist", root=root, long_tail_ratio=10.0), train=True)
    counts = [train.targets.count(c) for c in range(10)]
    assert counts == _geometric_counts(6000, 10, 10.0)
    assert counts[0] == 6000 and counts[-1] == 600 and len(train) == 24523
    assert list(train.classes) == list(FashionMNISTDataset.classes)
