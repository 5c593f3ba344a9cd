"""msn.api: the Python example of docs/getting_started.md runs as written, and bad input raises one line."""

from __future__ import annotations

import json
import re

import pytest

import msn
from msn.config import ConfigError

from conftest import FASHION_MNIST, ROOT, TINY_OVERRIDES, require_dir


def getting_started_example() -> str:
    text = (ROOT / "docs" / "getting_started.md").read_text()
    section = text[text.index("## From Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_getting_started_example_runs(tmp_path, monkeypatch, capsys):
    require_dir(FASHION_MNIST, "Fashion-MNIST (Debian package dataset-fashion-mnist)")
    monkeypatch.chdir(tmp_path)  # the example writes outputs/ below the working directory
    exec(compile(getting_started_example(), "docs/getting_started.md (From Python)", "exec"), {})
    printed = capsys.readouterr().out.strip().splitlines()
    assert "torch.Size([4, 128])" in printed
    saved = json.loads((tmp_path / "outputs" / "api_eval" / "results.json").read_text())
    assert float(printed[-1]) == pytest.approx(saved["shots"]["1"]["mean"])  # the document it returned
    assert 0.0 <= saved["shots"]["1"]["mean"] <= 100.0 and saved["backbone"]["which"] == "target"
    assert (tmp_path / "outputs" / "api_demo" / "checkpoints" / "latest.pt").is_file()


def test_api_errors_are_the_command_line_lines(tmp_path):
    with pytest.raises(ConfigError, match=r"^mask.ratio: must be in \[0, 1\), got 1.5$"):
        msn.pretrain([*TINY_OVERRIDES, "mask.ratio=1.5", f"output_dir={tmp_path}"])
    run = msn.pretrain([*TINY_OVERRIDES, "train.max_steps=2", f"output_dir={tmp_path / 'run'}"])
    assert run["record"]["step"] == 2 and run["checkpoint"].is_file()
    backbone = msn.load_backbone(run["output_dir"])
    assert backbone.info["step"] == 2 and backbone.module.embed_dim == 32
    with pytest.raises(AttributeError):
        msn.no_such_function  # noqa: B018
