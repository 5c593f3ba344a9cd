"""Nothing is skipped silently in CI: every skip in tests/ goes through ``conftest.require_dir``
(which fails under ``CI=true``) or is the one ``cuda`` marker of conftest (CI has no GPU)."""

from __future__ import annotations

import re

from conftest import ROOT

#: Ways a test can skip itself, as they appear in source.
SKIP_PATTERN = re.compile(r"\bpytest\.(skip|importorskip)\b|\bmark\.(skip|skipif|xfail)\b|\bunittest\.skip")
#: The only places allowed to skip: the helper that fails under CI=true, and the CUDA marker.
ALLOWED = {("conftest.py", "require_dir"), ("conftest.py", "pytest_collection_modifyitems")}


def skips_outside_the_helpers() -> list[str]:
    found = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        function = None
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            defined = re.match(r"def (\w+)", line)
            function = defined.group(1) if defined else function
            code = line.split("#", 1)[0]
            if SKIP_PATTERN.search(code) and (path.name, function) not in ALLOWED and path.name != __name__ + ".py":
                found.append(f"{path.name}:{number}: {line.strip()}")
    return found


def test_every_skip_goes_through_the_ci_aware_helper():
    assert skips_outside_the_helpers() == []


def test_the_scanner_sees_a_plain_skip(tmp_path, monkeypatch):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text(
        "import pytest\n\n@pytest.mark.skipif(True, reason='x')\ndef test_a():\n    pytest.skip('no')\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert [hit.split(":")[1] for hit in skips_outside_the_helpers()] == ["3", "5"]
