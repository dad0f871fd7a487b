"""docs/architecture.md's import graph is the code's (tools/architecture.py makes it)."""
from __future__ import annotations

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
