"""The packages import one way (README, "How the code is laid out"):

    pipeline (cache format, loader, Hub)  <-  cache_writer (stage 1)
                                          <-  trainer (stage 2)
    analysis (model + SAE: CE, report, inference)  ->  cache_writer, trainer, pipeline
    pipeline.cli, pipeline.cli_help, pipeline.__main__: the face, may import every package, imported by none

No package imports another's private names (`from x import _name`). Read from the source with ast,
imports inside functions included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "cache_writer", "trainer", "analysis")
FACE = {"pipeline.cli", "pipeline.cli_help", "pipeline.__main__"}
ALLOWED = {"pipeline": {"pipeline"}, "cache_writer": {"cache_writer", "pipeline"},
           "trainer": {"trainer", "pipeline"}, "analysis": {"analysis", "cache_writer", "trainer", "pipeline"}}


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
            out[name] = path
    return out


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module imported, names taken from it, line) for every import statement of a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [a.name for a in node.names], node.lineno))
    return found


@pytest.mark.parametrize("name", sorted(modules()))
def test_imports_follow_the_arrows(name):
    path = modules()[name]
    pkg = name.split(".")[0]
    problems = []
    for target, names, line in imports(path):
        top = target.split(".")[0]
        if top not in PACKAGES:
            continue
        if target in FACE and name not in FACE:
            problems.append(f"line {line}: imports the CLI face {target}")
        if name not in FACE and top not in ALLOWED[pkg]:
            problems.append(f"line {line}: {pkg} must not import {target}")
        if top != pkg:
            private = [n for n in names if n.startswith("_") and not n.endswith("__")]
            if private:
                problems.append(f"line {line}: imports private {', '.join(private)} from {target}")
    assert not problems, f"{name}: " + "; ".join(problems)


def test_no_test_module_imports_another():
    """Shared test helpers live in tests/builders.py (and fixtures in conftest.py): a test module
    imported by another would run its tests' module-level setup, and hides what is shared."""
    offenders = [f"{path.name} imports {module}" for path in sorted((ROOT / "tests").glob("test_*.py"))
                 for module, _, _ in imports(path) if module.startswith("tests.test_")]
    assert offenders == []
