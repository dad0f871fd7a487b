"""docs/architecture.md's import graph is the code's (tools/architecture.py makes it)."""
from __future__ import annotations

import ast
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import architecture  # noqa: E402


def test_the_documented_graph_is_the_code_s() -> None:
    assert architecture.current() == architecture.block(), (
        "docs/architecture.md is stale: run .venv/bin/python tools/architecture.py --write")


def test_a_module_outside_the_layers_shows_as_its_own_node() -> None:
    assert architecture.layer("orchestrator.cli") == "app"
    assert architecture.layer("orchestrator.cli.bench.plan") == "app"
    assert architecture.layer("orchestrator.training.step") == "training"
    assert architecture.layer("orchestrator.newthing") == "newthing"
    assert architecture.layer("models.lcnn") == "models"


# Function-local imports, of the project's modules or others: each one defers something
# heavy (torch, submitit, nibabel...) and says so with `# deferred: <what>` on its line or
# the line above (a run of consecutive imports shares the first one's marker); any other
# belongs at the top of its module (docs/architecture.md, "Deferred imports").
MARKER = "# deferred:"


def _imported(node: ast.Import | ast.ImportFrom) -> str:
    """The module `node` imports."""
    return ("." * node.level + (node.module or "") if isinstance(node, ast.ImportFrom)
            else node.names[0].name)


def unmarked_local_imports(source: str) -> list[tuple[int, str]]:
    """(line, module) of each function-local import without the marker."""
    lines = source.splitlines()
    found: list[tuple[int, str]] = []

    def marked(node: ast.stmt, body: list[ast.stmt]) -> bool:
        i = body.index(node)
        while i > 0 and isinstance(body[i - 1], ast.Import | ast.ImportFrom) \
                and body[i - 1].end_lineno == body[i].lineno - 1:
            i -= 1  # the first of a run of consecutive imports
        first = body[i].lineno
        return MARKER in lines[first - 1] or (first > 1 and lines[first - 2].strip().startswith(MARKER))

    def visit(node: ast.AST, in_function: bool) -> None:
        for field in ("body", "orelse", "finalbody", "handlers"):
            body = getattr(node, field, None)
            if not isinstance(body, list):
                continue
            for child in body:
                module = (_imported(child) if isinstance(child, ast.Import | ast.ImportFrom)
                          else None)
                if in_function and module is not None and not marked(child, body):
                    found.append((child.lineno, module))
                visit(child, in_function or isinstance(
                    child, ast.FunctionDef | ast.AsyncFunctionDef))

    visit(ast.parse(source), False)
    return found


def test_every_function_local_import_says_what_it_defers() -> None:
    bad = []
    for path in sorted([*(REPO / "orchestrator").rglob("*.py"), *(REPO / "models").rglob("*.py")]):
        rel = path.relative_to(REPO).as_posix()
        bad += [f"{rel}:{line} imports {module}"
                for line, module in unmarked_local_imports(path.read_text())]
    assert not bad, (f"move these to the top of their module, or say `{MARKER} <what>` "
                     "on the line or above it:\n" + "\n".join(bad))


def test_the_local_import_check_sees_what_it_should() -> None:
    source = '''
import os
from orchestrator.errors import ConfigError


def f():
    from orchestrator.config import Plan
    # deferred: torch
    from orchestrator.training.step import estimation_step
    from orchestrator.training.trainer import run_stage
    import json

    from models import lcnn
    if True:
        import models  # deferred: torch
    try:
        from . import sibling
    except ImportError:
        pass

    def g():
        from orchestrator.launch import submit


def h():
    rows = []
    import yaml
'''
    assert unmarked_local_imports(source) == [
        (7, "orchestrator.config"), (13, "models"), (17, "."), (22, "orchestrator.launch"), (27, "yaml")]
