"""The package's import floors (docs/architecture.md): no module imports upwards.

Every module of ``msn`` belongs to a unit (a top-level module, or a subpackage as a whole);
each unit sits on a floor and may import only units on lower floors (and itself). A new
module must be given a floor here, so the map in docs/architecture.md stays true.
"""

from __future__ import annotations

import ast

from conftest import ROOT

#: unit -> floor (keep in step with docs/architecture.md, "Floors")
FLOORS = {
    "msn": 0,  # the package root itself (``from msn import distributed`` names its target)
    "msn.architectures": 0, "msn.configs": 0, "msn.runtime": 0, "msn.files": 0, "msn.safe_load": 0, "msn.masking": 0,
    "msn.tables": 0,
    "msn.config": 1, "msn.distributed": 1, "msn.data": 1, "msn.checkpoint": 1, "msn.metrics_log": 1,
    "msn.losses": 2, "msn.models": 2, "msn.plots": 2,
    "msn.export": 3, "msn.train": 3,
    "msn.eval": 4,
    "msn.cli": 5,
    "msn.api": 6,
}
PACKAGES = ("msn.data", "msn.models", "msn.train", "msn.export", "msn.eval")


def unit_of(module: str) -> str:
    for package in PACKAGES:
        if module == package or module.startswith(package + "."):
            return package
    return ".".join(module.split(".")[:2])


def imports_of(path) -> set[str]:
    """Modules named by the ``import`` statements of a file (``from msn import x`` -> msn.x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "msn":
                found.update(f"msn.{alias.name}" for alias in node.names)
            else:
                found.add(node.module)
    return {name for name in found if name == "msn" or name.startswith("msn.")}


def test_every_unit_has_a_floor_and_imports_only_downwards():
    units_seen, upward = set(), []
    for path in sorted((ROOT / "msn").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        unit = unit_of(module)
        units_seen.add(unit)
        assert unit in FLOORS, f"{module}: its unit {unit} has no floor in FLOORS (and docs/architecture.md)"
        for name in imports_of(path):
            target = unit_of(name)
            if target != unit and FLOORS.get(target, 99) >= FLOORS[unit]:
                upward.append(f"{module} (floor {FLOORS[unit]}) imports {name} (floor {FLOORS.get(target)})")
    assert not upward, "\n".join(upward)
    assert units_seen == set(FLOORS), f"floors of units that no longer exist: {set(FLOORS) - units_seen}"


def test_the_checker_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from msn import train\nimport msn.eval.report\nfrom msn.models import MSNViT\n")
    assert imports_of(bad) == {"msn.train", "msn.eval.report", "msn.models"}
    assert unit_of("msn.eval.report") == "msn.eval" and unit_of("msn.config") == "msn.config"
