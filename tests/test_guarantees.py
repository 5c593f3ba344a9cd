"""docs/guarantees.md is the table of the promises README.md and docs/ make, each with the test
that proves it: every test it names (and every test README.md and docs/ name) must exist."""

from __future__ import annotations

import ast
import functools
import re

from conftest import ROOT

#: ``tests/test_x.py::test_name`` or ``test_x.py::test_name`` as the pages write them.
#: A name ending in ``*`` stands for every test starting so (``test_data.py::test_decoding_*``).
TEST_REFERENCE = re.compile(r"(?:tests/)?(test_[A-Za-z0-9_]+\.py)::([A-Za-z_][A-Za-z0-9_]*\*?)")


@functools.lru_cache(maxsize=None)
def defined_tests(file_name: str) -> frozenset[str]:
    """The test functions (module level and in classes) a test file defines."""
    path = ROOT / "tests" / file_name
    if not path.is_file():
        return frozenset()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return frozenset({node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.name.startswith("test")})


def missing_references(pages: list) -> list[str]:
    """``PAGE names tests/FILE::NAME, which does not exist`` for every such reference."""
    missing = []
    for page in pages:
        for file_name, name in TEST_REFERENCE.findall(page.read_text(encoding="utf-8")):
            defined = defined_tests(file_name)
            if not (name in defined or name.endswith("*") and any(test.startswith(name[:-1]) for test in defined)):
                missing.append(f"{page.name} names tests/{file_name}::{name}, which does not exist")
    return missing


def guarantee_rows() -> list[list[str]]:
    """The rows of the promise tables of docs/guarantees.md (its section 1), as lists of cells."""
    rows = []
    page = (ROOT / "docs" / "guarantees.md").read_text(encoding="utf-8")
    for line in page.split("\n## 2.")[0].splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 3 and not set(cells[0]) <= set("-: ") and cells[0] != "promise":
            rows.append(cells)
    return rows


def test_every_promise_names_a_test_that_exists():
    rows = guarantee_rows()
    assert len(rows) >= 40, "docs/guarantees.md lost its table"
    for cells in rows:
        assert TEST_REFERENCE.search(cells[2]), f"docs/guarantees.md: the promise {cells[0]!r} names no test"
    assert missing_references([ROOT / "docs" / "guarantees.md"]) == []


def test_every_test_the_readme_and_docs_name_exists():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert missing_references(pages) == []


def test_the_collector_sees_a_missing_test(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("proved by `tests/test_guarantees.py::test_every_promise_names_a_test_that_exists` and "
                    "`test_guarantees.py::test_that_was_removed` and `test_guarantees.py::test_every_*` and `test_x.py::test_*`\n")
    assert missing_references([page]) == ["page.md names tests/test_guarantees.py::test_that_was_removed, "
                                          "which does not exist",
                                          "page.md names tests/test_x.py::test_*, which does not exist"]
