"""msn.data.shard_writer, shard_reader, shards_cli and samplers: tar shards of an ImageFolder
(data=shards), the writer command, the global and the shard-local orders, bitwise resume,
bad samples."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from conftest import ROOT, assert_same_state, compose_config
from PIL import Image

from msn import checkpoint
from msn.config import ConfigError, load_config
from msn.data import (
    ImageFolderDataset,
    MultiViewDataset,
    ShardedImages,
    ShardLocalSampler,
    build_dataset,
    build_multiview_data,
    build_sampler,
    build_train_loader,
)
from msn.data import shard_writer, shards_cli
from msn.data.decode import BadImageError
from msn.data.loader import start_epoch
from msn.data.samplers import ResumableSampler
from msn.train import Trainer

CLASSES = ("ant", "bee", "cat")
PER_CLASS = (12, 11, 9)  # 32 images: 4 steps of 8


def make_folder(root, per_class=PER_CLASS):
    """JPEGs and PNGs (RGB, grey, RGBA) of assorted sizes, one sub-folder per class."""
    rng = np.random.default_rng(0)
    for c, (name, count) in enumerate(zip(CLASSES, per_class)):
        (root / name).mkdir(parents=True)
        for i in range(count):
            h, w = 34 + (5 * i) % 17, 36 + (7 * i + c) % 19
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            image = Image.fromarray(pixels)
            kind = (i + c) % 4
            if kind == 0:
                image.save(root / name / f"{name}_{i}.JPEG", quality=90)
            elif kind == 1:
                image.save(root / name / f"{name}_{i}.png")
            elif kind == 2:
                image.convert("L").save(root / name / f"{name}_{i}.jpg")
            else:
                image.putalpha(Image.fromarray(pixels[..., 0]))
                image.save(root / name / f"{name}_{i}.png")
    return root


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these tiny tensors gain nothing from two, and on a shared 2-core
    machine two spinning threads made this file several times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """``(folder, shards)``: the generated ImageFolder and its shards of 5 samples."""
    base = tmp_path_factory.mktemp("shards")
    src = make_folder(base / "images")
    assert shards_cli.main(["write", str(src), str(base / "shards"), "--samples-per-shard", "5", "--no-progress"]) == 0
    return src, base / "shards"


def _data_cfg(tiny_config, root, name="shards", **data):
    return tiny_config(data={"name": name, "root": str(root), **data}).data


# ----------------------------------------------------------------------------- (a) contents
def test_shards_hold_the_folders_images_and_labels_in_its_order(written):
    src, dst = written
    folder, shards = ImageFolderDataset(str(src)), ShardedImages(dst)
    assert len(shards) == len(folder) == sum(PER_CLASS)
    assert shards.classes == folder.classes == list(CLASSES) and shards.targets == folder.targets.tolist()
    assert shards.shard_sizes == [5] * 6 + [2]
    assert shards.image_names() == folder.image_names()
    for i in range(len(folder)):
        (a, la), (b, lb) = folder[i], shards[i]
        assert la == lb and a.dtype == b.dtype == torch.uint8 and torch.equal(a, b), f"image {i} differs"
    assert shards.samples[7] == (f"{dst}/shard-000001.tar:000000007", folder.targets[7])
    index = json.loads((dst / "index.json").read_text())
    assert index["format"] == "msn-shards" and index["num_samples"] == len(folder)
    # a plain tar: members <key>.<ext>, <key>.cls in order, at the offsets of the index
    with tarfile.open(dst / "shard-000001.tar") as tar:
        members = tar.getmembers()
        entry = index["shards"][1]
        assert [m.name for m in members[::2]] == [f"{k}.{p.rsplit('.', 1)[1].lower()}" for k, p in zip(entry["keys"], entry["paths"])]
        assert [m.offset_data for m in members[::2]] == entry["offsets"]
        assert [int(tar.extractfile(m).read()) for m in members[1::2]] == entry["labels"]
        assert tar.extractfile(members[0]).read() == (src / entry["paths"][0]).read_bytes()


# ----------------------------------------------------------------------------- (b) global order
def test_global_order_loader_equals_the_image_folder_path(written, tiny_config):
    src, dst = written
    for rank in range(2):
        runs = []
        for cfg in (_data_cfg(tiny_config, src, "folder"), _data_cfg(tiny_config, dst, shard_order="global")):
            dataset = build_dataset(cfg)
            data, collate = build_multiview_data(dataset, cfg, seed=3)
            sampler = build_sampler(dataset, cfg, 8, seed=3, rank=rank, world_size=2)
            assert type(sampler) is ResumableSampler
            loader = build_train_loader(data, sampler, num_workers=0, collate=collate)
            runs.append([b for epoch in (0, 1) for b in start_epoch(loader, epoch)])
        assert len(runs[0]) == len(runs[1]) == 8
        for a, b in zip(*runs):
            for name in ("target", "anchor", "focal", "labels"):
                assert torch.equal(getattr(a, name), getattr(b, name)), name


# ----------------------------------------------------------------------------- (c) local order
@pytest.mark.parametrize("sizes,world,batch", [([5, 5, 5, 5, 5, 5, 3], 3, 6), ([4] * 6, 3, 6), ([7, 2, 9], 4, 8)],
                         ids=["shorter-last-shard", "whole-shards", "more-ranks-than-shards"])
def test_local_order_ranks_read_their_own_shards_disjointly_and_cover_the_epoch(sizes, world, batch):
    """Every rank yields as many batches, the ranks' samples are disjoint and miss less than
    one global batch, each rank reads exactly the shards it is told; with the writer's
    layout (equal shards of n, the last one shorter) a rank reads at most ceil(P / n) + 2
    shards for its P samples, and only a shard at a cut between two ranks is shared."""
    total, n = sum(sizes), sizes[0]
    writer_layout = all(size == n for size in sizes[:-1]) and sizes[-1] <= n
    starts = np.concatenate([[0], np.cumsum(sizes)])
    for epoch in (0, 1):
        samplers = [ShardLocalSampler(sizes, batch, seed=4, rank=r, world_size=world) for r in range(world)]
        for s in samplers:
            s.set_position(epoch)
        orders = [[i for e, i in s if e == epoch] for s in samplers]
        assert {len(o) for o in orders} == {total // batch * batch // world}  # the same batches on every rank
        assert len(samplers[0]) == len(orders[0]) and samplers[0].batches_per_epoch == total // batch
        seen = [i for o in orders for i in o]
        assert len(seen) == len(set(seen)) and total - len(seen) < batch  # disjoint, the remainder dropped
        shard_users = {}
        for r, (sampler, order) in enumerate(zip(samplers, orders)):
            own = sampler.shards_of(epoch)
            assert not writer_layout or len(own) <= math.ceil(sampler.per_rank / n) + 2
            assert {int(np.searchsorted(starts, i, side="right")) - 1 for i in order} == set(own)
            for shard in own:
                shard_users.setdefault(shard, []).append(r)
        if writer_layout:
            assert all(len(users) <= 2 for users in shard_users.values())
        if sizes == [4] * 6:
            assert all(len(users) == 1 for users in shard_users.values()) and len(shard_users) == 6
    again = ShardLocalSampler(sizes, batch, seed=4, rank=1, world_size=world)
    full = list(again)
    again.set_position(0, 1)
    assert list(again) == full[again.local_batch:]  # resume at the exact sample
    again.set_position(1)
    assert [i for _, i in again] != [i for _, i in full]  # a new order each epoch
    assert [i for _, i in ShardLocalSampler(sizes, batch, seed=5, rank=1, world_size=world)] != [i for _, i in full]


def test_local_loader_reads_only_the_ranks_shards(written, tiny_config, monkeypatch):
    _, dst = written
    cfg = _data_cfg(tiny_config, dst, shard_order="local")
    dataset = build_dataset(cfg)
    reads = []
    original = ShardedImages.read_bytes
    monkeypatch.setattr(ShardedImages, "read_bytes", lambda self, i: reads.append(self.shard_of(i)) or original(self, i))
    labels = []
    for rank in range(2):
        reads.clear()
        data, collate = build_multiview_data(dataset, cfg, seed=0)
        sampler = build_sampler(dataset, cfg, 8, seed=0, rank=rank, world_size=2)
        assert isinstance(sampler, ShardLocalSampler)
        batches = list(build_train_loader(data, sampler, num_workers=0, collate=collate))
        assert len(batches) == 4 and all(b.size == 4 for b in batches)
        assert set(reads) == set(sampler.shards_of(0)) and len(set(reads)) <= 5
        labels.append(torch.cat([b.labels for b in batches]))
    assert len(torch.cat(labels)) == 32 and torch.equal(torch.cat(labels).bincount(), torch.tensor(PER_CLASS))
    subset = torch.utils.data.Subset(dataset, range(12))  # data.subset: the first shards, the third cut
    assert build_sampler(subset, cfg, 4, seed=0).shard_sizes == [5, 5, 2, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="first images"):
        build_sampler(torch.utils.data.Subset(dataset, [3, 1, 2, 0]), cfg, 2, seed=0)


def test_config_validates_shards_and_shard_order(written, tiny_config):
    _, dst = written
    with pytest.raises(ConfigError, match="data.shard_order: local needs data=shards"):
        tiny_config(data={"shard_order": "local"})
    with pytest.raises(ConfigError, match="data.shard_order: must be global or local"):
        tiny_config(data={"name": "shards", "root": str(dst), "shard_order": "random"})
    with pytest.raises(ConfigError, match="data.root: is required for data=shards"):
        tiny_config(data={"name": "shards", "root": None})
    with pytest.raises(FileNotFoundError, match="data.root: no index.json"):
        build_dataset(_data_cfg(tiny_config, dst.parent / "images"))
    composed = load_config(compose_config("experiment=vits16_in1k", "data=shards", f"data.root={dst}",
                                          "data.shard_order=local"))
    assert (composed.data.name, composed.data.shard_order) == ("shards", "local")


# ----------------------------------------------------------------------------- (d) resume
@pytest.mark.parametrize("order,workers", [("global", 0), ("local", 0), ("local", 2)])
def test_resumed_shard_run_equals_uninterrupted(written, tiny_config, tmp_path, order, workers):
    _, dst = written
    data = {"name": "shards", "root": str(dst), "shard_order": order, "num_workers": workers}
    straight = Trainer(tiny_config(output_dir=str(tmp_path / "straight"), data=data))
    assert type(straight.sampler) is (ShardLocalSampler if order == "local" else ResumableSampler)
    straight.fit()
    Trainer(tiny_config(output_dir=str(tmp_path / "split"), data=data, train={"max_steps": 3})).fit()
    Trainer(tiny_config(output_dir=str(tmp_path / "split"), data=data)).fit()
    a = checkpoint.load_checkpoint(tmp_path / "straight/checkpoints/latest.pt")
    b = checkpoint.load_checkpoint(tmp_path / "split/checkpoints/latest.pt")
    assert a["step"] == b["step"] == 8
    assert assert_same_state(a, b) > 50


# ----------------------------------------------------------------------------- (e) the command
def test_writer_refuses_a_non_empty_destination_and_overwrites_on_request(written, tmp_path, capsys):
    src, dst = written
    out = tmp_path / "out"
    assert shards_cli.main(["write", str(src), str(out), "--samples-per-shard", "7", "--no-progress"]) == 0
    first = (out / "index.json").read_bytes()
    assert shards_cli.main(["write", str(src), str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"msn-shards: error: {out}: folder is not empty (pass --overwrite to replace its shards)"
    (out / "notes.txt").write_text("kept")
    assert shards_cli.main(["write", str(src), str(out), "--samples-per-shard", "20", "--overwrite",
                               "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "notes.txt", "shard-000000.tar", "shard-000001.tar"]
    assert (out / "index.json").read_bytes() != first
    assert [torch.equal(ShardedImages(out)[i][0], ShardedImages(dst)[i][0]) for i in (0, 31)] == [True, True]


@pytest.mark.parametrize("case", ["missing", "empty", "file"])
def test_writer_names_the_path_at_fault(tmp_path, capsys, case):
    src = tmp_path / "src"
    if case == "empty":
        src.mkdir()
    elif case == "file":
        src.write_text("x")
    assert shards_cli.main(["write", str(src), str(tmp_path / "dst"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"msn-shards: error: {src}: ")
    assert not (tmp_path / "dst").exists()


def test_interrupted_write_leaves_no_temporary_file_and_no_index(written, tmp_path, monkeypatch):
    src, _ = written
    calls = []
    original = shard_writer._add_member

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 15:  # in the middle of the second shard
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(shard_writer, "_add_member", interrupted)
    for workers in (1, 3):  # the shards written beside the failing one complete or vanish
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            shard_writer.write_shards(src, tmp_path / "out", samples_per_shard=5, progress=False, overwrite=True,
                                       workers=workers)
        left = sorted(p.name for p in (tmp_path / "out").iterdir())
        assert "index.json" not in left and not [name for name in left if name.endswith(".tmp")] and len(left) < 7
        assert workers > 1 or ("shard-000000.tar" in left and "shard-000001.tar" not in left)
        for name in left:
            with tarfile.open(tmp_path / "out" / name) as tar:
                shard = int(name[6:12])
                assert len(tar.getmembers()) == 2 * min(5, sum(PER_CLASS) - 5 * shard)
    with pytest.raises(FileNotFoundError, match="index.json: shard index not found"):
        ShardedImages(tmp_path / "out")


def test_module_command_and_script_entry(written, tmp_path):
    import tomllib

    src, _ = written
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["msn-shards"] == "msn.data.shards_cli:main"
    run = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "msn.data.shards_cli", "write", str(src),
                          str(tmp_path / "out"), "--samples-per-shard", "16"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    assert "wrote 32 images of 3 classes in 2 shards" in run.stdout and "32/32" in run.stderr  # the progress bar
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------- (f) bad samples
def test_corrupt_and_unreadable_samples_behave_like_the_folders_bad_images(tmp_path, caplog):
    src = make_folder(tmp_path / "images", per_class=(3, 3, 2))
    (src / "bee" / "bee_broken.jpg").write_bytes(b"not a jpeg at all")
    shard_writer.write_shards(src, tmp_path / "shards", samples_per_shard=4, progress=False)
    folder, shards = ImageFolderDataset(str(src)), ShardedImages(tmp_path / "shards")
    broken = next(i for i, (p, _) in enumerate(folder.samples) if p.endswith("bee_broken.jpg"))
    assert folder[broken][0] is None and shards[broken] == (None, folder.targets[broken])  # kept in place
    # corrupt another sample inside its shard: same size, garbage bytes
    victim = 1
    with open(shards.shard_paths[shards.shard_of(victim)], "r+b") as f:
        f.seek(int(shards.offsets[victim]))
        f.write(b"\x00" * int(shards.sizes[victim]))
    shards = ShardedImages(tmp_path / "shards")
    name = f"{tmp_path}/shards/shard-000000.tar:000000001"
    with caplog.at_level("WARNING"):
        assert shards[victim] == (None, folder.targets[victim])
        assert shards[victim][0] is None
    assert sum(name in r.getMessage() for r in caplog.records) == 1
    assert MultiViewDataset(shards, None, seed=0)[(0, victim)][3] is True  # replaced by a readable sample
    strict = ShardedImages(tmp_path / "shards", on_bad_image="error")
    with pytest.raises(BadImageError, match=f"{name}: cannot decode image"):
        strict[victim]
    assert torch.equal(strict[0][0], folder[0][0])
    with open(shards.shard_paths[-1], "r+b") as f:  # a truncated shard is refused when opened
        f.truncate(600)
    with pytest.raises(ValueError, match=r"index.json: shard 2 \(shard-000002.tar\), sample 000000008: .* truncated"):
        ShardedImages(tmp_path / "shards")
