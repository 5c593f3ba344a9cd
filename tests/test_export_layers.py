"""The layers inside msn.export: what each module's docstring says it imports, it imports.

The shared types sit at the bottom (``weight_types``), the format modules above them, the
format table above those, the loader and the command line on top; nothing below imports
anything above (docs/formats.md Sec. 7: the table every reader goes through).
"""

from __future__ import annotations

import ast

from conftest import ROOT

EXPORT = ROOT / "msn" / "export"
#: Modules that import no other module of msn.export.
BOTTOM = ("weight_types", "weight_files", "key_maps")
#: The modules that read or write one format: the table imports them, they never import it.
FORMAT_MODULES = ("msn_format", "authors_format", "hf", "timm_format", "onnx_format")


def export_imports(name: str) -> set[str]:
    """The msn.export modules that ``msn/export/<name>.py`` imports (anywhere in the file)."""
    found = set()
    for node in ast.walk(ast.parse((EXPORT / f"{name}.py").read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module == "msn.export":
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("msn.export."):
            found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[2] for alias in node.names if alias.name.startswith("msn.export."))
    return found


def test_the_bottom_modules_import_no_other_export_module():
    assert {name: export_imports(name) for name in BOTTOM} == {name: set() for name in BOTTOM}


def test_state_edits_and_architecture_import_only_the_shared_types():
    assert export_imports("state_dicts") == {"weight_types"}
    assert export_imports("backbone_architecture") == {"weight_types"}


def test_format_modules_take_their_types_from_the_bottom_and_never_import_the_table_or_the_loader():
    for name in FORMAT_MODULES:
        imported = export_imports(name)
        assert "weight_types" in imported, name
        assert not imported & {"formats", "loading", "cli", "path_probe"}, (name, imported)


def test_no_module_imports_one_that_imports_it_back():
    modules = {path.stem for path in EXPORT.glob("*.py")}
    graph = {name: export_imports(name) & modules for name in modules}
    for start in sorted(graph):
        seen, frontier = set(), set(graph[start])
        while frontier:
            current = frontier.pop()
            assert current != start, f"msn.export.{start} is imported back through msn.export.{current}"
            if current not in seen:
                seen.add(current)
                frontier |= graph[current]
