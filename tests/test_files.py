"""msn/files.py: writes never follow a planted link, and clean-ups delete only what we wrote."""

from __future__ import annotations

import os

import pytest

from msn import files


def plant_link(path, target_text="precious\n"):
    """``path`` -> a file outside the folder holding ``target_text``; returns that file."""
    target = path.parent.parent / f"outside-{path.name}"
    target.write_text(target_text)
    path.symlink_to(target)
    return target


@pytest.mark.parametrize("write", [
    lambda path: files.write_text(path, "new\n"),
    lambda path: files.write_bytes(path, b"new\n", sync=True),
    lambda path: files.write_with(path, lambda name: open(name, "w").write("new\n")),
], ids=["text", "bytes", "by-name"])
def test_a_link_planted_at_the_target_is_replaced_and_its_target_untouched(tmp_path, write):
    folder = tmp_path / "run"
    folder.mkdir()
    target = plant_link(folder / "config.yaml")
    write(folder / "config.yaml")
    assert not (folder / "config.yaml").is_symlink() and (folder / "config.yaml").read_text() == "new\n"
    assert target.read_text() == "precious\n"
    assert [p.name for p in folder.iterdir()] == ["config.yaml"]  # no temporary left behind


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")

    def fail(stream):
        stream.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        files.atomic_write(path, fail)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["results.json"]


def test_new_files_get_the_umask_mode(tmp_path):
    mask = os.umask(0o022)
    try:
        path = files.write_text(tmp_path / "a.json", "{}")
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_appends_refuse_a_planted_link(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    target = plant_link(folder / "metrics.jsonl")
    with pytest.raises(OSError):
        files.open_append(folder / "metrics.jsonl")
    assert target.read_text() == "precious\n"
    with files.open_append(folder / "other.jsonl") as stream:
        stream.write("1\n")
    with files.open_append(folder / "other.jsonl") as stream:
        stream.write("2\n")
    assert (folder / "other.jsonl").read_text() == "1\n2\n"


def test_clean_up_removes_only_our_temporaries_and_never_through_a_link(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    ours = folder / f".latest.pt{files.TMP_MARK}abc123{files.TMP_SUFFIX}"
    ours.write_bytes(b"\0")
    kept = [folder / ".notes.tmp", folder / "latest.pt", folder / f"x{files.TMP_MARK}y{files.TMP_SUFFIX}"]
    for path in kept:
        path.write_text("keep")
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    linked = folder / f".epoch.pt{files.TMP_MARK}zz{files.TMP_SUFFIX}"
    linked.symlink_to(outside)  # a link named like ours: not a file we wrote
    assert files.remove_own_temporaries(folder) == [ours]
    assert not ours.exists() and all(path.read_text() == "keep" for path in kept) and linked.is_symlink()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    theirs = elsewhere / f".latest.pt{files.TMP_MARK}abc{files.TMP_SUFFIX}"
    theirs.write_text("keep")
    (tmp_path / "linked").symlink_to(elsewhere)
    assert files.remove_own_temporaries(tmp_path / "linked") == [] and theirs.exists()
