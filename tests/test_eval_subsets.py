"""Labelled subsets: generation (deterministic, nested), the reference file format, lookup."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from conftest import IMAGENET_SUBSETS, require_dir
from msn.eval.subsets import (
    NameIndex,
    SubsetError,
    class_of,
    first_k_per_class,
    generate_split,
    is_nested,
    per_class_counts,
    percent_count,
    read_subset_file,
    scan_subset_dir,
    write_split,
)



@pytest.fixture
def split_files() -> Path:
    """The standard split files (skipped when absent, a failure under ``CI=true``)."""
    return require_dir(IMAGENET_SUBSETS, "the ImageNet low-shot split files (MSN_IMAGENET_SUBSETS)")


def uneven_labels() -> list[int]:
    """5 classes of 30, 31, ..., 34 images, interleaved."""
    labels = [c for c in range(5) for _ in range(30 + c)]
    return labels[::2] + labels[1::2]


def test_generation_is_deterministic_nested_and_exact():
    labels = uneven_labels()
    first = generate_split(labels, [1, 2, 5], seed=3, split=1, percent=20)
    again = generate_split(labels, [1, 2, 5], seed=3, split=1, percent=20)
    assert [s.indices for s in first] == [s.indices for s in again]
    other_split = generate_split(labels, [1, 2, 5], seed=3, split=2, percent=20)
    other_seed = generate_split(labels, [1, 2, 5], seed=4, split=1, percent=20)
    assert first[2].indices != other_split[2].indices
    assert first[2].indices != other_seed[2].indices

    by_key = {s.key: s for s in first}
    assert list(by_key) == ["1", "2", "5", "20%"]
    for key, k in (("1", 1), ("2", 2), ("5", 5)):
        counts = Counter(labels[i] for i in by_key[key].indices)
        assert counts == {c: k for c in range(5)}
    percent_counts = Counter(labels[i] for i in by_key["20%"].indices)
    assert percent_counts == {c: percent_count(30 + c, 20) for c in range(5)}
    assert percent_counts == {0: 6, 1: 6, 2: 6, 3: 7, 4: 7}
    # nested: every smaller subset is the first images per class of every larger one
    chain = [by_key[k].indices for k in ("1", "2", "5", "20%")]
    for small, large in zip(chain, chain[1:]):
        assert set(small) < set(large)
        for c in range(5):
            small_c = [i for i in small if labels[i] == c]
            large_c = [i for i in large if labels[i] == c]
            assert large_c[: len(small_c)] == small_c


def test_generation_does_not_depend_on_other_shot_counts():
    labels = uneven_labels()
    alone = generate_split(labels, [2], seed=0, split=0)[0].indices
    with_others = {s.key: s.indices for s in generate_split(labels, [1, 2, 10], seed=0, split=0)}
    assert alone == with_others["2"]


def test_class_with_too_few_images_is_a_clear_error():
    labels = [0] * 10 + [1] * 3 + [2] * 10
    with pytest.raises(SubsetError, match=r"shots: class 'b' \(label 1\) has only 3 training images, fewer than k=5"):
        generate_split(labels, [1, 5], seed=0, split=0, class_names=["a", "b", "c"])


def test_write_then_read_round_trip(tmp_path):
    labels = uneven_labels()
    names = [f"c{label}_img{index:04d}.png" for index, label in enumerate(labels)]
    subsets = generate_split(labels, [1, 3], seed=0, split=0, percent=10)
    write_split(tmp_path, subsets, names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["10percent.txt", "1imgs_class.txt", "3imgs_class.txt"]
    one, three = read_subset_file(tmp_path / "1imgs_class.txt"), read_subset_file(tmp_path / "3imgs_class.txt")
    assert per_class_counts(three) == {f"c{c}": 3 for c in range(5)}
    assert is_nested(one, three) and not is_nested(three, one)
    index = NameIndex(names)
    assert index.resolve(three, "x") == subsets[1].indices
    scan = scan_subset_dir(tmp_path)
    assert sorted(scan.uniform) == [1, 3] and list(scan.percent) == [10.0]
    two, source = scan.shots(2)
    assert two == first_k_per_class(three, 2) and "first 2 per class" in source
    with pytest.raises(SubsetError, match="no file with 4 or more images in every class"):
        scan.shots(4)


def test_unknown_names_error_gives_count_and_examples():
    names = ["a_1.JPEG", "a_2.JPEG", "b_1.JPEG"]
    index = NameIndex(names, "the toy data set")
    assert index.resolve(["b_1", "a_2.JPEG"], "f") == [2, 1]  # the extension may be left out
    with pytest.raises(SubsetError) as error:
        index.resolve(["a_1.JPEG", "z_9.JPEG", "z_8.JPEG", "b_1.JPEG"], "split.txt")
    message = str(error.value)
    assert message.startswith("subsets: 2 of 4 names in split.txt are not images of the toy data set")
    assert "z_9.JPEG, z_8.JPEG" in message


def test_bad_files_are_rejected(tmp_path):
    (tmp_path / "dup.txt").write_text("a_1\nb_1\na_1\n")
    with pytest.raises(SubsetError, match="1 name\\(s\\) listed twice, e.g. a_1"):
        read_subset_file(tmp_path / "dup.txt")
    (tmp_path / "noprefix.txt").write_text("a_1\nimage7.png\n")
    with pytest.raises(SubsetError, match="lack the '<class>_' prefix, e.g. image7.png"):
        read_subset_file(tmp_path / "noprefix.txt")
    with pytest.raises(SubsetError, match="cannot read"):
        read_subset_file(tmp_path / "missing.txt")


@pytest.mark.parametrize("folder", ["imagenet_subsets1", "imagenet_subsets2", "imagenet_subsets3"])
def test_reference_files_counts_and_nesting(folder, split_files):
    scan = scan_subset_dir(split_files / folder)
    # the content decides: imagenet_subsets3/3imgs_class.txt holds 5 per class
    assert sorted(scan.uniform) == [1, 2, 5]
    if folder == "imagenet_subsets3":
        assert scan.uniform[5][0].name == "3imgs_class.txt"
    files = {k: names for k, (_, names) in scan.uniform.items()}
    for k, names in files.items():
        counts = per_class_counts(names)
        assert len(names) == 1000 * k
        assert len(counts) == 1000 and set(counts.values()) == {k}
        assert all(class_of(n).startswith("n") and len(class_of(n)) == 9 for n in names)
    assert is_nested(files[1], files[2]) and is_nested(files[2], files[5])
    assert first_k_per_class(files[5], 2) == files[2] and first_k_per_class(files[5], 1) == files[1]
    if folder == "imagenet_subsets1":
        names = scan.percent[1.0][1]
        counts = per_class_counts(names)
        assert len(names) == 12811 and len(counts) == 1000
        assert set(counts.values()) == {12, 13}
        assert is_nested(files[5], names)  # subsets1 was drawn from the 1% file
    else:
        assert not scan.percent


def test_reference_folders_are_independent_draws(split_files):
    fives = [set(scan_subset_dir(split_files / f"imagenet_subsets{i}").shots(5)[0]) for i in (1, 2, 3)]
    for a, b in ((0, 1), (1, 2), (0, 2)):
        assert len(fives[a] & fives[b]) < len(fives[a]) // 4


def test_name_index_keeps_only_the_names_asked_for_and_flags_several_matches():
    names = ["a_1.JPEG", "a_1.png", "b_1.JPEG", "c_1.JPEG", "c_1.JPEG", "d_1"]
    index = NameIndex(names)
    assert index.resolve(["a_1.png", "d_1", "b_1"], "f") == [1, 5, 2]  # the exact name wins over its stem
    assert index.resolve(["b_1.JPEG", "d_1.JPEG"], "g") == [2, 5]
    assert set(index.exact) == {"a_1.png", "d_1", "b_1", "b_1.JPEG", "d_1.JPEG"}  # no table of every name
    assert set(index.stem) == {"b_1", "d_1"}
    for ambiguous in ("c_1.JPEG", "a_1", "c_1"):
        with pytest.raises(SubsetError, match=f"1 names in h match several images of the data set, e.g. {ambiguous}$"):
            index.resolve([ambiguous], "h")
