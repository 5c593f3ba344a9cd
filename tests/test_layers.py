"""The package's import floors (docs/architecture.md): no module imports upwards, and no
cycle of imports inside a package.

Every module of ``msn`` belongs to a unit (a top-level module, or a subpackage as a whole);
each unit sits on a floor and may import only units on lower floors (and itself). A new
module must be given a floor here, so the map in docs/architecture.md stays true. Imports
made on first use count like any other: ``importlib.import_module("msn.api")`` and a table of
module names (``"msn.train.step"``) are imports of the modules they name.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import ROOT

#: unit -> floor (keep in step with docs/architecture.md, "Floors"). ``msn`` is the package
#: root (``msn/__init__.py``), the facade that names the API on first use: it sits on top.
FLOORS = {
    "msn.version": 0, "msn.config_values": 0, "msn.architectures": 0, "msn.config_files": 0, "msn.dataset_roots": 0, "msn.runtime": 0, "msn.files": 0, "msn.safe_load": 0, "msn.masking": 0,
    "msn.tables": 0,
    "msn.config": 1, "msn.distributed": 1, "msn.data": 1, "msn.checkpoint": 1, "msn.metrics_log": 1,
    "msn.losses": 2, "msn.models": 2, "msn.plots": 2,
    "msn.export": 3, "msn.train": 3,
    "msn.eval": 4,
    "msn.cli": 5,
    "msn.api": 6,
    "msn": 7,
}
PACKAGES = ("msn.data", "msn.models", "msn.train", "msn.export", "msn.eval")


def unit_of(module: str) -> str:
    for package in PACKAGES:
        if module == package or module.startswith(package + "."):
            return package
    return ".".join(module.split(".")[:2])


def module_name(path: Path, root: Path = ROOT) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")


def imports_of(path: Path, module: str | None = None, known: set[str] | frozenset = frozenset()) -> set[str]:
    """Modules of ``msn`` a file imports: ``import`` statements anywhere in it (inside functions
    too), relative ones resolved against ``module`` (``from msn import x`` -> ``msn.x``), and
    string constants naming one of the ``known`` modules (imports made on first use)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                if module is None:
                    raise ValueError(f"{path}: a relative import needs the module's name")
                parts = module.split(".")
                anchor = parts if is_package else parts[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # ``from pkg import sub`` imports the module pkg.sub if there is one
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known or base == "msn" else base)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in known - {"msn"}:
            found.add(node.value)
    return {name for name in found if (name == "msn" or name.startswith("msn.")) and name != module}


def package_modules(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(path, root): path for path in sorted((root / "msn").rglob("*.py"))}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (or a module importing itself)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]

    def visit(node):  # Tarjan's algorithm; the graphs are a few dozen modules deep at most
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for successor in graph.get(node, ()):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def package_cycles(root: Path = ROOT) -> list[list[str]]:
    """Import cycles among the modules of one package (``msn.data.x`` -> ``msn.data.y`` -> ...).
    A package's ``__init__`` counts as a module of it: a module importing its own package's
    ``__init__`` that imports it back is a cycle."""
    modules = package_modules(root)
    known = set(modules)
    graph = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        graph[module] = {name for name in imports_of(path, module, known)
                         if name in known and (name == package or name.rpartition(".")[0] == package)}
    return cycles(graph)


def test_every_unit_has_a_floor_and_imports_only_downwards():
    units_seen, upward = set(), []
    modules = package_modules()
    for module, path in modules.items():
        unit = unit_of(module)
        units_seen.add(unit)
        assert unit in FLOORS, f"{module}: its unit {unit} has no floor in FLOORS (and docs/architecture.md)"
        for name in imports_of(path, module, set(modules)):
            target = unit_of(name)
            if target != unit and FLOORS.get(target, 99) >= FLOORS[unit]:
                upward.append(f"{module} (floor {FLOORS[unit]}) imports {name} (floor {FLOORS.get(target)})")
    assert not upward, "\n".join(upward)
    assert units_seen == set(FLOORS), f"floors of units that no longer exist: {set(FLOORS) - units_seen}"


def test_no_import_cycle_inside_a_package():
    found = package_cycles()
    assert not found, "import cycles inside a package:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_checker_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from msn import train\nimport msn.eval.report\nfrom msn.models import MSNViT\n")
    assert imports_of(bad) == {"msn.train", "msn.eval.report", "msn.models"}
    assert unit_of("msn.eval.report") == "msn.eval" and unit_of("msn.config") == "msn.config"


def test_the_checker_sees_imports_made_on_first_use():
    """The package root's lazy import of the API, and a subpackage's table of homes."""
    modules = package_modules()
    assert "msn.api" in imports_of(ROOT / "msn" / "__init__.py", "msn", set(modules))
    assert "msn.train.trainer" in imports_of(ROOT / "msn" / "train" / "__init__.py", "msn.train", set(modules))


def test_the_checker_finds_a_cycle_inside_a_package(tmp_path):
    """A planted package: a -> b -> a (one through a relative import, one inside a function),
    c -> the package's __init__ -> c, and d alone (no cycle)."""
    package = tmp_path / "msn" / "pkg"
    package.mkdir(parents=True)
    (tmp_path / "msn" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("from msn.pkg.c import thing\n")
    (package / "a.py").write_text("from .b import f\n")
    (package / "b.py").write_text("def f():\n    from msn.pkg import a\n")
    (package / "c.py").write_text("from msn.pkg import helper\nthing = 1\n")
    (package / "d.py").write_text("from msn.pkg.a import f\n")
    assert sorted(package_cycles(tmp_path)) == [["msn.pkg", "msn.pkg.c"], ["msn.pkg.a", "msn.pkg.b"]]


ARCHITECTURE_PAGE = ROOT / "docs" / "architecture.md"


def floors_on_the_page(text: str) -> dict[str, int]:
    """unit -> floor as the page's "Floors" table states it."""
    section = text.split("## Floors", 1)[1].split("\n## ", 1)[0]
    stated = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].isdigit():
            for unit in re.findall(r"`([a-z_]+)`", cells[1]):
                stated["msn" if unit == "msn" else f"msn.{unit}"] = int(cells[0])
    return stated


def test_the_architecture_page_matches_the_tree():
    """docs/architecture.md names every module of ``msn/``, every path it names exists, and its
    floors table is FLOORS."""
    text = ARCHITECTURE_PAGE.read_text(encoding="utf-8")
    modules = {str(path.relative_to(ROOT)) for path in (ROOT / "msn").rglob("*.py")}
    named = set(re.findall(r"`(msn/[A-Za-z0-9_/]+\.py)`", text))
    assert not modules - named, f"docs/architecture.md does not name {sorted(modules - named)}"
    assert not named - modules, f"docs/architecture.md names modules that do not exist: {sorted(named - modules)}"
    top_paths = set(re.findall(r"^\| `([^`]+)`", text, flags=re.MULTILINE))
    missing = [path for path in top_paths if not path.startswith("msn/") and not (ROOT / path).exists()]
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"
    assert floors_on_the_page(text) == FLOORS


def test_the_page_check_sees_a_wrong_floor():
    page = "## Floors\n| floor | units | what |\n|---|---|---|\n| 0 | `files`, `tables` | x |\n| 7 | `msn` | root |\n## Next\n"
    assert floors_on_the_page(page) == {"msn.files": 0, "msn.tables": 0, "msn": 7}
