"""The ImageNet rehearsal at CI size (scripts/imagenet_rehearsal.py; docs/results/imagenet_rehearsal.md):
100 of ImageNet's classes under the real file names of the standard split files, pre-training with
``data=imagenet`` and a resume, then ``eval_lowshot.py`` with the three split folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import IMAGENET_SUBSETS, require_dir

import imagenet_rehearsal  # scripts/ is on pytest's path (pyproject.toml)

from msn.eval.subsets import class_of, read_subset_file  # noqa: E402

CLASSES = 100


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    subsets = require_dir(IMAGENET_SUBSETS, "the ImageNet split files")
    work = tmp_path_factory.mktemp("rehearsal")
    output = work / "doc" / "rehearsal.md"
    imagenet_rehearsal.main(["--classes", str(CLASSES), "--scale", "3000", "--val-per-class", "3", "--steps", "2",
                             "--subsets", str(subsets), "--work", str(work), "--output", str(output), "--no-progress"])
    document = json.loads(output.with_suffix(".json").read_text())
    assert str(work) not in output.with_suffix(".json").read_text()  # no machine path in the document
    return subsets, output, {**document, **json.loads((work / "scales.json").read_text())}


def test_every_named_image_of_the_kept_classes_is_in_the_tree(rehearsal):
    subsets, _, payload = rehearsal
    (scale,) = payload["scales"]
    tree = scale["tree"]
    tree_root = Path(tree["split_dirs"][0]).parents[1]  # <tree>/subsets/imagenet_subsets1
    kept = sorted(p.name for p in (tree_root / "train").iterdir())
    assert len(kept) == CLASSES
    expected = sorted({class_of(n) for f in (subsets / "imagenet_subsets1").glob("*.txt") for n in read_subset_file(f)})
    assert kept == expected[:CLASSES]
    named = 0
    for folder in imagenet_rehearsal.SPLIT_FOLDERS:
        for path in (subsets / folder).glob("*.txt"):
            for name in read_subset_file(path):
                if class_of(name) in kept:
                    assert (tree_root / "train" / class_of(name) / name).is_file(), name
                    named += 1
    assert named > 0
    # the scan resolved every name of the filtered split files against the data set
    scan = scale["stages"]["scan"]
    written = sum(len(read_subset_file(p)) for d in tree["split_dirs"] for p in Path(d).glob("*.txt"))
    assert scan["resolved"] == written == named
    assert scan["images"] == tree["train_images"] >= 3000


def test_pretraining_resumed_and_the_evaluation_has_every_subset_of_every_folder(rehearsal):
    _, output, payload = rehearsal
    (scale,) = payload["scales"]
    assert scale["stages"]["resume"]["last_step"] == 2
    table = scale["subsets"]
    for key, files in (("1", ["1imgs_class.txt"] * 3), ("2", ["2imgs_class.txt"] * 3),
                       ("5", ["5imgs_class.txt", "5imgs_class.txt", "3imgs_class.txt"])):
        assert [r["split"] for r in table[key]] == [0, 1, 2]
        assert [r["file"] for r in table[key]] == files
        assert all(r["train_size"] == int(key) * CLASSES for r in table[key])
    # 1%: only imagenet_subsets1 holds a 1percent.txt (the authors ship one 1% split)
    assert [(r["split"], r["file"]) for r in table["1%"]] == [(0, "1percent.txt")]
    assert all(r["accuracy"] > 100 / CLASSES * 2 for records in table.values() for r in records)
    text = output.read_text()
    for stage in ("scan train/", "pre-training: first step", "evaluation: features, test (img/s)",
                  "evaluation: k-NN", "evaluation: peak RSS"):
        assert stage in text
    assert all(r["stage"] for r in payload["stages"])
