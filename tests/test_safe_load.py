"""msn/safe_load.py: torch files are read as tensors and plain data; anything else is refused
before any of its objects is built, unless the one trust switch is on."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from msn.safe_load import UnsafePickleError, load_torch_file


class RunsCode:
    """Unpickling this calls ``open(marker, "w")``: code chosen by whoever wrote the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def planted(path, marker, legacy: bool = False):
    """A file laid out like released weights, with one object that runs code when unpickled."""
    torch.save({"target_encoder": {"cls_token": torch.zeros(1, 1, 8)}, "note": RunsCode(marker)}, path,
               _use_new_zipfile_serialization=not legacy)
    return path


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_file_that_runs_code_is_refused_in_one_line_and_nothing_runs(tmp_path, legacy):
    marker = tmp_path / "marker"
    path = planted(tmp_path / "weights.pth.tar", marker, legacy)
    with pytest.raises(UnsafePickleError) as caught:
        load_torch_file(path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: refused: it needs full unpickling (")
    assert "open" in message and "trust_pickle=true" in message
    assert not marker.exists()


def test_the_trust_switch_unpickles_in_full(tmp_path):
    """The refusal above is not vacuous: the same file does run its code when trusted."""
    marker = tmp_path / "marker"
    contents = load_torch_file(planted(tmp_path / "weights.pth.tar", marker), trust_pickle=True)
    assert marker.exists() and torch.equal(contents["target_encoder"]["cls_token"], torch.zeros(1, 1, 8))


def test_tensors_and_plain_containers_load(tmp_path):
    value = {"w": torch.arange(6.0).reshape(2, 3), "rng": torch.get_rng_state(), "python": random.getstate(),
             "list": [1, 2.5, "x", None, (3, True)], "nested": {"a": {"b": torch.ones(2, dtype=torch.int64)}}}
    torch.save(value, tmp_path / "plain.pt")
    loaded = load_torch_file(tmp_path / "plain.pt")
    assert torch.equal(loaded["w"], value["w"]) and loaded["python"] == value["python"]
    assert loaded["list"] == value["list"] and torch.equal(loaded["nested"]["a"]["b"], torch.ones(2, dtype=torch.int64))


def test_numpy_objects_are_refused_with_how_to_convert_an_old_checkpoint(tmp_path):
    torch.save({"rng": {"numpy": np.random.get_state()}}, tmp_path / "v1.pt")
    with pytest.raises(UnsafePickleError, match="numpy.*resuming once with trust_pickle=true rewrites them"):
        load_torch_file(tmp_path / "v1.pt")


@pytest.mark.parametrize("content", [b"garbage" * 10, b""], ids=["garbage", "empty"])
def test_a_damaged_file_is_one_line_naming_it(tmp_path, content):
    path = tmp_path / "broken.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError) as caught:
        load_torch_file(path, what="checkpoint")
    assert not isinstance(caught.value, UnsafePickleError)
    assert str(caught.value).startswith(f"{path}: not a readable checkpoint (") and "\n" not in str(caught.value)
