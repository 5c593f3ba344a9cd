"""README.md and docs/ as a reader meets them: a short README whose commands CI runs, pages that
stand alone (no page sends the reader back to the README), links that resolve, no issue numbers,
and the tables of docs/training.md read against the code they describe."""

from __future__ import annotations

import re

from msn.config import load_config

from conftest import CONFIG_DIR, ROOT, compose_config

README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
ALL_TEXT = [README, *PAGES, *sorted((ROOT / "docs" / "results").glob("*.md"))]
#: a relative Markdown link target: ``[text](target)``, not a URL nor an anchor on the same page
LINK = re.compile(r"\]\(((?!https?://|#)[^)\s]+)\)")
ISSUE = re.compile(r"\bissues? *#? *\d+|\bthe issue\b|\b(?:PR|pull request) *#\d+", re.IGNORECASE)


def section(text: str, heading: str) -> str:
    """The lines of ``text`` under the Markdown ``heading`` up to the next heading of that level or above."""
    level = heading.split(" ")[0]
    start = text.index(f"\n{heading}\n") + len(heading) + 2
    end = re.search(rf"\n#{{1,{len(level)}}} ", text[start:])
    return text[start:start + end.start()] if end else text[start:]


def table_rows(text: str) -> list[list[str]]:
    """The body rows of the first Markdown table in ``text``, as lists of stripped cells."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines[2:]]


def missing_links(page) -> list[str]:
    """``PAGE -> TARGET`` for every relative link of ``page`` whose file does not exist."""
    return [f"{page.name} -> {target}" for target in LINK.findall(page.read_text(encoding="utf-8"))
            if not (page.parent / target.split("#")[0]).exists()]


def readme_references(page) -> list[str]:
    """Sentences of a docs page that name this repository's README (the model card file
    ``README.md`` in code font and the authors' README, "their README", are other files)."""
    text = page.read_text(encoding="utf-8")
    return [text[max(0, m.start() - 40):m.end() + 40].replace("\n", " ") for m in re.finditer(r"README", text)
            if not (text[m.start() - 1:m.end() + 4] == "`README.md`" or text[max(0, m.start() - 6):m.start()] == "their ")]


def test_the_readme_is_a_short_read():
    assert len(README.read_bytes()) <= 12 * 1024, "README.md grew past 12 KB: move the details into docs/"


def test_ci_runs_the_readme_commands():
    """README "Quick start": the two commands, and "CI runs `bash .ci/run`: `make setup`, then
    `make test`, then ... `make test-threads`"."""
    quick_start = section(README.read_text(encoding="utf-8"), "## Quick start (two commands)")
    commands = [line.split("#")[0].strip() for line in re.search(r"```bash\n(.*?)```", quick_start, re.S)
                .group(1).splitlines()]
    assert commands == ["make setup demo", "make test"]
    assert "CI runs `bash .ci/run`: `make setup`, then `make test`, then" in " ".join(quick_start.split())
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    ran = [line for line in ci if line.startswith("make ")]
    assert ran == ["make setup", "make test", "make test-threads"]
    makefile = (ROOT / "Makefile").read_text()
    assert all(re.search(rf"^{target}:", makefile, re.M) for target in ("setup", "demo", "test", "test-threads"))


def test_every_relative_link_resolves():
    assert [missing for page in ALL_TEXT for missing in missing_links(page)] == []


def test_every_path_the_readme_names_exists():
    """README "Dive into the code" and the commands name files of this repository: each exists."""
    named = set(re.findall(r"`((?:msn|scripts|benchmarks|tests|docs)/[\w/.-]*)`", README.read_text(encoding="utf-8")))
    assert len(named) >= 8 and sorted(path for path in named if not (ROOT / path).exists()) == []


def test_no_page_sends_the_reader_back_to_the_readme():
    """Each docs page stands alone; docs/guarantees.md, the index of the README's and the pages'
    promises, names the README as the place of some of them."""
    found = {page.name: readme_references(page) for page in PAGES if page.name != "guarantees.md"}
    assert {name: hits for name, hits in found.items() if hits} == {}


def test_every_page_opens_with_a_title_and_what_it_covers():
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        assert lines[0].startswith("# ") and lines[1] == "", f"{page.name}: no title line"
        assert lines[2] and not lines[2].startswith(("#", "|", "```", "-", "*")), f"{page.name}: no opening sentence"


def test_no_issue_numbers_in_the_readme_or_docs():
    assert [f"{page.name}: {m.group(0)}" for page in ALL_TEXT
            for m in ISSUE.finditer(page.read_text(encoding="utf-8"))] == []


def test_the_checks_see_what_they_forbid(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\nSee the README's section. [gone](nowhere.md) [ok](page.md) "
                    "`README.md` is the model card; their README says so. Issue 15 and the issue's aim; PR #4.\n")
    assert missing_links(page) == ["page.md -> nowhere.md"]
    assert len(readme_references(page)) == 1
    assert [m.group(0) for m in ISSUE.finditer(page.read_text())] == ["Issue 15", "the issue", "PR #4"]


def test_the_presets_table_lists_every_preset():
    """docs/training.md "Presets (`experiment=`)": one row per file of configs/experiment."""
    rows = table_rows(section((ROOT / "docs" / "training.md").read_text(encoding="utf-8"), "## Presets (`experiment=`)"))
    assert sorted(row[0].strip("`") for row in rows) == sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


def documented_default(cell: str):
    """A default as the table writes it: ``null``, ``true``/``false``, a number, or a `string`."""
    cell = cell.strip("`")
    if cell in ("null", "true", "false"):
        return {"null": None, "true": True, "false": False}[cell]
    try:
        return int(cell) if re.fullmatch(r"-?\d+", cell) else float(cell)
    except ValueError:
        return cell


def test_the_key_settings_table_states_the_defaults(tmp_path):
    """docs/training.md "Key settings": every row whose default is a plain value (not a pointer
    such as "see `msn/config.py`", nor an interpolation) equals the composed default config."""
    rows = table_rows(section((ROOT / "docs" / "training.md").read_text(encoding="utf-8"), "## Key settings"))
    cfg = load_config(compose_config(f"data.root={tmp_path}"))
    checked = 0
    for key_cell, default_cell, _meaning in rows:
        keys, defaults = key_cell.split(", "), default_cell.split(", ")
        if len(keys) != len(defaults) or "see " in default_cell or "${" in default_cell or "*" in key_cell:
            continue
        for key, default in zip(keys, defaults):
            value = cfg
            for part in (key.strip("`").split(".") + ["name"] if key == "`model`" else key.strip("`").split(".")):
                value = getattr(value, part)
            assert value == documented_default(default), f"docs/training.md Key settings: {key} is {value!r}, not {default}"
            checked += 1
    assert checked >= 20, "docs/training.md lost its Key settings table"
