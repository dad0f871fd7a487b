"""The layering contract in pyproject.toml ([tool.importlinter]), checked by import-linter."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _lint_imports(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    return subprocess.run([tool, "--no-cache", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_import_contracts_are_kept() -> None:
    res = _lint_imports()
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 broken" in res.stdout


def test_a_broken_contract_fails(tmp_path: Path) -> None:
    """The same tool on this tree with a contract it breaks (data/ imports errors.py)."""
    config = tmp_path / "contract.toml"
    config.write_text('[tool.importlinter]\nroot_packages = ["orchestrator"]\n\n'
                      '[[tool.importlinter.contracts]]\nname = "data without errors"\n'
                      'type = "forbidden"\nsource_modules = ["orchestrator.data"]\n'
                      'forbidden_modules = ["orchestrator.errors"]\n')
    res = _lint_imports("--config", str(config))
    assert res.returncode != 0
    assert "data without errors BROKEN" in res.stdout
    assert "orchestrator.data.nifti -> orchestrator.errors" in res.stdout
