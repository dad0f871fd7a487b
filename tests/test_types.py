"""mypy over the package and the models ([tool.mypy] in pyproject.toml, with pydantic's
plugin): a type error fails CI, as a lint error does (test_lint.py)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # ~50 s with a cold .mypy_cache on one core, ~5 s warm
@pytest.mark.skipif(importlib.util.find_spec("mypy") is None,
                    reason="mypy is not installed: `pip install -e '.[test]'` (setup.sh) installs it")
def test_mypy_is_clean() -> None:
    # the files, plugin and options come from pyproject.toml; the cache in .mypy_cache
    res = subprocess.run([sys.executable, "-m", "mypy"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Success: no issues found" in res.stdout
