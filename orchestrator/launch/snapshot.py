"""A run's own copy of the code: runs/<run>/code/ (orchestrator/, models/, stages/, clusters).

SLURM jobs of the run import from it, not from the checkout: a job that starts, or is
requeued, hours after `submit` runs the code that was submitted, even while someone edits
the checkout. The sbatch script changes into the snapshot and puts it first on
PYTHONPATH (`python -m` puts the working directory first on sys.path, and both come
before the editable install). The snapshot is taken once per run: `resume` reuses it.
"""
from __future__ import annotations

import hashlib
import logging
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from orchestrator.config import REPO_ROOT, Plan

logger = logging.getLogger(__name__)
SNAPSHOT_DIR = "code"
PARTS = ("orchestrator", "models", "stages", "envs/clusters")
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".tmp-*")


def code_dir(plan: Plan) -> Path:
    """Where the run's snapshot lives (a fold's jobs use their run's: runs/<run>/folds/fold<i>)."""
    run_dir = plan.run_dir.resolve()
    return (run_dir.parent.parent if plan.fold is not None else run_dir) / SNAPSHOT_DIR


def snapshot_code(plan: Plan, source: Path = REPO_ROOT) -> dict[str, Any]:
    """Copy the code into runs/<run>/code/ unless it is there; returns what to record.

    The copy is made in a temporary folder beside it and renamed into place, so a
    snapshot is complete or absent.

    Returns:
        {"code": folder, "code_sha256": digest of the copied files, "git_commit": the
        checkout's commit (with "-dirty" when it had changes) or None}.
    """
    dest = code_dir(plan)
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-code.", dir=dest.parent))
        try:
            for part in PARTS:
                if (source / part).is_dir():
                    shutil.copytree(source / part, tmp / part, ignore=IGNORE)
            curriculum = Path(plan.curriculum)
            if curriculum.is_file():  # the file the plan was made from, for the record
                (tmp / "config").mkdir()
                shutil.copy2(curriculum, tmp / "config" / curriculum.name)
            tmp.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("code snapshot: %s", dest)
    return {"code": str(dest), "code_sha256": _digest(dest), "git_commit": _git_commit(source)}


def setup_lines(code: Path) -> list[str]:
    """sbatch lines that make a job import the snapshot."""
    q = shlex.quote(str(code))
    return [f"cd {q}", f"export PYTHONPATH={q}${{PYTHONPATH:+:$PYTHONPATH}}"]


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        h.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _git_commit(source: Path) -> str | None:
    try:
        head = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--", *PARTS],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (subprocess.SubprocessError, OSError):
        return None
    return head + ("-dirty" if dirty else "")
