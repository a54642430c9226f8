"""The package's layout holds: imports point one way (the import-linter contracts in
pyproject.toml), and no module imports another of the package inside a function."""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "prunewise"


def inner_package_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import of the package placed inside a function of ``path``."""
    found = []

    def visit(node: ast.AST, inside: bool) -> None:
        for child in ast.iter_child_nodes(node):
            here = inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if (
                here
                and isinstance(child, ast.ImportFrom)
                and (child.level or (child.module or "").startswith("prunewise"))
            ):
                found.append((child.lineno, "." * child.level + (child.module or "")))
            if here and isinstance(child, ast.Import):
                found.extend((child.lineno, a.name) for a in child.names if a.name.startswith("prunewise"))
            visit(child, here)

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return found


def test_no_module_imports_the_package_inside_a_function():
    offenders = {
        str(p.relative_to(PACKAGE)): found for p in sorted(PACKAGE.rglob("*.py")) if (found := inner_package_imports(p))
    }
    assert offenders == {}


def test_the_checker_sees_an_import_inside_a_function(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import os\n\ndef f():\n    from .blocks import x\n    import prunewise.data\n", encoding="utf-8")
    assert inner_package_imports(path) == [(4, ".blocks"), (5, "prunewise.data")]


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter is not installed")
def test_imports_point_one_way_and_have_no_circles():
    out = subprocess.run(["lint-imports"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "2 kept, 0 broken" in out.stdout
