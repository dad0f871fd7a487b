"""Shared test setup: the `slurm` and `gpu` markers, and folders for submitit.

Tests marked `slurm` run against the real local cluster (`bash slurm/local-cluster.sh up`).
Without it they are skipped, unless REQUIRE_SLURM=1 (CI), where they fail instead.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest

SLURM_SKIP_REASON = "local SLURM not running: start it with `bash slurm/local-cluster.sh up`"
SLURM_PROBE_TIMEOUT_S = 5


def _slurm_required() -> bool:
    return os.environ.get("REQUIRE_SLURM", "").strip().lower() in {"1", "true", "yes"}


@functools.lru_cache(maxsize=1)
def slurm_problem() -> str | None:
    """Why the local cluster is not usable, or None when it is. Checked once per session.

    `sinfo` must answer (it blocks for a long time while slurmctld is down, hence the
    timeout) and `sacct` must work: submitit polls it, and without accounting a
    cancelled job never looks finished.
    """
    probes = (["sinfo", "-h", "-o", "%P %t"], ["sacct", "-n", "-X", "--starttime", "now"])
    for cmd in probes:
        shown = " ".join(cmd)
        if shutil.which(cmd[0]) is None:
            return f"`{cmd[0]}` is not installed"
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=SLURM_PROBE_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired:
            return f"`{shown}` did not answer within {SLURM_PROBE_TIMEOUT_S} s"
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip().splitlines()
            return f"`{shown}` exited {proc.returncode}: {detail[-1] if detail else 'no output'}"
    return None


@functools.lru_cache(maxsize=1)
def _cuda_available() -> bool:
    import torch  # imported only when a gpu test runs: it takes a second or two

    return torch.cuda.is_available()


def pytest_runtest_setup(item: pytest.Item) -> None:
    if (item.get_closest_marker("slurm") is not None and not _slurm_required()
            and slurm_problem() is not None):
        pytest.skip(SLURM_SKIP_REASON)
    if item.get_closest_marker("gpu") is not None and not _cuda_available():
        pytest.skip("CUDA is not available")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    # With REQUIRE_SLURM=1 a missing cluster is a test failure (FAILED, not a setup ERROR).
    if item.get_closest_marker("slurm") is not None and _slurm_required():
        problem = slurm_problem()
        if problem is not None:
            pytest.fail(f"REQUIRE_SLURM=1 but {SLURM_SKIP_REASON} ({problem})", pytrace=False)


@pytest.fixture
def slurm_folder(tmp_path: Path) -> Path:
    """A fresh folder for submitit's pickles and logs.

    Never reuse one across tests: when the cluster's state is reset, job ids restart at 1
    and a reused folder hands back an old job's result.
    """
    folder = tmp_path / "submitit"
    folder.mkdir()
    return folder


REPO = Path(__file__).resolve().parent.parent
TINY_CURRICULUM = REPO / "tests" / "data" / "tiny.yaml"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four synthetic ATLAS-style subjects of 32^3, written once per session (real NIfTI)."""
    from orchestrator.data.synth import synthesize_atlas

    root = tmp_path_factory.mktemp("atlas")
    synthesize_atlas(root, subjects=4, shape_vox=(32, 32, 32), seed=0)
    return root


def replaced(text: str, old: str, new: str, count: int = -1) -> str:
    """`text.replace(old, new, count)` for a test's hand edit of a file; fails when `old`
    is not there (an edit that changes nothing would silently test less)."""
    assert old in text, f"{old!r} not in the text to edit"
    return text.replace(old, new, count)


def make_tiny_plan(runs_dir: Path, data: Path, run: str = "tiny", curriculum: Path = TINY_CURRICULUM,
                   cluster: str = "local", stage_updates: dict | None = None):
    """Plan the tiny curriculum on the CPU and write runs_dir/run/plan.yaml; `stage_updates`
    change every planned stage's spec afterwards (e.g. {"max_epochs": 3})."""
    from orchestrator.planning.plan_file import PlanRequest, make_plan, write_plan
    from orchestrator.training.step import estimation_step

    req = PlanRequest(curriculum=curriculum, target_mem_gb=2.0, device="cpu", cluster=cluster,
                      data_dir=data, run=run, runs_dir=runs_dir)
    plan = make_plan(req, estimation_step)
    if stage_updates:
        bad = set(stage_updates) - set(type(plan.stages[0].spec).model_fields)
        assert not bad, f"stage_updates: {sorted(bad)} are not StageSpec fields"
        stages = [sp.model_copy(update={"spec": sp.spec.model_copy(update=stage_updates)})
                  for sp in plan.stages]
        plan = plan.model_copy(update={"stages": stages})
    return plan, write_plan(plan)


@pytest.fixture(autouse=True, scope="session")
def _own_calibration_file(tmp_path_factory: pytest.TempPathFactory):
    """No test reads or writes the user's calibration file (~/.cache/orchestrator): ratios
    recorded by a real `plan --verify` would change the plans the tests check. Subprocesses
    inherit it; a test that wants its own file sets ORCHESTRATOR_CALIBRATION itself."""
    key = "ORCHESTRATOR_CALIBRATION"
    old = os.environ.get(key)
    os.environ[key] = str(tmp_path_factory.mktemp("calibration") / "calibration.json")
    yield
    if old is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = old


@pytest.fixture(autouse=True, scope="session")
def _no_user_defaults(tmp_path_factory: pytest.TempPathFactory):
    """No test takes the user's default cluster profile (ORCHESTRATOR_CLUSTER or the user
    config file): plans would be for another device. Subprocesses inherit this."""
    saved = {k: os.environ.pop(k, None) for k in ("ORCHESTRATOR_CLUSTER", "ORCHESTRATOR_CONFIG")}
    os.environ["ORCHESTRATOR_CONFIG"] = str(tmp_path_factory.mktemp("user") / "config.yaml")
    yield
    for key, value in saved.items():
        os.environ.pop(key, None)
        if value is not None:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def _no_leftover_log_handlers():
    """The CLI's `logging.basicConfig` run under CliRunner leaves a root handler on the
    runner's stream, closed once the test ends; later tests would log into it ("I/O
    operation on closed file"). Each test ends with the root handlers it started with."""
    root = logging.getLogger()
    before = list(root.handlers)
    yield
    for handler in root.handlers[:]:
        if handler not in before:
            root.removeHandler(handler)


def pytest_terminal_summary(terminalreporter) -> None:  # noqa: ANN001
    """The reliability suite's counts (tests/reliability), when it ran."""
    import sys

    kit = sys.modules.get("reliability_kit")
    if kit is not None:
        terminalreporter.write_line(kit.summary_line())
